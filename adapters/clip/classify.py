"""Zero-shot classification: which of a set of labels an image shows, with no training.

Each label becomes prompts through templates ("a photo of a {}."); the prompts' unit
embeddings are averaged into one class vector (CLIP's prompt ensembling). An image's
probabilities are the softmax of its cosine similarities scaled by the model's own learned
logit scale, as in CLIP's zero-shot evaluation, so they are comparable across models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

import numpy as np

from .errors import InputError, ModelLoadError

if TYPE_CHECKING:
    from .embed import Embedder
    from .images import ImageSource
    from .models import ClipModel

DEFAULT_TEMPLATES = ("a photo of a {}.",)
MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learned temperature here during training


def parse_labels(labels: str | Iterable[str]) -> list[str]:
    """'cat, dog,car' or a list -> ['cat', 'dog', 'car']; empty and duplicate labels are errors."""
    items = labels.split(",") if isinstance(labels, str) else list(labels)
    cleaned = [str(label).strip() for label in items]
    if not cleaned or any(not label for label in cleaned):
        raise InputError(f"labels must be non-empty, got {list(items)!r}")
    duplicates = sorted({label for label in cleaned if cleaned.count(label) > 1})
    if duplicates:
        raise InputError(f"duplicate labels: {', '.join(duplicates)}")
    return cleaned


def check_templates(templates: Sequence[str]) -> list[str]:
    templates = [str(t) for t in templates]
    if not templates:
        raise InputError("at least one prompt template is needed, e.g. 'a photo of a {}.'")
    for template in templates:
        if "{}" not in template:
            raise InputError(f"template {template!r} has no '{{}}' for the label")
    return templates


def label_vectors(embedder: "Embedder", labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """(C, D) unit class vectors: the mean of each label's template embeddings, renormalised."""
    prompts = [template.format(label) for label in labels for template in templates]
    result = embedder.embed_texts(prompts)
    if result.errors:
        first = min(result.errors)
        raise InputError(f"cannot embed the prompt {prompts[first]!r}: {result.errors[first]}")
    vectors = result.vectors.reshape(len(labels), len(templates), -1).mean(axis=1)  # (C, D)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def logit_scale_of(clip: "ClipModel") -> float:
    """The model's learned temperature (exp of its logit_scale parameter), clamped like CLIP's."""
    scale = getattr(clip.model, "logit_scale", None)
    if scale is None:
        return MAX_LOGIT_SCALE
    value = float(scale.detach().exp().reshape(-1)[0])
    if math.isnan(value):  # min() would pass NaN through, and every probability with it
        raise ModelLoadError(f"{clip.name}: its logit_scale weight is NaN: the checkpoint is broken and "
                             f"cannot score labels")
    return float(min(value, MAX_LOGIT_SCALE))


def softmax_probabilities(image_vectors: np.ndarray, class_vectors: np.ndarray, logit_scale: float) -> np.ndarray:
    """(N, C) probabilities: softmax over classes of logit_scale * cosine similarity."""
    logits = logit_scale * (np.asarray(image_vectors, np.float64) @ np.asarray(class_vectors, np.float64).T)
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


@dataclass
class LabelScore:
    label: str
    score: float  # probability in [0, 1]


@dataclass
class ZeroShotResult:
    """One image's top labels, or why it could not be classified."""

    labels: list[LabelScore] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


class ZeroShotClassifier:
    """Class vectors computed once; then any number of images."""

    def __init__(self, embedder: "Embedder", labels: str | Iterable[str],
                 templates: Sequence[str] = DEFAULT_TEMPLATES):
        self.embedder = embedder
        self.labels = parse_labels(labels)
        self.templates = check_templates(templates)
        self.class_vectors = label_vectors(embedder, self.labels, self.templates)
        self.logit_scale = logit_scale_of(embedder.clip)

    def probabilities(self, image_vectors: np.ndarray) -> np.ndarray:
        return softmax_probabilities(image_vectors, self.class_vectors, self.logit_scale)

    def top(self, probabilities: np.ndarray, k: int = 1) -> list[LabelScore]:
        order = np.argsort(-probabilities, kind="stable")[:max(1, k)]
        return [LabelScore(self.labels[i], float(probabilities[i])) for i in order]

    def classify(self, images: Sequence["ImageSource"], top_k: int = 1) -> list[ZeroShotResult]:
        """One result per image, in order; an unreadable image gets an error, not a guess."""
        embeddings = self.embedder.embed_images(images)
        results = [ZeroShotResult(error=embeddings.errors.get(i)) for i in range(len(embeddings))]
        good = np.flatnonzero(embeddings.ok)
        if len(good):
            probabilities = self.probabilities(embeddings.vectors[good])
            for row, index in enumerate(good):
                if np.isfinite(probabilities[row]).all():
                    results[index].labels = self.top(probabilities[row], top_k)
                else:  # never a NaN score reported as a label
                    results[index].error = "the label scores came out NaN or infinite (a broken model?)"
        return results
