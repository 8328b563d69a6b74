"""Retrieval and zero-shot metrics: pure functions over embeddings.

INTERFACE STUB (filled in by the metrics work): other modules code against these names.
"""
from __future__ import annotations

import numpy as np


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Image<->text retrieval over L2-normalised embeddings.

    image_emb (N, D), text_emb (M, D); text_to_image (M,) gives the image index of each caption
    (several captions may share an image). Returns keys:
    't2i_r1', 't2i_r5', 't2i_r10', 'i2t_r1', 'i2t_r5', 'i2t_r10' (fractions in [0, 1]),
    'mean_recall' (mean of those six), 't2i_mean_rank', 't2i_median_rank', 'i2t_mean_rank',
    'i2t_median_rank' (1 = best).
    """
    raise NotImplementedError


def zero_shot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy: image_emb (N, D), class_emb (C, D), labels (N,) class indices."""
    raise NotImplementedError
