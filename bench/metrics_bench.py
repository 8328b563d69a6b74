"""Retrieval metrics: chunked `metrics.retrieval_metrics` vs a full-matrix argsort baseline.

The baseline is how retrieval recall is often computed (open_clip's `get_clip_metrics`): the whole
(M, N) score matrix, then a full argsort per row. Both run in the same process on the same
random data; the script prints time and peak traced memory (tracemalloc) and their ratios.
It also checks that both give the same ranks when there are no ties.

    .venv/bin/python bench/metrics_bench.py [--images 4000 --captions 5 --dim 512] [--big 50000]
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapters.clip.metrics import retrieval_ranks  # noqa: E402


def full_matrix_t2i_ranks(images: np.ndarray, texts: np.ndarray, text_to_image: np.ndarray) -> np.ndarray:
    scores = texts @ images.T                                  # (M, N) all at once
    order = np.argsort(-scores, axis=1)                         # full sort per row
    return 1 + np.nonzero(order == text_to_image[:, None])[1]   # position of the true image


def measure(fn, *args):
    tracemalloc.start()
    start = time.perf_counter()
    out = fn(*args)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, seconds, peak / 2**20


def data(n_images: int, captions: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n_images, dim)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    text_to_image = np.repeat(np.arange(n_images), captions)
    texts = images[text_to_image] + rng.normal(scale=1.5 / np.sqrt(dim), size=(len(text_to_image), dim)).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    return images, texts, text_to_image


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--captions", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--big", type=int, default=0, help="also time N x N (chunked only), e.g. 50000")
    args = parser.parse_args()

    images, texts, t2i = data(args.images, args.captions, args.dim)
    print(f"{args.images} images x {len(texts)} captions, dim {args.dim}")
    base_ranks, base_s, base_mb = measure(full_matrix_t2i_ranks, images, texts, t2i)
    (ours_t2i, _), ours_s, ours_mb = measure(retrieval_ranks, images, texts, t2i)
    assert np.array_equal(base_ranks, ours_t2i), "ranks differ"
    print(f"baseline full matrix + argsort (text->image only): {base_s:7.2f} s  peak {base_mb:8.1f} MiB")
    print(f"metrics.retrieval_ranks (both directions)       : {ours_s:7.2f} s  peak {ours_mb:8.1f} MiB")
    print(f"ratio: {base_s / ours_s:.1f}x faster doing twice the work, {base_mb / ours_mb:.1f}x less memory")
    if args.big:
        images, texts, t2i = data(args.big, 1, 64, seed=1)
        (_, _), big_s, big_mb = measure(retrieval_ranks, images, texts, t2i)
        full_gib = args.big * args.big * 4 / 2**30
        print(f"{args.big} x {args.big}, dim 64, both directions: {big_s:.1f} s, peak {big_mb:.0f} MiB "
              f"(the full score matrix alone would be {full_gib:.1f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
