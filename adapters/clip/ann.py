"""The ANN index of a store: FAISS IVF over the store's matrix rows (ids = rows), kept in the
store's data folder beside `ann.json`, which records its checksum and the file's stamps.

The index is a first pass only: its vectors are 8-bit scalar-quantized (IVF-SQ8, a quarter of the
bytes of IVF-Flat to scan and to store), it proposes `candidates(k)` rows, and those are re-scored
exactly from the matrix (`rescore`), so every score a search shows is the true cosine and FAISS's
own scores are never shown. nprobe is calibrated at build time for the recall that pipeline reaches
against exact search. IVF, not HNSW, because on the machines this runs on it builds ~10x faster,
takes new rows and filters (an id bitmap) cheaply, and opens memory-mapped, so a cold search reads
only the lists it probes (docs/search.md has the measurements).

Trust: a search checks the file's size and mtime against `ann.json` (a stat), and on a mismatch its
checksum; a file that is missing or fails is not used (the search is exact, and says so). `check`
verifies the checksum, `check --repair` and the next `index` (`refresh_ann`) rebuild the index.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import InputError
from .exact import exact_search_batch, top_k
from .files import content_hash, write_json_atomic
from .matrix import MatrixSnapshot
from .store import Store

log = logging.getLogger(__name__)

ANN_THRESHOLD = 100_000          # live items from which `auto` builds and uses the ANN index
ANN_TARGET_RECALL = 0.96         # recall@10 the calibration asks of nprobe (on hard queries; users need 0.95)
NPROBE_CHOICES = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
RERANK_FACTOR = 4                # the first pass proposes 4k rows (at least RERANK_MIN); the matrix ranks them
RERANK_MIN = 40
TRAIN_POINTS_PER_LIST = 40       # k-means sample per IVF list (FAISS wants >= 39)
CALIBRATION_QUERIES = 128
CALIBRATION_NOISE = 1.0          # off-manifold push of the probe queries (text queries sit far from images)
REBUILD_GROWTH = 4.0             # retrain once the store is this many times larger than at training
ANN_STATE = "ann.json"
ANN_PREFIX = "ann-"
ANN_KIND = "ivf-sq8"
LEGACY_KINDS = ("ivf-flat",)      # read (re-scored like any first pass); the next index run rebuilds them


def candidates(k: int) -> int:
    """How many rows the first pass proposes for a top k: enough that quantization error rarely
    pushes a true neighbour out before the exact re-scoring."""
    return max(RERANK_FACTOR * k, RERANK_MIN)


def rescore(vectors: np.ndarray, query: np.ndarray, rows: np.ndarray, k: int,
            allowed: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best of `rows` by their exact score against `query` from the matrix, best first.

    Rows that are not in the matrix, repeated, or outside `allowed` are dropped first: an index file
    that is damaged but still parses cannot put a wrong row or a wrong score in front of anyone.
    """
    rows = np.unique(rows[(rows >= 0) & (rows < len(vectors))])
    if allowed is not None:
        rows = rows[allowed[rows]]
    scores = vectors[rows] @ np.ascontiguousarray(query, dtype=np.float32)
    best = top_k(scores, k)
    return rows[best].astype(np.int64), scores[best]


