"""Search a store: exact by default, the ANN index for large stores, filters, and query arithmetic.

- Exact search (exact.py) scores the store's contiguous matrix with one BLAS product.
- The ANN index (ann.py) is a FAISS IVF over the same rows, used for large stores: its hits are
  re-scored from the matrix, so every score shown is exact; an index file that is missing or
  fails its check is not used (exact search, with a warning naming the repair).
- Filters (subset, metadata conditions, path glob) become a row mask. A filtered ANN search
  that finds fewer than k results while k matching items exist falls back to exact search
  over the matching rows, so filters never silently shorten the result list; a filter that
  leaves few rows goes straight to exact search over just those rows.
- Queries: "dog + beach - people", weights "2:cat + dog", image terms "image:photo.jpg"
  (or any existing image file name), each term embedded once; the weighted sum is normalised.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from .ann import ANN_THRESHOLD, AnnIndex, ann_problem, ann_state
from .errors import InputError
from .exact import exact_search, top_k
from .images import IMAGE_SUFFIXES, OTHER_IMAGE_SUFFIXES, supported_types
from .filters import Condition
from .matrix import MatrixSnapshot
from .store import Store, repair_hint

if TYPE_CHECKING:
    from .embed import Embedder

IMAGE_TERM_PREFIXES = ("image:", "img:")


# --------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Term:
    weight: float   # signed
    kind: str       # 'text' | 'image'
    value: str      # the text, or the image path


_WEIGHTED = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*:\s*(.+?)\s*$", re.S)


def parse_query(text: str, *, images: bool = True) -> list[Term]:
    """'dog + beach - people', '2:cat + dog', 'image:me.jpg + "party hat"' -> terms.

    `+`/`-` are operators only with spaces around them ("t-shirt" is one word); double
    quotes keep a term whole ("photo - 2.jpg"). A term naming an existing image file is an image
    term; one that looks like an image path but names no file is an error (a typo must not
    quietly become a text search). images=False reads every term as text (`search --text`).
    """
    terms = []
    for sign, raw in _split_terms(text):
        weight, body = 1.0, raw
        weighted = _WEIGHTED.match(raw)
        if weighted:
            weight, body = float(weighted.group(1)), weighted.group(2)
        kind, value = _term_kind(_unquote(body)) if images else ("text", _unquote(body))
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
    if looks_like_image_path(text):
        if os.path.isfile(path):  # a photo of a kind that cannot be read here (HEIC, a camera's RAW)
            raise InputError(f"{text}: not a supported image type (supported: {supported_types()}); "
                             f"add --text to search for these words as text")
        raise InputError(f"{text}: no such image file (to search for these words as text, add --text)")
    return "text", text


def looks_like_image_path(text: str) -> bool:
    """'~/x/qeury.jpg', 'IMG_0003.HEIC', './a b.png': an image file name, maybe with folders (not 'a dog')."""
    stem, suffix = os.path.splitext(text.strip())
    if suffix.lower() not in IMAGE_SUFFIXES | OTHER_IMAGE_SUFFIXES or not stem:
        return False
    return "/" in text or os.sep in text or text.startswith("~") or not any(c.isspace() for c in text.strip())


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
    warnings: list[str] = field(default_factory=list)  # e.g. a --where key that no item has
    best_score: Optional[float] = None  # the top score before `min_score` cut (why nothing passed it)


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
        notes: list[str] = []
        index = self._index(snapshot, ann or self.ann, notes)
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
        best_score = float(scores.max()) if len(scores) else None
        if filters.min_score is not None:
            keep = scores >= filters.min_score
            rows, scores = rows[keep], scores[keep]
        hits = self._hits(snapshot, rows, scores, notes)
        warnings = notes + (self._unknown_keys(filters) if candidates == 0 and filters.where else [])
        return SearchResult(hits, method, candidates, time.perf_counter() - started, warnings, best_score)

    def _unknown_keys(self, filters: Filters) -> list[str]:
        """Why nothing matched, when the reason is a key no item has (a typo, or never indexed)."""
        missing = self.store.keys_missing([c for c in filters.conditions() if c.value is not None])
        if not missing:
            return []
        known = self.store.metadata_keys()
        lines = []
        for key in missing:
            close = difflib.get_close_matches(key, known, n=1)
            hint = (f"; did you mean {close[0]!r}?" if close else
                    f"; keys in this store: {', '.join(known[:12])}" if known else "; no item has any metadata")
            lines.append(f"no item has the metadata key {key!r}{hint}")
        return lines

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

    def _index(self, snapshot: MatrixSnapshot, mode: str, notes: list[str]) -> Optional[AnnIndex]:
        if mode == "off" or snapshot.n_live == 0:
            return None
        if mode == "auto" and snapshot.n_live < self.threshold:
            return None
        state = ann_state(self.store.data_dir)
        index: Optional[AnnIndex] = self.store.cached_search_index(state.get("file"))
        if index is None and state:
            problem = ann_problem(self.store.data_dir, state)
            if problem is not None:
                notes.append(f"the ANN index {problem}: searched exactly instead (slower); the next `index` "
                             f"rebuilds it, or {repair_hint(self.store.root)}")
                return None
        if index is None:
            index = AnnIndex.load(self.store.data_dir, checked=bool(state))
            if index is not None:
                self.store.keep_search_index(index.file, index)
        if index is not None and index.epoch != snapshot.state.epoch:
            index = None  # rows were renumbered since (compaction): the index no longer fits
        if index is None and mode == "on":
            index = AnnIndex.build(snapshot)
            if not self.store.readonly:
                with contextlib.suppress(OSError):
                    index.save(self.store.data_dir)
            self.store.keep_search_index(index.file, index)
        return index

    @staticmethod
    def _ann_search(index: AnnIndex, snapshot: MatrixSnapshot, query: np.ndarray, k: int,
                    allowed: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """ANN over the rows the index covers (re-scored from the matrix), exact over rows appended
        since, merged."""
        covered = min(index.rows, snapshot.rows)
        rows, scores = index.search(snapshot.vectors[:covered], query, k, allowed)
        if covered < snapshot.rows:
            tail_allowed = None if allowed is None else allowed[covered:]
            tail_rows, tail_scores = exact_search(snapshot.vectors[covered:], query, k, tail_allowed)
            rows = np.concatenate([rows, tail_rows + covered])
            scores = np.concatenate([scores, tail_scores])
            best = top_k(scores, k)
            rows, scores = rows[best], scores[best]
        return rows, scores

    def _hits(self, snapshot: MatrixSnapshot, rows: np.ndarray, scores: np.ndarray,
              notes: Optional[list[str]] = None) -> list[Hit]:
        ids = snapshot.ids[rows]
        records = self.store.items(ids.tolist())
        damaged = [r.path for r in records.values() if r.vector_bytes != self.store.vector_bytes]
        if damaged and notes is not None:  # the matrix holds their vectors; the database has lost them
            notes.append(f"{len(damaged)} hit(s) have a damaged vector in the database (e.g. {damaged[0]}); "
                         f"{repair_hint(self.store.root)}")
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
