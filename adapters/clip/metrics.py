"""Retrieval and zero-shot metrics: pure numpy functions over embeddings.

Scores are dot products (cosine similarities for the L2-normalised embeddings this project
makes). Everything is computed in chunks of queries, so 50k x 50k never allocates the full
N x M score matrix; memory is about `chunk_elements` floats at a time.

Ranks are 1-based and ties count *against* the model: a correct candidate that scores the
same as a wrong one is ranked after it. A collapsed model (every embedding equal) therefore
gets the worst ranks instead of a perfect Recall@1.

Several correct candidates per query are handled the usual way: the query's rank is the rank
of its best-scoring correct candidate, counting only wrong candidates above it. So an image
with five captions is a hit at k if ANY of them is in its top k, and a caption shared by
several images (e.g. "a photo of a cat") is a hit if any of those images is in its top k.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

DEFAULT_KS = (1, 5, 10)
# Scores held at once per chunk (float32): 16M elements = 64 MiB, whatever N and M are.
DEFAULT_CHUNK_ELEMENTS = 1 << 24

# (M,) image index per text, or for each text the indices of all its correct images.
TextToImage = Union[np.ndarray, Sequence[int], Sequence[Sequence[int]]]


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: TextToImage,
                      ks: tuple[int, ...] = DEFAULT_KS, *,
                      chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> dict[str, float]:
    """Image<->text retrieval over L2-normalised embeddings.

    image_emb (N, D), text_emb (M, D); text_to_image (M,) gives the image index of each caption
    (several captions may share an image), or a list of M lists when a caption has several
    correct images. Returns keys:
    't2i_r1', 't2i_r5', 't2i_r10', 'i2t_r1', 'i2t_r5', 'i2t_r10' (fractions in [0, 1]),
    'mean_recall' (mean of those six), 'recall@1' (mean of t2i_r1 and i2t_r1),
    't2i_mean_rank', 't2i_median_rank', 'i2t_mean_rank', 'i2t_median_rank' (1 = best).
    Images without any caption take no part in image->text retrieval.
    """
    t2i, i2t = retrieval_ranks(image_emb, text_emb, text_to_image, chunk_elements=chunk_elements)
    return summarize_ranks(t2i, i2t, ks)


def retrieval_ranks(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: TextToImage, *,
                    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> tuple[np.ndarray, np.ndarray]:
    """(text->image ranks (M,), image->text ranks (N',)) where N' counts images with a caption."""
    images, texts = _check_embeddings(image_emb, text_emb)
    text_idx, image_idx = match_pairs(text_to_image, len(texts), len(images))
    t2i = best_match_ranks(texts, images, text_idx, image_idx, chunk_elements=chunk_elements)
    captioned = np.unique(image_idx)
    i2t_all = best_match_ranks(images[captioned], texts, np.searchsorted(captioned, image_idx), text_idx,
                               chunk_elements=chunk_elements)
    return t2i, i2t_all


def summarize_ranks(t2i_ranks: np.ndarray, i2t_ranks: np.ndarray,
                    ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """Recall@k, mean and median rank both ways, from 1-based rank arrays."""
    if len(t2i_ranks) == 0 or len(i2t_ranks) == 0:
        raise ValueError("retrieval metrics need at least one image with a caption")
    out: dict[str, float] = {}
    for direction, ranks in (("t2i", t2i_ranks), ("i2t", i2t_ranks)):
        for k in ks:
            out[f"{direction}_r{k}"] = float(np.mean(ranks <= k))
    recalls = [out[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in ks]
    out["mean_recall"] = float(np.mean(recalls))
    if 1 in ks:
        out["recall@1"] = (out["t2i_r1"] + out["i2t_r1"]) / 2
    for direction, ranks in (("t2i", t2i_ranks), ("i2t", i2t_ranks)):
        out[f"{direction}_mean_rank"] = float(np.mean(ranks))
        out[f"{direction}_median_rank"] = float(np.median(ranks))
    return out


def best_match_ranks(queries: np.ndarray, candidates: np.ndarray, query_idx: np.ndarray,
                     candidate_idx: np.ndarray, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> np.ndarray:
    """Rank of each query's best correct candidate; (query_idx[i], candidate_idx[i]) are the correct pairs.

    rank = 1 + number of wrong candidates scoring >= the best correct score (ties count against).
    Every query must have at least one correct candidate.
    """
    n_queries, n_candidates = len(queries), len(candidates)
    order = np.argsort(query_idx, kind="stable")
    query_idx, candidate_idx = query_idx[order], candidate_idx[order]
    starts = np.searchsorted(query_idx, np.arange(n_queries + 1))  # pairs of query q: starts[q]:starts[q+1]
    if np.any(np.diff(starts) == 0):
        raise ValueError("every query needs at least one correct candidate")
    ranks = np.empty(n_queries, dtype=np.int64)
    step = max(1, chunk_elements // max(1, n_candidates))
    for lo in range(0, n_queries, step):
        hi = min(n_queries, lo + step)
        scores = queries[lo:hi] @ candidates.T  # (c, K)
        rows = query_idx[starts[lo]:starts[hi]] - lo
        cols = candidate_idx[starts[lo]:starts[hi]]
        correct = np.zeros(scores.shape, dtype=bool)
        correct[rows, cols] = True
        best = np.full(hi - lo, -np.inf, dtype=scores.dtype)
        np.maximum.at(best, rows, scores[rows, cols])
        ranks[lo:hi] = 1 + np.count_nonzero((scores >= best[:, None]) & ~correct, axis=1)
    return ranks


def match_pairs(text_to_image: TextToImage, n_texts: int, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalise `text_to_image` into parallel (text index, image index) arrays of correct pairs."""
    if isinstance(text_to_image, np.ndarray) and text_to_image.ndim == 1 or (
            not isinstance(text_to_image, np.ndarray) and all(np.isscalar(x) for x in text_to_image)):
        image_idx = np.asarray(text_to_image, dtype=np.int64).reshape(-1)
        text_idx = np.arange(len(image_idx), dtype=np.int64)
    else:
        lists = [np.asarray(list(x), dtype=np.int64).reshape(-1) for x in text_to_image]
        if any(len(x) == 0 for x in lists):
            raise ValueError("every text needs at least one correct image")
        text_idx = np.repeat(np.arange(len(lists), dtype=np.int64), [len(x) for x in lists])
        image_idx = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
    if len(np.unique(text_idx)) != n_texts or (len(text_idx) and text_idx.max() >= n_texts):
        raise ValueError(f"text_to_image describes {len(np.unique(text_idx))} texts, but there are {n_texts}")
    if len(image_idx) and (image_idx.min() < 0 or image_idx.max() >= n_images):
        raise ValueError(f"text_to_image has image indices outside [0, {n_images})")
    return text_idx, image_idx


def zero_shot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray, *, k: int = 1,
                       chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> float:
    """Top-k accuracy: image_emb (N, D), class_emb (C, D), labels (N,) class indices.

    An image counts as correct when fewer than k other classes score >= its true class
    (ties count against, as for the retrieval ranks).
    """
    images, classes = _check_embeddings(image_emb, class_emb)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    if len(images) == 0:
        raise ValueError("zero-shot accuracy needs at least one image")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError(f"labels must be class indices in [0, {len(classes)})")
    ranks = best_match_ranks(images, classes, np.arange(len(images)), labels, chunk_elements=chunk_elements)
    return float(np.mean(ranks <= k))


def top_k(queries: np.ndarray, candidates: np.ndarray, k: int, *,
          chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> tuple[np.ndarray, np.ndarray]:
    """Indices (Q, k) and scores (Q, k) of each query's k best candidates, best first."""
    queries, candidates = _check_embeddings(queries, candidates)
    k = min(k, len(candidates))
    indices = np.empty((len(queries), k), dtype=np.int64)
    scores = np.empty((len(queries), k), dtype=np.float32)
    step = max(1, chunk_elements // max(1, len(candidates)))
    for lo in range(0, len(queries), step):
        s = queries[lo:lo + step] @ candidates.T  # (c, K)
        part = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.tile(np.arange(k), (len(s), 1))
        part_scores = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        indices[lo:lo + step] = np.take_along_axis(part, order, axis=1)
        scores[lo:lo + step] = np.take_along_axis(part_scores, order, axis=1)
    return indices, scores


def _check_embeddings(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D) embeddings, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("embeddings contain NaN or infinite values (drop failed items first)")
    return a, b
