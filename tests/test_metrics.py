"""Retrieval and zero-shot metrics against a naive reference written with plain loops.

Embeddings with small integer entries make every dot product exact, so ties are real ties
(the same in the vectorised code and in the loops) and the comparison can be exact.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from adapters.clip.metrics import (best_match_ranks, retrieval_metrics, retrieval_ranks, top_k,
                                   zero_shot_accuracy)

KS = (1, 5, 10)


# ---- the naive reference -----------------------------------------------------------------
def naive_ranks(queries, candidates, correct_sets):
    """Loop over every query and candidate: rank = 1 + wrong candidates scoring >= best correct."""
    ranks = []
    for q, correct in enumerate(correct_sets):
        scores = [float(sum(float(a) * float(b) for a, b in zip(queries[q], candidates[c])))
                  for c in range(len(candidates))]
        best = max(scores[c] for c in correct)
        ranks.append(1 + sum(1 for c in range(len(candidates)) if c not in correct and scores[c] >= best))
    return ranks


def naive_metrics(images, texts, text_to_images):
    """Reference metrics: text_to_images is, per text, the set of its correct images."""
    t2i = naive_ranks(texts, images, text_to_images)
    captions_of = {i: {t for t, imgs in enumerate(text_to_images) if i in imgs} for i in range(len(images))}
    captioned = [i for i in range(len(images)) if captions_of[i]]
    i2t = naive_ranks([images[i] for i in captioned], texts, [captions_of[i] for i in captioned])
    out = {}
    for name, ranks in (("t2i", t2i), ("i2t", i2t)):
        for k in KS:
            out[f"{name}_r{k}"] = sum(r <= k for r in ranks) / len(ranks)
    out["mean_recall"] = sum(out[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in KS) / 6
    out["recall@1"] = (out["t2i_r1"] + out["i2t_r1"]) / 2
    for name, ranks in (("t2i", t2i), ("i2t", i2t)):
        out[f"{name}_mean_rank"] = sum(ranks) / len(ranks)
        s = sorted(ranks)
        mid = len(s) // 2
        out[f"{name}_median_rank"] = s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
    return out, t2i, i2t


def integer_embeddings(rng, n, dim=4, low=-1, high=2):
    """Entries in {-1, 0, 1}: exact dot products and many ties."""
    return rng.integers(low, high, size=(n, dim)).astype(np.float32)


# ---- retrieval ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk_elements", [7, 1 << 24])
def test_retrieval_matches_naive_reference_with_ties_and_several_captions(seed, chunk_elements):
    rng = np.random.default_rng(seed)
    n_images, n_texts = 23, 41
    images = integer_embeddings(rng, n_images)
    texts = integer_embeddings(rng, n_texts)
    text_to_image = rng.integers(0, n_images - 3, size=n_texts)  # the last 3 images have no caption
    got = retrieval_metrics(images, texts, text_to_image, KS, chunk_elements=chunk_elements)
    expected, t2i, i2t = naive_metrics(images, texts, [{int(i)} for i in text_to_image])
    assert got == pytest.approx(expected)
    ranks = retrieval_ranks(images, texts, text_to_image, chunk_elements=chunk_elements)
    assert ranks[0].tolist() == t2i and ranks[1].tolist() == i2t


@pytest.mark.parametrize("seed", range(4))
def test_retrieval_with_several_correct_images_per_caption_matches_reference(seed):
    rng = np.random.default_rng(100 + seed)
    images = integer_embeddings(rng, 17, dim=3)
    texts = integer_embeddings(rng, 12, dim=3)
    matches = [sorted(set(rng.integers(0, 17, size=rng.integers(1, 4)).tolist())) for _ in range(12)]
    got = retrieval_metrics(images, texts, matches, KS, chunk_elements=5)
    expected, _, _ = naive_metrics(images, texts, [set(m) for m in matches])
    assert got == pytest.approx(expected)


def test_retrieval_on_continuous_embeddings_matches_reference():
    rng = np.random.default_rng(7)
    images = rng.normal(size=(30, 16)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    text_to_image = np.repeat(np.arange(30), 2)  # two captions per image
    texts = images[text_to_image] + 0.9 * rng.normal(size=(60, 16)).astype(np.float32)
    expected, _, _ = naive_metrics(images.astype(np.float64), texts.astype(np.float64),
                                   [{int(i)} for i in text_to_image])
    assert retrieval_metrics(images, texts, text_to_image, chunk_elements=100) == pytest.approx(expected)


def test_perfect_embeddings_score_one_and_rank_one():
    eye = np.eye(12, dtype=np.float32)
    m = retrieval_metrics(eye, eye, np.arange(12))
    assert m["t2i_r1"] == m["i2t_r1"] == m["mean_recall"] == 1.0
    assert m["t2i_mean_rank"] == m["i2t_median_rank"] == 1.0


def test_any_caption_in_top_k_is_a_hit_for_the_image():
    # Image 0 has two captions: one points at image 1 (wrong), one at image 0 (right).
    images = np.array([[1, 0], [0, 1]], dtype=np.float32)
    texts = np.array([[0, 1], [1, 0], [0.9, 0.1]], dtype=np.float32)
    ranks_t2i, ranks_i2t = retrieval_ranks(images, texts, [0, 0, 1])
    assert ranks_t2i.tolist() == [2, 1, 2]          # text 2 prefers image 0 over its image 1
    # image 0: best caption is text 1 (score 1), nothing wrong above it -> rank 1
    # image 1: its caption (text 2) scores 0.1; texts 0 (1.0) is wrong and above -> rank 2
    assert ranks_i2t.tolist() == [1, 2]


def test_ties_count_against_the_model_so_a_collapsed_model_scores_worst():
    same = np.ones((8, 4), dtype=np.float32) / 2
    m = retrieval_metrics(same, same, np.arange(8))
    assert m["t2i_r1"] == 0.0 and m["i2t_r1"] == 0.0
    assert m["t2i_mean_rank"] == 8.0 and m["i2t_median_rank"] == 8.0


def test_bad_inputs_are_refused():
    ok = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.full((3, 3), np.nan, np.float32), ok, [0, 1, 2])
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(ok, ok, [0, 1, 3])
    with pytest.raises(ValueError, match="texts"):
        retrieval_metrics(ok, ok, [0, 1])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        retrieval_metrics(ok, np.eye(4, dtype=np.float32), [0, 1, 2, 0])


def test_chunking_bounds_memory_instead_of_allocating_n_by_m():
    rng = np.random.default_rng(3)
    n = 3000
    images = rng.normal(size=(n, 8)).astype(np.float32)
    texts = rng.normal(size=(n, 8)).astype(np.float32)
    full_matrix_bytes = n * n * 4  # 36 MB as float32
    tracemalloc.start()
    try:
        retrieval_metrics(images, texts, np.arange(n), chunk_elements=200_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < full_matrix_bytes / 6, f"peak {peak / 1e6:.1f} MB"


# ---- zero-shot and top-k -------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_zero_shot_accuracy_matches_reference(seed):
    rng = np.random.default_rng(200 + seed)
    images = integer_embeddings(rng, 40, dim=3)
    classes = integer_embeddings(rng, 6, dim=3)
    labels = rng.integers(0, 6, size=40)
    ranks = naive_ranks(images, classes, [{int(label)} for label in labels])
    for k in (1, 3):
        expected = sum(r <= k for r in ranks) / len(ranks)
        assert zero_shot_accuracy(images, classes, labels, k=k, chunk_elements=9) == pytest.approx(expected)


def test_zero_shot_tie_is_not_a_hit():
    images = np.array([[1, 0]], dtype=np.float32)
    classes = np.array([[1, 0], [1, 0]], dtype=np.float32)
    assert zero_shot_accuracy(images, classes, [1]) == 0.0
    assert zero_shot_accuracy(images, classes[:1], [0]) == 1.0
    with pytest.raises(ValueError, match="class indices"):
        zero_shot_accuracy(images, classes, [2])


def test_top_k_returns_the_best_candidates_in_order():
    rng = np.random.default_rng(5)
    queries = rng.normal(size=(9, 6)).astype(np.float32)
    keys = rng.normal(size=(50, 6)).astype(np.float32)
    idx, scores = top_k(queries, keys, 4, chunk_elements=60)
    full = queries @ keys.T
    assert idx.tolist() == np.argsort(-full, axis=1)[:, :4].tolist()
    assert np.allclose(scores, np.take_along_axis(full, idx, axis=1))
    assert top_k(queries, keys[:2], 5)[0].shape == (9, 2)


def test_best_match_ranks_needs_a_correct_candidate_per_query():
    with pytest.raises(ValueError, match="at least one correct"):
        best_match_ranks(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), np.array([0]), np.array([0]))
