"""Diverse samples: greedy k-center (farthest point first) over a matrix of embeddings.

Each pick is the vector farthest (cosine distance, 1 - cosine) from everything picked so far and
from the `exclude` vectors (items already labelled or chosen), so the sample spreads over the whole
selection: a cluster of 3 among clusters of 50 gets its pick as soon as it is the farthest thing
left, which random sampling gives it with probability 3/total per draw. Gonzalez's greedy is within
a factor 2 of the smallest possible covering radius.

Deterministic: the first pick (without `exclude`) is the vector closest to the selection's mean
direction, and every tie goes to the lowest row, so the same rows in the same order give the same
sample. The caller fixes the row order (the platform function sorts by item id).

Cost: one matrix-vector product over the selection per pick (N x D reads, memory-bound) and two
arrays of N floats; the `exclude` vectors cost N x |exclude| products once, in blocks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
from threadpoolctl import threadpool_limits

from .duplicates import unit_rows
from .errors import InputError
from .progress import progress_bar

EXCLUDE_BLOCK = 1024          # exclude vectors per product block
ROW_BLOCK = 65536             # rows per block where a product would be N x EXCLUDE_BLOCK


@dataclass
class DiverseSample:
    picks: np.ndarray         # row indices, in pick order
    radius: float             # largest cosine distance from a usable row to its nearest pick (or excluded vector)
    seconds: float

    def to_list(self) -> list[int]:
        return [int(i) for i in self.picks]


def check_sample_size(n: int, available: Optional[int] = None) -> int:
    """n as an int in [1, available] (no upper bound when `available` is None); an InputError saying why otherwise."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        else:
            raise InputError(f"n must be a whole number of items, got {n!r}")
    if n < 1:
        raise InputError(f"n must be at least 1, got {n}")
    if available is not None and n > available:
        raise InputError(f"n={n} is larger than the {available} selected items that have a vector")
    return int(n)


