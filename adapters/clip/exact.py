"""Exact k-nearest neighbours over a matrix of unit vectors: one BLAS product and a partial sort.

No per-row Python and no SQLite rows parsed; a sparse row mask gathers its rows instead of
scoring them all. The search of a store (search.py) and the ANN index's calibration (ann.py) use it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

GATHER_FRACTION = 0.25           # exact search over a mask below this density gathers the rows


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
