"""Search a store: exact by default, FAISS IVF for large stores, filters, and query arithmetic.

- Exact search is one BLAS matrix-vector product over the store's contiguous matrix and a
  partial sort (`argpartition`) of the scores: no per-row Python, no SQLite rows parsed.
- ANN search uses a FAISS IVF-Flat index over the same rows (ids = matrix rows). IVF, not
  HNSW, because on the machines this runs on it builds ~10x faster, takes new rows and
  filters (an id bitmap) cheaply, and opens memory-mapped, so a cold search reads only the
  lists it probes. Its `nprobe` is calibrated at build time against exact search
  (docs/search.md has the measurements).
- Filters (subset, metadata conditions, path glob) become a row mask. A filtered ANN search
  that finds fewer than k results while k matching items exist falls back to exact search
  over the matching rows, so filters never silently shorten the result list; a filter that
  leaves few rows goes straight to exact search over just those rows.
- Queries: "dog + beach - people", weights "2:cat + dog", image terms "image:photo.jpg"
  (or any existing image file name), each term embedded once; the weighted sum is normalised.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from .errors import InputError
from .files import write_json_atomic
from .images import IMAGE_SUFFIXES
from .store import Condition, MatrixSnapshot, Store

if TYPE_CHECKING:
    from .embed import Embedder

log = logging.getLogger(__name__)

ANN_THRESHOLD = 100_000          # live items from which `auto` builds and uses the ANN index
ANN_TARGET_RECALL = 0.97         # recall@10 the calibration asks of nprobe (on hard queries)
NPROBE_CHOICES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TRAIN_POINTS_PER_LIST = 40       # k-means sample per IVF list (FAISS wants >= 39)
CALIBRATION_QUERIES = 64
CALIBRATION_NOISE = 1.0          # off-manifold push of the probe queries (text queries sit far from images)
REBUILD_GROWTH = 4.0             # retrain once the store is this many times larger than at training
GATHER_FRACTION = 0.25           # exact search over a mask below this density gathers the rows
ANN_STATE = "ann.json"
ANN_PREFIX = "ann-"
IMAGE_TERM_PREFIXES = ("image:", "img:")


# --------------------------------------------------------------------------------------
# Exact search
# --------------------------------------------------------------------------------------
def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first (a partial sort, then a sort of k)."""
    n = len(scores)
    if k <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.arange(n) if k >= n else np.argpartition(scores, n - k)[n - k:]
    return idx[np.argsort(-scores[idx], kind="stable")]