def nearest_centre(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((N,) cosine distance of each row of x to its nearest row of `centres`, (N,) which one);
    (inf, -1) everywhere when there are no centres. Both are unit rows; blocks bound the memory."""
    best = np.full(len(x), -np.inf, dtype=np.float32)
    which = np.full(len(x), -1, dtype=np.int64)
    for c in range(0, len(centres), EXCLUDE_BLOCK):
        block = np.ascontiguousarray(centres[c:c + EXCLUDE_BLOCK].T)
        for r in range(0, len(x), ROW_BLOCK):
            scores = x[r:r + ROW_BLOCK] @ block
            top = scores.argmax(axis=1)
            value = scores[np.arange(len(top)), top]
            better = value > best[r:r + ROW_BLOCK]
            best[r:r + ROW_BLOCK][better] = value[better]
            which[r:r + ROW_BLOCK][better] = top[better] + c
    return (1.0 - best).astype(np.float32), which


def diverse_sample(vectors: np.ndarray, n: int, *, exclude: Optional[np.ndarray] = None,
                   progress: bool = False) -> DiverseSample:
    """Pick `n` rows of `vectors` (N, D) by greedy k-center; `exclude` (M, D) are centres already
    taken (never picked, and the sample keeps away from them). Rows that are zero or not finite are
    never picked and not counted in the radius.

    Lazy evaluation (exact, not an approximation): a row's distance to its nearest centre only
    shrinks as centres are added, so a distance computed against the first centres is an upper
    bound later. Each pick rescores only the CANDIDATES rows with the largest bounds against the
    centres added since they were last scored; when the best of them is at least every other row's
    bound, it is the farthest row. One pass over the whole matrix at the start, then a few thousand
    rows per pick instead of all N.
    """
    started = time.perf_counter()
    x, usable = unit_rows(vectors)
    n = check_sample_size(n, int(usable.sum()))
    excluded = np.zeros((0, x.shape[1]), dtype=np.float32)
    if exclude is not None and len(exclude):
        extra, ok = unit_rows(exclude)
        if extra.shape[1] != x.shape[1]:
            raise InputError(f"exclude vectors are {extra.shape[1]}-d, the selection's {x.shape[1]}-d")
        excluded = extra[ok]
    state = _Greedy(x, usable, n)
    if len(excluded):
        state.bound = np.where(usable, nearest_centre(x, excluded)[0], -np.inf).astype(np.float32)
    # One BLAS thread: the products here are a few thousand rows, where a second thread costs more
    # in synchronisation than it saves (100k rows, 300 picks on the loaded 2-core box: 6 s vs 42 s).
    with threadpool_limits(1, user_api="blas"), progress_bar(n, "picking", unit="item", enabled=progress) as bar:
        if not len(excluded):
            state.take(state.nearest_mean())
            bar.update(1)
        while state.count < n:
            state.take(state.farthest())
            bar.update(1)
        # The radius is the next pick's distance: the farthest row, its bound made exact.
        radius = float(max(0.0, state.bound[state.farthest()])) if np.isfinite(state.bound).any() else 0.0
    return DiverseSample(state.picks, radius, time.perf_counter() - started)


CANDIDATES = 4096


class _Greedy:
    """Per row an upper bound of its distance to the nearest centre (exact as of `stamp` picks);
    the picks so far."""

    def __init__(self, x: np.ndarray, usable: np.ndarray, n: int):
        self.x = x
        self.usable = usable
        self.bound = np.where(usable, np.inf, -np.inf).astype(np.float32)
        self.stamp = np.zeros(len(x), dtype=np.int64)   # picks each row's bound accounts for
        self.picks = np.empty(n, dtype=np.int64)
        self.count = 0

    def nearest_mean(self) -> int:
        """The first pick without excluded centres: the row nearest the selection's mean direction."""
        mean = self.usable.astype(np.float32) @ self.x             # no copy of the usable rows
        scores = self.x @ (mean / max(float(np.linalg.norm(mean)), 1e-12))
        scores[~self.usable] = -np.inf
        return int(np.argmax(scores))

    def take(self, row: int) -> None:
        self.picks[self.count] = row
        self.count += 1
        if self.count == 1 and np.isinf(self.bound[self.usable]).any():   # nothing scored yet: everything
            np.minimum(self.bound, 1.0 - self.x @ self.x[row], out=self.bound)
            self.stamp[:] = self.count
        self.bound[row] = -np.inf                       # never again

    def farthest(self) -> int:
        """The row farthest from every centre (ties: the lowest row), rescoring only the top bounds."""
        size = min(CANDIDATES, len(self.x))
        while True:
            if size >= len(self.x):
                rows, rest = np.arange(len(self.x)), -np.inf
            else:
                split = np.argpartition(self.bound, len(self.x) - size)
                rows = split[len(self.x) - size:]
                rest = float(self.bound[split[:len(self.x) - size]].max())
            self._rescore(rows)
            best = rows[np.lexsort((rows, -self.bound[rows]))[0]]
            if self.bound[best] > rest or size >= len(self.x):
                return int(best)
            size *= 4                                   # a tie or a lucky bound outside: look wider

    def _rescore(self, rows: np.ndarray) -> None:
        stale = rows[(self.stamp[rows] < self.count) & np.isfinite(self.bound[rows])]
        if len(stale) == 0:
            return
        # Against the centres each row has not seen, in buckets by age (1, 2, 3-4, 5-8, ... picks),
        # so a row scored at the last pick meets one centre, not the oldest row's hundreds.
        age = self.count - self.stamp[stale]
        bucket = np.ceil(np.log2(age)).astype(np.int64)
        for b in np.unique(bucket):
            group = stale[bucket == b]
            centres = self.x[self.picks[max(0, self.count - (1 << int(b))):self.count]]
            nearest = (self.x[group] @ centres.T).max(axis=1)
            self.bound[group] = np.minimum(self.bound[group], 1.0 - nearest)
        self.stamp[stale] = self.count


def covering_radius(vectors: np.ndarray, picks: np.ndarray, *, exclude: Optional[np.ndarray] = None) -> float:
    """Largest cosine distance from a usable row to its nearest pick (or excluded vector): how well
    a sample covers the rows (what a random sample is compared on)."""
    x, usable = unit_rows(vectors)
    centres = x[np.asarray(picks, dtype=np.int64)]
    if exclude is not None and len(exclude):
        extra, ok = unit_rows(exclude)
        centres = np.concatenate([centres, extra[ok]])
    distance, _ = nearest_centre(x, centres)
    distance = distance[usable]
    return float(max(0.0, distance.max())) if len(distance) else 0.0
