"""Near-duplicate groups over a matrix of embeddings: the connected components of "cosine >= threshold".

Two items are near-duplicates when the cosine similarity of their vectors is at least the threshold;
a group is a connected component of that relation (a chain a~b~c is one group even if a and c are
further apart). Each group's kept item is the one with the lowest `order` (the caller's "earliest
created, then smallest id"), and comes first.

Memory is bounded at any size:
- Pairs are found block by block and folded into the components as they come (`Components`: scipy's
  connected_components over the new pairs plus one "star" edge per node already grouped), so no
  list of all pairs is ever held.
- Up to `EXACT_LIMIT` vectors every pair is scored, exactly, one block of rows against the rest
  (`exact_pairs`, the block sized to `BLOCK_BYTES` of scores).
- Above it (`partition_pairs`), the vectors are split into about sqrt(N) cells (FAISS spherical
  k-means on a sample) and each vector is compared, exactly, with the vectors whose home cell is
  among its `nprobe` nearest cells: a cell at a time, as matrix products, so the work runs at BLAS
  speed (FAISS's IVF search scans one query at a time: ~10x slower per comparison on this CPU).
  `nprobe` is the smallest that finds `TARGET_RECALL` of a sample's exact pairs. Beyond the
  matrix itself it holds the cell lists (a few int32 per vector) and one block of scores.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .errors import InputError
from .progress import progress_bar

log = logging.getLogger(__name__)

# Default threshold: docs/curation.md has the measurement it comes from.
DEFAULT_THRESHOLD = 0.95
EXACT_LIMIT = 20_000             # vectors up to which every pair is scored (2e11 multiply-adds: seconds)
BLOCK_BYTES = 256 * 2**20        # scores held per block of the exact pass
NEIGHBOURS = 32                  # exact neighbours per sampled vector in the nprobe calibration
TARGET_RECALL = 0.99         # share of exact near-duplicate pairs the calibrated nprobe must find
CALIBRATION_QUERIES = 300
CALIBRATION_PAIRS = 200         # exact pairs the nprobe calibration wants to measure recall on
PENDING_PAIRS = 4_000_000        # pairs held before they are folded into the components


def check_threshold(threshold: float) -> float:
    """A cosine similarity in (0, 1]; anything else is an InputError saying so."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise InputError(f"threshold must be a number in (0, 1], got {threshold!r}") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise InputError(f"threshold must be a cosine similarity in (0, 1], got {threshold!r}")
    return value