def choose_nlist(n: int) -> int:
    """About sqrt(n) lists (FAISS's rule of thumb), never fewer points than k-means needs."""
    return int(max(1, min(round(math.sqrt(n)), n // TRAIN_POINTS_PER_LIST, 65536)))


class AnnIndex:
    """FAISS IVF-SQ8 over a store's matrix rows, with its calibrated nprobe (a first pass: see `rescore`)."""

    def __init__(self, index: Any, rows: int, epoch: int, nprobe: int, trained_on: int,
                 recall: Optional[float] = None, build_seconds: Optional[float] = None, file: Optional[str] = None,
                 kind: str = ANN_KIND):
        self.kind = kind
        self.index = index
        self.rows = rows              # matrix rows [0, rows) are in the index (dead ones filtered at search)
        self.epoch = epoch
        self.nprobe = nprobe
        self.trained_on = trained_on
        self.recall = recall
        self.build_seconds = build_seconds
        self.file = file

    @property
    def nlist(self) -> int:
        return int(self.index.nlist)

    @property
    def expected_scan(self) -> float:
        """Vectors one search compares with: about rows * nprobe / nlist."""
        return self.rows * min(1.0, self.nprobe / max(1, self.nlist))

    def describe(self) -> str:
        recall = f", calibrated recall@10 {self.recall:.3f}" if self.recall is not None else ""
        first = "IVF-SQ8 first pass re-scored from the matrix" if self.kind == ANN_KIND else "IVF-Flat"
        return f"{first}, {self.nlist} lists, nprobe {self.nprobe}{recall}, {self.index.ntotal} vectors"

    # ---- building ------------------------------------------------------------------------
    @classmethod
    def build(cls, snapshot: MatrixSnapshot, *, nlist: Optional[int] = None, seed: int = 0,
              target_recall: float = ANN_TARGET_RECALL) -> "AnnIndex":
        import faiss

        started = time.perf_counter()
        live_rows = np.flatnonzero(snapshot.live).astype(np.int64)
        if len(live_rows) == 0:
            raise InputError("cannot build an ANN index over an empty store")
        vectors = snapshot.vectors
        nlist = nlist or choose_nlist(len(live_rows))
        index = faiss.index_factory(vectors.shape[1], f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(live_rows, size=min(len(live_rows), TRAIN_POINTS_PER_LIST * nlist),
                                    replace=False))
        index.train(np.ascontiguousarray(vectors[sample]))
        for start in range(0, len(live_rows), 65536):
            chunk = live_rows[start:start + 65536]
            index.add_with_ids(np.ascontiguousarray(vectors[chunk]), chunk)
        ann = cls(index, snapshot.rows, snapshot.state.epoch, nprobe=1, trained_on=len(live_rows))
        ann.nprobe, ann.recall = ann.calibrate(snapshot, target_recall, seed=seed)
        ann.build_seconds = time.perf_counter() - started
        return ann

    def calibrate(self, snapshot: MatrixSnapshot, target: float, *, k: int = 10, seed: int = 0) -> tuple[int, float]:
        """Smallest nprobe whose recall@k against exact search reaches `target`, measured on what a
        search shows: the first pass's candidates re-scored from the matrix.

        The probe queries are midpoints of two random stored vectors: their neighbours straddle
        clusters, which is harder for IVF than a stored vector's own neighbourhood.
        """
        rng = np.random.default_rng(seed + 1)
        live_rows = np.flatnonzero(snapshot.live)
        a = rng.choice(live_rows, CALIBRATION_QUERIES)
        b = rng.choice(live_rows, CALIBRATION_QUERIES)
        queries = snapshot.vectors[a] + snapshot.vectors[b]
        queries /= np.linalg.norm(queries, axis=1, keepdims=True) + 1e-12
        noise = rng.standard_normal(queries.shape).astype(np.float32)
        queries += CALIBRATION_NOISE * noise / np.linalg.norm(noise, axis=1, keepdims=True)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        k = min(k, len(live_rows))
        truth = exact_search_batch(snapshot.vectors, queries, k, None if snapshot.all_live else snapshot.live)
        recall = 0.0
        live = None if snapshot.all_live else snapshot.live
        for nprobe in [p for p in NPROBE_CHOICES if p < self.nlist] + [self.nlist]:
            proposed = self._search_many(queries, candidates(k), nprobe, live)[1]
            found = [rescore(snapshot.vectors, q, rows, k, live)[0] for q, rows in zip(queries, proposed)]
            recall = float(np.mean([len(set(f.tolist()) & set(t)) / k for f, t in zip(found, truth)]))
            if recall >= target:
                return nprobe, recall
        return self.nlist, recall

    def extend(self, snapshot: MatrixSnapshot) -> int:
        """Add the live rows appended since this index was built. Returns how many."""
        new_rows = (np.arange(self.rows, snapshot.rows)[snapshot.live[self.rows:]]).astype(np.int64)
        for start in range(0, len(new_rows), 65536):
            chunk = new_rows[start:start + 65536]
            self.index.add_with_ids(np.ascontiguousarray(snapshot.vectors[chunk]), chunk)
        self.rows = snapshot.rows
        return len(new_rows)

    # ---- searching -----------------------------------------------------------------------
    def _search_many(self, queries: np.ndarray, k: int, nprobe: int,
                     allowed: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        params = faiss.SearchParametersIVF()
        params.nprobe = int(nprobe)
        if allowed is not None:
            bitmap = np.packbits(allowed[:self.rows], bitorder="little")
            selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
            params.sel = selector  # `bitmap` and `selector` stay referenced until the search returns
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        return scores, rows

    def propose(self, query: np.ndarray, k: int, allowed: Optional[np.ndarray]) -> np.ndarray:
        """The first pass: `candidates(k)` rows likely to hold the k nearest (unordered, unscored:
        FAISS's scores are approximate and are never shown; `rescore` ranks the rows)."""
        rows = self._search_many(query.reshape(1, -1), candidates(k), self.nprobe, allowed)[1][0]
        return rows[rows >= 0].astype(np.int64)

    def search(self, vectors: np.ndarray, query: np.ndarray, k: int,
               allowed: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(rows, exact scores) of the k best rows the index finds, re-scored from `vectors` (the matrix)."""
        return rescore(vectors, query, self.propose(query, k, allowed), k, allowed)

    # ---- files ---------------------------------------------------------------------------
    def save(self, data_dir: Path) -> None:
        """Index file under a new name, then the JSON that points at it (the atomic step)."""
        import faiss

        name = f"{ANN_PREFIX}{self.epoch}-{self.rows}-{os.getpid()}-{int(time.time() * 1000)}.faiss"
        tmp = data_dir / f".{name}.tmp"
        faiss.write_index(self.index, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        checksum = content_hash(tmp)
        os.replace(tmp, data_dir / name)
        stat = (data_dir / name).stat()
        self.file = name
        write_json_atomic(data_dir / ANN_STATE, {
            "kind": self.kind, "file": name, "rows": self.rows, "epoch": self.epoch, "nprobe": self.nprobe,
            "nlist": self.nlist, "trained_on": self.trained_on, "recall": self.recall,
            "build_seconds": self.build_seconds, "ntotal": int(self.index.ntotal),
            "checksum": checksum, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        for old in data_dir.glob(ANN_PREFIX + "*.faiss"):
            if old.name != name and ann_state(data_dir).get("file") != old.name:
                with contextlib.suppress(OSError):
                    old.unlink()

    @classmethod
    def load(cls, data_dir: Path, *, writable: bool = False, checked: bool = False) -> Optional["AnnIndex"]:
        """The index `ann.json` names, or None when there is none or it fails `ann_problem`
        (`checked`: the caller has just asked `ann_problem` itself)."""
        import faiss

        state = ann_state(data_dir)
        path = data_dir / str(state.get("file", ""))
        if state.get("kind") not in (ANN_KIND, *LEGACY_KINDS):
            return None
        if not checked and ann_problem(data_dir, state) is not None:
            return None
        try:
            # memory-mapped: a cold search reads the lists it probes, not the whole index
            index = faiss.read_index(str(path), 0 if writable else faiss.IO_FLAG_MMAP)
        except RuntimeError as exc:
            log.warning("ignoring unreadable ANN index %s: %s", path, exc)
            return None
        if int(index.ntotal) != int(state.get("ntotal", -1)):
            return None
        return cls(index, int(state["rows"]), int(state["epoch"]), int(state["nprobe"]), int(state["trained_on"]),
                   state.get("recall"), state.get("build_seconds"), file=state["file"], kind=state["kind"])


def ann_state(data_dir: Path) -> dict[str, Any]:
    """What `ann.json` in a data folder says about its index ({} when there is none or it is unreadable)."""
    try:
        state = json.loads((data_dir / ANN_STATE).read_text(encoding="utf-8"))
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def ann_problem(data_dir: Path, state: Optional[dict[str, Any]] = None, *, verify: bool = False) -> Optional[str]:
    """What is wrong with the index file `ann.json` names (None: nothing, or no index at all).

    Cheap by default (a stat: the size and mtime recorded when it was written); the checksum is
    read when those differ (a copy) or with `verify` (`check`). An index written before checksums
    were recorded passes (the next index run replaces it).
    """
    state = ann_state(data_dir) if state is None else state
    if not state:
        return None
    path = data_dir / str(state.get("file", ""))
    try:
        stat = path.stat()
    except OSError:
        return f"file {path.name or '(none named)'} is missing"
    recorded = state.get("checksum")
    if recorded is None:
        return None
    if verify or (stat.st_size, stat.st_mtime_ns) != (state.get("size"), state.get("mtime_ns")):
        try:
            if content_hash(path) != recorded:
                return f"file {path.name} does not match its checksum (damaged or replaced)"
        except OSError as exc:
            return f"file {path.name} cannot be read ({exc.strerror or exc})"
    return None


def rebuild_ann(store: Store) -> "AnnIndex":
    """Build the store's ANN index afresh from its matrix and save it (the old file is removed)."""
    ann = AnnIndex.build(store.snapshot())
    ann.save(store.data_dir)
    store.forget_search_index()
    return ann


def refresh_ann(store: Store, *, build: bool = False, threshold: int = ANN_THRESHOLD) -> Optional[str]:
    """Keep the store's ANN index current (end of an index run). Returns what it did, or None.

    Below `threshold` live items nothing is built (exact search is fast there) unless `build`;
    an index built on request is kept current from then on.
    """
    snapshot = store.snapshot()
    state = ann_state(store.data_dir)
    if snapshot.n_live == 0 or (snapshot.n_live < threshold and not build and not state):
        return None
    problem = ann_problem(store.data_dir, state)
    stale = (build or problem is not None or state.get("kind") != ANN_KIND
             or state.get("epoch") != snapshot.state.epoch
             or snapshot.n_live > REBUILD_GROWTH * int(state.get("trained_on") or 0))
    if not stale:
        if int(state.get("rows", 0)) >= snapshot.rows:
            return f"ANN index up to date ({state.get('nlist')} lists, nprobe {state.get('nprobe')})"
        ann = AnnIndex.load(store.data_dir, writable=True, checked=True)  # ann_problem found nothing above
        if ann is not None:
            added = ann.extend(snapshot)
            ann.save(store.data_dir)
            store.forget_search_index()
            return f"ANN index extended by {added} vectors ({ann.describe()})"
    ann = rebuild_ann(store)
    why = f" (the previous index {problem})" if problem and state else ""
    return f"ANN index built in {ann.build_seconds:.1f} s{why}: {ann.describe()}"