def exact_search(vectors: np.ndarray, query: np.ndarray, k: int,
                 allowed: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of the k rows of `vectors` (N, D) most similar to `query` (D,), best first.

    `allowed` (N,) bool restricts the rows; sparse masks gather their rows instead of scoring all.
    """
    query = np.ascontiguousarray(query, dtype=np.float32)
    if allowed is not None:
        chosen = int(np.count_nonzero(allowed))
        if chosen == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if chosen < GATHER_FRACTION * len(vectors):
            rows = np.flatnonzero(allowed)
            scores = vectors[rows] @ query                       # (m,)
            best = top_k(scores, k)
            return rows[best], scores[best]
    scores = vectors @ query                                     # (N,): the one BLAS product
    if allowed is not None:
        scores[~allowed] = -np.inf
    best = top_k(scores, k)
    best = best[np.isfinite(scores[best])]
    return best.astype(np.int64), scores[best]


def exact_search_batch(vectors: np.ndarray, queries: np.ndarray, k: int, allowed: Optional[np.ndarray] = None,
                       chunk: int = 131072) -> np.ndarray:
    """(Q, k) best rows for several queries at once, streaming the matrix in chunks (bounded memory)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_rows = np.full((len(queries), 0), -1, dtype=np.int64)
    best_scores = np.zeros((len(queries), 0), dtype=np.float32)
    for start in range(0, len(vectors), chunk):
        block = vectors[start:start + chunk] @ queries.T             # (c, Q)
        if allowed is not None:
            block[~allowed[start:start + chunk]] = -np.inf
        take = min(k, len(block))
        part = np.argpartition(block, len(block) - take, axis=0)[len(block) - take:].T  # (Q, take)
        scores = np.take_along_axis(block.T, part, axis=1)
        rows = np.concatenate([best_rows, part + start], axis=1)
        scores = np.concatenate([best_scores, scores], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_rows, best_scores = np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)
    return best_rows


# --------------------------------------------------------------------------------------
# The ANN index
# --------------------------------------------------------------------------------------
def choose_nlist(n: int) -> int:
    """About sqrt(n) lists (FAISS's rule of thumb), never fewer points than k-means needs."""
    return int(max(1, min(round(math.sqrt(n)), n // TRAIN_POINTS_PER_LIST, 65536)))


class AnnIndex:
    """FAISS IVF-Flat over a store's matrix rows, with its calibrated nprobe."""

    kind = "ivf-flat"

    def __init__(self, index: Any, rows: int, epoch: int, nprobe: int, trained_on: int,
                 recall: Optional[float] = None, build_seconds: Optional[float] = None, file: Optional[str] = None):
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
        return f"IVF-Flat, {self.nlist} lists, nprobe {self.nprobe}{recall}, {self.index.ntotal} vectors"

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
        index = faiss.index_factory(vectors.shape[1], f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
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
        """Smallest nprobe whose recall@k against exact search reaches `target`.

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
        for nprobe in [p for p in NPROBE_CHOICES if p < self.nlist] + [self.nlist]:
            found = self._search_many(queries, k, nprobe, None)[1]
            recall = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))
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

    def search(self, query: np.ndarray, k: int, allowed: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self._search_many(query.reshape(1, -1), k, self.nprobe, allowed)
        keep = rows[0] >= 0
        return rows[0][keep].astype(np.int64), scores[0][keep]

    # ---- files ---------------------------------------------------------------------------
    def save(self, data_dir: Path) -> None:
        """Index file under a new name, then the JSON that points at it (the atomic step)."""
        import faiss

        name = f"{ANN_PREFIX}{self.epoch}-{self.rows}-{os.getpid()}-{int(time.time() * 1000)}.faiss"
        tmp = data_dir / f".{name}.tmp"
        faiss.write_index(self.index, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, data_dir / name)
        self.file = name
        write_json_atomic(data_dir / ANN_STATE, {
            "kind": self.kind, "file": name, "rows": self.rows, "epoch": self.epoch, "nprobe": self.nprobe,
            "nlist": self.nlist, "trained_on": self.trained_on, "recall": self.recall,
            "build_seconds": self.build_seconds, "ntotal": int(self.index.ntotal)})
        for old in data_dir.glob(ANN_PREFIX + "*.faiss"):
            if old.name != name and _ann_state(data_dir).get("file") != old.name:
                with contextlib.suppress(OSError):
                    old.unlink()

    @classmethod
    def load(cls, data_dir: Path, *, writable: bool = False) -> Optional["AnnIndex"]:
        import faiss

        state = _ann_state(data_dir)
        path = data_dir / str(state.get("file", ""))
        if state.get("kind") != cls.kind or not path.is_file():
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
                   state.get("recall"), state.get("build_seconds"), file=state["file"])


def _ann_state(data_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((data_dir / ANN_STATE).read_text(encoding="utf-8"))
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def refresh_ann(store: Store, *, build: bool = False, threshold: int = ANN_THRESHOLD) -> Optional[str]:
    """Keep the store's ANN index current (end of an index run). Returns what it did, or None.

    Below `threshold` live items nothing is built (exact search is fast there) unless `build`;
    an index built on request is kept current from then on.
    """
    snapshot = store.snapshot()
    state = _ann_state(store.data_dir)
    if snapshot.n_live == 0 or (snapshot.n_live < threshold and not build and not state):
        return None
    stale = (build or state.get("epoch") != snapshot.state.epoch
             or snapshot.n_live > REBUILD_GROWTH * int(state.get("trained_on") or 0))
    if not stale:
        if int(state.get("rows", 0)) >= snapshot.rows:
            return f"ANN index up to date ({state.get('nlist')} lists, nprobe {state.get('nprobe')})"
        ann = AnnIndex.load(store.data_dir, writable=True)
        if ann is not None:
            added = ann.extend(snapshot)
            ann.save(store.data_dir)
            store.forget_search_index()
            return f"ANN index extended by {added} vectors ({ann.describe()})"
    ann = AnnIndex.build(snapshot)
    ann.save(store.data_dir)
    store.forget_search_index()
    return f"ANN index built in {ann.build_seconds:.1f} s: {ann.describe()}"


# --------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Term:
    weight: float   # signed
    kind: str       # 'text' | 'image'
    value: str      # the text, or the image path


_WEIGHTED = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*:\s*(.+?)\s*$", re.S)


def parse_query(text: str) -> list[Term]:
    """'dog + beach - people', '2:cat + dog', 'image:me.jpg + "party hat"' -> terms.

    `+`/`-` are operators only with spaces around them ("t-shirt" is one word); double
    quotes keep a term whole ("photo - 2.jpg").
    """
    terms = []
    for sign, raw in _split_terms(text):
        weight, body = 1.0, raw
        weighted = _WEIGHTED.match(raw)
        if weighted:
            weight, body = float(weighted.group(1)), weighted.group(2)
        kind, value = _term_kind(_unquote(body))
        terms.append(Term(sign * weight, kind, value))
    if not terms:
        raise InputError("empty query")
    return terms


def _split_terms(text: str) -> list[tuple[float, str]]:
    pieces: list[tuple[float, str]] = []
    sign, current, quoted = 1.0, [], False
    for i, ch in enumerate(text):
        is_operator = (not quoted and ch in "+-" and (i == 0 or text[i - 1].isspace())
                       and (i + 1 == len(text) or text[i + 1].isspace()))
        if is_operator:
            piece = "".join(current).strip()
            if piece:
                pieces.append((sign, piece))
            elif pieces:
                raise InputError(f"two operators in a row in the query {text!r}")
            sign, current = (1.0 if ch == "+" else -1.0), []
            continue
        if ch == '"':
            quoted = not quoted
        current.append(ch)
    if quoted:
        raise InputError(f"unbalanced double quote in the query {text!r}")
    piece = "".join(current).strip()
    if piece:
        pieces.append((sign, piece))
    elif text.strip():
        raise InputError(f"the query {text!r} ends with an operator")
    return pieces


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def _term_kind(text: str) -> tuple[str, str]:
    lowered = text.lower()
    for prefix in IMAGE_TERM_PREFIXES:
        if lowered.startswith(prefix):
            return "image", os.path.expanduser(_unquote(text[len(prefix):]))
    path = os.path.expanduser(text)
    if os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES and os.path.isfile(path):
        return "image", path
    return "text", text


def query_vector(terms: Sequence[Term], embedder: "Embedder") -> np.ndarray:
    """normalise(sum of weight * unit embedding of each term): (D,) float32."""
    texts = [t for t in terms if t.kind == "text"]
    images = [t for t in terms if t.kind == "image"]
    total = np.zeros(embedder.dim, dtype=np.float64)
    for group, embed, what in ((texts, embedder.embed_texts, "text"), (images, embedder.embed_images, "image")):
        if not group:
            continue
        result = embed([t.value for t in group])
        for i, term in enumerate(group):
            if i in result.errors:
                raise InputError(f"query {what} {term.value!r}: {result.errors[i]}")
            total += term.weight * result.vectors[i].astype(np.float64)
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise InputError("the query's terms cancel out (their weighted sum is zero)")
    return (total / norm).astype(np.float32)


# --------------------------------------------------------------------------------------
# The searcher
# --------------------------------------------------------------------------------------
@dataclass
class Filters:
    subsets: Sequence[str] = ()
    where: Sequence[str | Condition] = ()
    path_glob: Optional[str] = None
    min_score: Optional[float] = None

    def conditions(self) -> list[Condition]:
        return [c if isinstance(c, Condition) else Condition.parse(c) for c in self.where]

    @property
    def restricts_rows(self) -> bool:
        return bool(self.subsets or self.where or self.path_glob)


@dataclass
class Hit:
    rank: int
    score: float
    path: str
    item_id: int
    subset: Optional[str] = None
    caption: Optional[str] = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "score": round(self.score, 6), "rank": self.rank, "subset": self.subset,
                "caption": self.caption, "metadata": self.metadata}


@dataclass
class SearchResult:
    hits: list[Hit]
    method: str          # 'exact' | 'ann' | 'ann+exact' (ANN came up short; exact filled in)
    candidates: int      # items that passed the filters
    seconds: float


class Searcher:
    """Searches one store. `ann`: 'auto' (ANN for stores with a current index above the
    threshold), 'on' (always; builds the index if there is none) or 'off' (exact)."""

    def __init__(self, store: Store, *, ann: str = "auto", threshold: int = ANN_THRESHOLD):
        if ann not in ("auto", "on", "off"):
            raise InputError(f"ann must be 'auto', 'on' or 'off', got {ann!r}")
        self.store = store
        self.ann = ann
        self.threshold = threshold

    def search(self, query: np.ndarray, k: int = 10, filters: Optional[Filters] = None,
               ann: Optional[str] = None) -> SearchResult:
        started = time.perf_counter()
        filters = filters or Filters()
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
        if query.shape[0] != self.store.binding.dim:
            raise InputError(f"a {query.shape[0]}-d query for a {self.store.binding.dim}-d store")
        snapshot = self.store.snapshot()
        allowed = self._allowed(snapshot, filters)
        candidates = snapshot.n_live if allowed is None else int(np.count_nonzero(allowed))
        index = self._index(snapshot, ann or self.ann)
        if index is None or candidates <= max(k, index.expected_scan):
            rows, scores = exact_search(snapshot.vectors, query, k, allowed)
            method = "exact"
        else:
            rows, scores = self._ann_search(index, snapshot, query, k, allowed)
            method = "ann"
            enough = min(k, candidates)
            if filters.min_score is not None:
                enough = k  # below k above the bar may be the index's miss: let exact decide
                passing = int(np.count_nonzero(scores >= filters.min_score))
            else:
                passing = len(rows)
            if passing < enough:
                rows, scores = exact_search(snapshot.vectors, query, k, allowed)
                method = "ann+exact"
        if filters.min_score is not None:
            keep = scores >= filters.min_score
            rows, scores = rows[keep], scores[keep]
        hits = self._hits(snapshot, rows, scores)
        return SearchResult(hits, method, candidates, time.perf_counter() - started)

    # ---- pieces --------------------------------------------------------------------------
    def _allowed(self, snapshot: MatrixSnapshot, filters: Filters) -> Optional[np.ndarray]:
        """Row mask of live items passing the filters; None when every row qualifies."""
        if not filters.restricts_rows:
            return None if snapshot.all_live else snapshot.live
        rows = self.store.rows_matching(subsets=list(filters.subsets), where=filters.conditions(),
                                        path_glob=filters.path_glob)
        allowed = np.zeros(snapshot.rows, dtype=bool)
        allowed[rows[rows < snapshot.rows]] = True
        allowed &= snapshot.live
        return allowed

    def _index(self, snapshot: MatrixSnapshot, mode: str) -> Optional[AnnIndex]:
        if mode == "off" or snapshot.n_live == 0:
            return None
        if mode == "auto" and snapshot.n_live < self.threshold:
            return None
        state = _ann_state(self.store.data_dir)
        index: Optional[AnnIndex] = self.store.cached_search_index(state.get("file"))
        if index is None:
            index = AnnIndex.load(self.store.data_dir)
            if index is not None:
                self.store.keep_search_index(index.file, index)
        if index is not None and index.epoch != snapshot.state.epoch:
            index = None  # rows were renumbered since (compaction): the index no longer fits
        if index is None and mode == "on":
            index = AnnIndex.build(snapshot)
            with contextlib.suppress(OSError):
                index.save(self.store.data_dir)
            self.store.keep_search_index(index.file, index)
        return index

    @staticmethod
    def _ann_search(index: AnnIndex, snapshot: MatrixSnapshot, query: np.ndarray, k: int,
                    allowed: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """ANN over the rows the index covers, exact over rows appended since, merged."""
        covered = min(index.rows, snapshot.rows)
        rows, scores = index.search(query, k, allowed)
        keep = rows < covered
        rows, scores = rows[keep], scores[keep]
        if covered < snapshot.rows:
            tail_allowed = None if allowed is None else allowed[covered:]
            tail_rows, tail_scores = exact_search(snapshot.vectors[covered:], query, k, tail_allowed)
            rows = np.concatenate([rows, tail_rows + covered])
            scores = np.concatenate([scores, tail_scores])
            best = top_k(scores, k)
            rows, scores = rows[best], scores[best]
        return rows, scores

    def _hits(self, snapshot: MatrixSnapshot, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
        ids = snapshot.ids[rows]
        records = self.store.items(ids.tolist())
        hits = []
        for row, item_id, score in zip(rows.tolist(), ids.tolist(), scores.tolist()):
            record = records.get(item_id)
            if record is None or record.row != row:
                continue  # changed or removed after the snapshot was taken
            hits.append(Hit(len(hits) + 1, float(score), record.path, record.id, record.subset, record.caption,
                            record.metadata))
        return hits


def search_store(store: Store, embedder: "Embedder", query: str, k: int = 10,
                 filters: Optional[Filters] = None, ann: str = "auto") -> SearchResult:
    """Parse, embed and run one query (the library's one-call form)."""
    return Searcher(store, ann=ann).search(query_vector(parse_query(query), embedder), k, filters)