def unit_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 rows scaled to length 1, mask of usable rows). A row that is zero or not finite is
    not usable (the earlier adapter stored unnormalised vectors, so scale is never assumed)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise InputError(f"expected a matrix of vectors, got shape {vectors.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))   # no N x D temporary (np.linalg.norm makes one)
    usable = np.isfinite(norms) & (norms > 1e-12)
    if usable.all() and np.allclose(norms, 1.0, atol=1e-4):
        return vectors, usable
    scaled = np.zeros_like(vectors)                          # one copy: the caller's rows are not rescaled
    for start in range(0, len(vectors), 65536):
        block = slice(start, start + 65536)
        ok = usable[block]
        scaled[block][ok] = vectors[block][ok] / norms[block][ok, None]
    return scaled, usable


# --------------------------------------------------------------------------------------
# Connected components, folded in as pairs arrive
# --------------------------------------------------------------------------------------
class Components:
    """Connected components of n nodes under pairs added in any number of batches, in bounded memory.

    Pairs wait in a list until PENDING_PAIRS have come; then scipy's connected_components runs on
    them plus the current grouping, which it keeps as one edge from each grouped node to its
    group's first node (at most n edges).
    """

    def __init__(self, n: int, pending_limit: int = PENDING_PAIRS):
        self.n = n
        self.pending_limit = pending_limit
        self._a: list[np.ndarray] = []
        self._b: list[np.ndarray] = []
        self._pending = 0
        self._star = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        self.pairs_seen = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        keep = a != b
        if not keep.any():
            return
        self._a.append(np.asarray(a[keep], np.int64))
        self._b.append(np.asarray(b[keep], np.int64))
        self._pending += int(keep.sum())
        self.pairs_seen += int(keep.sum())
        if self._pending >= self.pending_limit:
            self._fold()

    def _fold(self) -> np.ndarray:
        """Labels of every node; the pending pairs become star edges."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        a = np.concatenate([self._star[0], *self._a])
        b = np.concatenate([self._star[1], *self._b])
        self._a, self._b, self._pending = [], [], 0
        graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(self.n, self.n)).tocsr()
        count, labels = connected_components(graph, directed=False)
        first = np.full(count, self.n, np.int64)
        np.minimum.at(first, labels, np.arange(self.n, dtype=np.int64))
        grouped = np.flatnonzero(np.bincount(labels, minlength=count)[labels] > 1)
        heads = first[labels[grouped]]
        keep = grouped != heads
        self._star = (grouped[keep], heads[keep])
        return labels

    def groups(self, order: np.ndarray) -> list[np.ndarray]:
        """Node indices of each component of two or more, lowest `order` first (ties: lower index);
        groups sorted by their first member's order."""
        labels = self._fold()
        grouped = np.flatnonzero(np.bincount(labels, minlength=labels.max() + 1 if len(labels) else 0)[labels] > 1)
        if len(grouped) == 0:
            return []
        ranked = grouped[np.lexsort((grouped, order[grouped], labels[grouped]))]
        cuts = np.flatnonzero(np.diff(labels[ranked])) + 1
        groups = np.split(ranked, cuts)
        groups.sort(key=lambda g: (order[g[0]], g[0]))
        return groups


# --------------------------------------------------------------------------------------
# Finding the pairs
# --------------------------------------------------------------------------------------
def exact_pairs(x: np.ndarray, threshold: float, components: Components, *, progress: bool = False,
                block_bytes: int = BLOCK_BYTES) -> None:
    """Every pair (i < j) with x_i . x_j >= threshold: each block of rows against the rows from it on."""
    n = len(x)
    rows = max(16, min(4096, block_bytes // max(1, 4 * n)))
    with progress_bar(n, "comparing", unit="vec", enabled=progress) as bar:
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            scores = x[start:stop] @ x[start:].T                 # (b, n - start)
            i, j = np.nonzero(scores >= threshold)
            upper = j > i                                         # column j is row start + j
            components.add(i[upper] + start, j[upper] + start)
            bar.update(stop - start)


NPROBE_CHOICES = (1, 2, 3, 4, 6, 8)
QUERY_ROWS = 2048                # query rows per product in the partition join (fewer for crowded cells)


def partition(x: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """About sqrt(N) centroids of the rows (FAISS spherical k-means on a sample): the cells."""
    import faiss

    from .ann import TRAIN_POINTS_PER_LIST, choose_nlist

    nlist = choose_nlist(len(x))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(x), size=min(len(x), TRAIN_POINTS_PER_LIST * nlist), replace=False))
    kmeans = faiss.Kmeans(x.shape[1], nlist, niter=10, seed=seed, spherical=True, verbose=False)
    kmeans.train(np.ascontiguousarray(x[sample]))
    return kmeans.centroids


def nearest_cells(x: np.ndarray, centroids: np.ndarray, count: int, block: int = 32768) -> np.ndarray:
    """(N, count) int32: each row's `count` nearest cells, nearest first (column 0: its home cell)."""
    count = min(count, len(centroids))
    out = np.empty((len(x), count), dtype=np.int32)
    for start in range(0, len(x), block):
        scores = x[start:start + block] @ centroids.T
        top = np.argpartition(-scores, count - 1, axis=1)[:, :count] if count < len(centroids) else \
            np.tile(np.arange(len(centroids)), (len(scores), 1))
        ranked = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable"),
                                    axis=1)
        out[start:start + block] = ranked
    return out


def calibrate_nprobe(x: np.ndarray, cells: np.ndarray, threshold: float, *, k: int = NEIGHBOURS,
                     target: float = TARGET_RECALL, queries: int = CALIBRATION_QUERIES,
                     seed: int = 0) -> tuple[int, float, int]:
    """(nprobe, recall, pairs): the smallest number of cells each row is compared in that finds
    `target` of a sample's exact pairs at or above `threshold`. A pair (i, j) is found when j's home
    cell is among i's nprobe nearest cells, or i's among j's.

    When the sample has fewer than CALIBRATION_PAIRS such pairs (near-duplicates are rare), its
    nearest neighbours at or above a lower bar count too: they are further apart, so more often in
    different cells than the threshold's pairs, and an nprobe that finds them finds those.
    """
    from .exact import exact_search_batch

    rng = np.random.default_rng(seed + 1)
    sample = np.sort(rng.choice(len(x), size=min(len(x), queries), replace=False))
    q = np.ascontiguousarray(x[sample])
    k = min(k, len(x))
    truth_rows = exact_search_batch(x, q, k)
    truth_scores = np.einsum("qd,qkd->qk", q, x[truth_rows])
    bar = threshold
    while True:
        wanted = (truth_scores >= bar) & (truth_rows != sample[:, None])
        if wanted.sum() >= CALIBRATION_PAIRS or bar <= 0.5:
            break
        bar -= 0.02
    i = np.repeat(sample, wanted.sum(axis=1))
    j = truth_rows[wanted]
    if len(i) == 0:
        return 1, 1.0, 0
    home = cells[:, 0]
    nprobe, recall = cells.shape[1], 0.0
    for nprobe in [p for p in NPROBE_CHOICES if p < cells.shape[1]] + [cells.shape[1]]:
        found = (cells[i, :nprobe] == home[j, None]).any(axis=1) | (cells[j, :nprobe] == home[i, None]).any(axis=1)
        recall = float(found.mean())
        if recall >= target:
            break
    return nprobe, recall, len(i)


def partition_pairs(x: np.ndarray, threshold: float, components: Components, *, progress: bool = False,
                    nprobe: Optional[int] = None, stats: Optional[dict] = None) -> None:
    """Pairs at or above the threshold among rows that share a cell: each row is compared with the
    rows whose home cell is among its `nprobe` nearest cells, a cell at a time, as matrix products
    (BLAS, like the exact pass, instead of one query at a time). Scores are exact."""
    started = time.perf_counter()
    centroids = partition(x)
    cells = nearest_cells(x, centroids, max(NPROBE_CHOICES))
    partitioned = time.perf_counter()
    recall, sampled = None, None
    if nprobe is None:
        nprobe, recall, sampled = calibrate_nprobe(x, cells, threshold)
    nprobe = min(int(nprobe), cells.shape[1])
    calibrated = time.perf_counter()
    home = cells[:, 0]
    members = np.argsort(home, kind="stable")                  # rows by home cell
    member_bounds = np.searchsorted(home[members], np.arange(len(centroids) + 1))
    probing = cells[:, :nprobe].ravel()
    probers = np.argsort(probing, kind="stable")                # (row, probe) entries by cell
    prober_bounds = np.searchsorted(probing[probers], np.arange(len(centroids) + 1))
    probers //= nprobe                                          # entry -> row
    del probing
    compared = 0
    with progress_bar(len(centroids), "finding near-duplicates", unit="cell", enabled=progress) as bar:
        for cell in range(len(centroids)):
            inside = members[member_bounds[cell]:member_bounds[cell + 1]]
            queries = probers[prober_bounds[cell]:prober_bounds[cell + 1]]
            if len(inside) and len(queries):
                block = np.ascontiguousarray(x[inside].T)
                step = max(16, min(QUERY_ROWS, BLOCK_BYTES // (4 * len(inside))))   # a crowded cell: fewer rows
                for start in range(0, len(queries), step):
                    rows = queries[start:start + step]
                    i, j = np.nonzero(x[rows] @ block >= threshold)
                    components.add(rows[i], inside[j])
                compared += len(inside) * len(queries)
            bar.update(1)
    if stats is not None:
        stats.update({"cells": int(len(centroids)), "nprobe": int(nprobe), "calibrated_recall": recall,
                      "calibration_pairs": sampled, "compared_share": compared / max(1, len(x) ** 2),
                      "partition_s": partitioned - started, "calibrate_s": calibrated - partitioned,
                      "join_s": time.perf_counter() - calibrated})


# --------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------
@dataclass
class DuplicateGroups:
    groups: list[np.ndarray]      # row indices; each group's kept row first
    threshold: float
    method: str                   # 'exact' | 'cells'
    pairs: int                    # pairs at or above the threshold found (a pair may count twice in 'cells')
    seconds: float
    stats: dict = field(default_factory=dict)

    @property
    def members(self) -> int:
        return sum(len(g) for g in self.groups)


def find_duplicate_groups(vectors: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                          order: Optional[Sequence[int] | np.ndarray] = None, *, method: str = "auto",
                          exact_limit: int = EXACT_LIMIT, progress: bool = False) -> DuplicateGroups:
    """Near-duplicate groups of the rows of `vectors` (N, D): connected components of cosine >= threshold.

    `order` (N,) ranks the rows for keeping (lowest kept; ties: lower row), default the row order.
    `method`: 'exact' (every pair), 'cells' (pairs within nearby k-means cells) or 'auto' (exact up
    to `exact_limit` rows). Rows that are zero or not finite are in no group.
    """
    threshold = check_threshold(threshold)
    if method not in ("auto", "exact", "cells"):
        raise InputError(f"method must be 'auto', 'exact' or 'cells', got {method!r}")
    started = time.perf_counter()
    x, usable = unit_rows(vectors)
    n = len(x)
    order_arr = np.arange(n, dtype=np.int64) if order is None else np.asarray(order)
    if len(order_arr) != n:
        raise InputError(f"order has {len(order_arr)} entries for {n} vectors")
    if not usable.all():
        log.warning("%d vectors are zero or not finite: they are in no group", int((~usable).sum()))
    chosen = "exact" if method == "exact" or (method == "auto" and n <= exact_limit) else "cells"
    components = Components(n)
    stats: dict = {}
    if n >= 2:
        if chosen == "exact":
            exact_pairs(x, threshold, components, progress=progress)
        else:
            partition_pairs(x, threshold, components, progress=progress, stats=stats)
    groups = components.groups(order_arr)
    if not usable.all():
        groups = [g for g in (g[usable[g]] for g in groups) if len(g) > 1]
    return DuplicateGroups(groups, threshold, chosen, components.pairs_seen, time.perf_counter() - started, stats)
