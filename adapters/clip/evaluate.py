"""Retrieval evaluation of a CLIP on caption pairs: embed once, score with `metrics`.

`evaluate_pairs(clip, pairs)` is what the training loop calls every epoch and what
`python -m adapters.clip eval` calls per model. It is model-agnostic (any `ClipModel`).

How pairs become a retrieval problem (`EvalData.from_pairs`):
- each distinct image file is one image (a file listed with five captions is one image);
- each distinct caption (after collapsing whitespace, case-insensitively) is one text, and its
  correct images are every image it was written for. So a template caption shared by a whole
  class ("a photo of a cat") is a hit when any cat is in its top k, not a miss because another
  cat outranked "its" cat;
- images that fail to load are reported (`on_problem`) and left out, with their captions.

Zero-shot accuracy is added when images carry labels (two classes or more): each class is
the average of its `templates` prompts' embeddings, as in CLIP's paper.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .errors import DataError
from .pairs import CaptionPair, DataProblem
from .metrics import DEFAULT_KS, retrieval_metrics, zero_shot_accuracy
from .progress import progress_bar

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)
# Preprocessed validation images kept in memory between calls (e.g. every epoch) up to this size.
DEFAULT_PIXEL_CACHE_BYTES = 512 << 20

ProblemCallback = Callable[[DataProblem], None]


def _log_problem(problem: DataProblem) -> None:
    log.warning("evaluation skipped %s", problem)


@dataclass
class EvalData:
    """Caption pairs grouped for retrieval: distinct images, distinct captions, who matches whom."""

    images: list[Path]
    captions: list[str]
    caption_images: list[list[int]]          # for each caption, the indices of its correct images
    image_labels: list[Optional[str]]        # per image (the first label given for it)
    image_sources: list[str] = field(default_factory=list)
    image_pair_counts: list[int] = field(default_factory=list)  # pairs given for each image
    _pixels: dict = field(default_factory=dict, repr=False)  # preprocess key -> (tensor, errors)

    @classmethod
    def from_pairs(cls, pairs: Sequence[CaptionPair]) -> "EvalData":
        image_index: dict[Path, int] = {}
        images: list[Path] = []
        labels: list[Optional[str]] = []
        sources: list[str] = []
        counts: list[int] = []
        caption_index: dict[str, int] = {}
        captions: list[str] = []
        caption_images: list[list[int]] = []
        for pair in pairs:
            image = Path(pair.image)
            i = image_index.get(image)
            if i is None:
                i = image_index[image] = len(images)
                images.append(image)
                labels.append(pair.label)
                sources.append(pair.source or str(image))
                counts.append(0)
            elif labels[i] is None and pair.label is not None:
                labels[i] = pair.label
            counts[i] += 1
            key = caption_key(pair.caption)
            c = caption_index.get(key)
            if c is None:
                c = caption_index[key] = len(captions)
                captions.append(pair.caption.strip())
                caption_images.append([])
            if i not in caption_images[c]:
                caption_images[c].append(i)
        return cls(images, captions, caption_images, labels, sources, counts)

    def without_images(self, dropped: set[int]) -> "EvalData":
        """The same data with some images (and captions left without an image) removed."""
        if not dropped:
            return self
        keep = [i for i in range(len(self.images)) if i not in dropped]
        new_index = {old: new for new, old in enumerate(keep)}
        captions, caption_images = [], []
        for caption, matches in zip(self.captions, self.caption_images):
            remaining = [new_index[i] for i in matches if i in new_index]
            if remaining:
                captions.append(caption)
                caption_images.append(remaining)
        return EvalData([self.images[i] for i in keep], captions, caption_images,
                        [self.image_labels[i] for i in keep],
                        [self.image_sources[i] for i in keep] if self.image_sources else [],
                        [self.image_pair_counts[i] for i in keep] if self.image_pair_counts else [])

    @property
    def n_pairs(self) -> int:
        return sum(self.image_pair_counts)

    @property
    def labelled(self) -> bool:
        return len({label for label in self.image_labels if label is not None}) >= 2


def caption_key(caption: str) -> str:
    return re.sub(r"\s+", " ", caption).strip().casefold()


def evaluate_pairs(clip, pairs: Union[Sequence[CaptionPair], EvalData], *, batch_size: int = 64,
                   templates: Sequence[str] = DEFAULT_TEMPLATES, ks: tuple[int, ...] = DEFAULT_KS,
                   num_workers: int = 2, on_problem: Optional[ProblemCallback] = None,
                   show_progress: bool = False, cache_pixels: bool = True) -> dict[str, float]:
    """Retrieval metrics (and zero-shot accuracy when labelled) of `clip` (a `ClipModel`) on `pairs`.

    Returns `metrics.retrieval_metrics`' keys plus 'images', 'texts', 'pairs' (what was scored),
    'failed_images', and 'zero_shot_accuracy' / 'zero_shot_classes' when images carry labels.
    Pass an `EvalData` (built once) to evaluate the same data repeatedly: its preprocessed
    images are then kept between calls (when they fit in DEFAULT_PIXEL_CACHE_BYTES).
    """
    data = pairs if isinstance(pairs, EvalData) else EvalData.from_pairs(pairs)
    report = on_problem or _log_problem
    if not data.images:
        raise DataError("nothing to evaluate: no caption pairs")
    image_emb, failures = embed_eval_images(clip, data, batch_size=batch_size, num_workers=num_workers,
                                            show_progress=show_progress, cache_pixels=cache_pixels)
    for index, reason in sorted(failures.items()):
        report(DataProblem(data.image_sources[index] if data.image_sources else str(data.images[index]), reason))
    kept = data.without_images(set(failures))
    if not kept.images or not kept.captions:
        raise DataError(f"nothing to evaluate: all {len(data.images)} images failed to load")
    image_emb = np.delete(image_emb, sorted(failures), axis=0) if failures else image_emb
    text_emb = _encode_texts(clip, kept.captions, batch_size)
    class_emb, labels, n_classes = None, None, 0
    if kept.labelled:
        classes = sorted({label for label in kept.image_labels if label is not None})
        class_emb = class_embeddings(clip, classes, templates, batch_size=batch_size)
        labels = [classes.index(label) if label is not None else -1 for label in kept.image_labels]
        n_classes = len(classes)
    result = evaluate_embeddings(image_emb, text_emb, kept.caption_images, ks=ks, class_emb=class_emb,
                                 image_labels=labels)
    result.update({"images": len(kept.images), "texts": len(kept.captions), "pairs": kept.n_pairs,
                   "failed_images": len(failures)})
    if n_classes:
        result["zero_shot_classes"] = n_classes
    return result


def evaluate_embeddings(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image, *,
                        ks: tuple[int, ...] = DEFAULT_KS, class_emb: Optional[np.ndarray] = None,
                        image_labels: Optional[Sequence[int]] = None) -> dict[str, float]:
    """Same metrics from embeddings already computed (e.g. in the training loop's validation pass).

    text_to_image: (M,) image index per text, or per text a list of its correct images.
    image_labels: class index per image (-1 = no label) for zero-shot accuracy against class_emb.
    """
    result = retrieval_metrics(image_emb, text_emb, text_to_image, ks)
    if class_emb is not None and image_labels is not None:
        labels = np.asarray(image_labels, dtype=np.int64)
        has_label = labels >= 0
        if has_label.any():
            result["zero_shot_accuracy"] = zero_shot_accuracy(image_emb[has_label], class_emb, labels[has_label])
    return result


def class_embeddings(clip, classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES, *,
                     batch_size: int = 64) -> np.ndarray:
    """(C, D): per class, the normalised mean of its prompts' normalised embeddings."""
    templates = list(templates) or list(DEFAULT_TEMPLATES)
    prompts = [template.replace("{}", label) for label in classes for template in templates]
    vectors = _encode_texts(clip, prompts, batch_size).reshape(len(classes), len(templates), -1)
    mean = vectors.mean(axis=1)
    return (mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def embed_eval_images(clip, data: EvalData, *, batch_size: int = 64, num_workers: int = 2,
                      show_progress: bool = False, cache_pixels: bool = True) -> tuple[np.ndarray, dict[int, str]]:
    """(N, D) image embeddings (NaN rows for failures) and {image index: reason} for failures."""
    key = _preprocess_key(clip)
    cached = data._pixels.get(key) if cache_pixels else None
    if cached is None:
        pixels, failures = _preprocess_images(clip, data.images, num_workers, show_progress)
        if cache_pixels and pixels.element_size() * pixels.nelement() <= DEFAULT_PIXEL_CACHE_BYTES:
            data._pixels = {key: (pixels, failures)}  # one model's preprocessing at a time
    else:
        pixels, failures = cached
    vectors = np.full((len(data.images), clip.dim), np.nan, dtype=np.float32)
    good = [i for i in range(len(data.images)) if i not in failures]
    parts = []
    for lo in range(0, len(pixels), batch_size):
        parts.append(clip.encode_images(pixels[lo:lo + batch_size]))
    if parts:
        from .embed import refuse_non_finite

        vectors[good] = np.concatenate(parts)
        failures = dict(failures)  # the cached pixels' failures stay as they were
        refuse_non_finite(vectors, good, failures)
    return vectors, failures


def _preprocess_images(clip, images: list[Path], num_workers: int, show_progress: bool):
    """Decode and preprocess every image once (in threads): (B, 3, H, W) tensor of the good ones."""
    import torch

    from .embed import Embedder

    embedder = Embedder(clip, batch_size=max(1, len(images)), num_workers=num_workers)
    bar = progress_bar(len(images), "eval images") if show_progress else None
    failures: dict[int, str] = {}
    tensors = []
    for index, prepared in enumerate(embedder.iter_prepared(
            images, ahead=4 * embedder.num_workers, thread_name="clip-eval-decode")):
        if prepared.error is not None:
            failures[index] = prepared.error
        else:
            tensors.append(prepared.tensor)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    size = clip.image_size
    pixels = torch.stack(tensors) if tensors else torch.zeros((0, 3, size, size))
    return pixels, failures


def _encode_texts(clip, texts: Sequence[str], batch_size: int) -> np.ndarray:
    from .embed import capped_texts

    parts = [clip.encode_tokens(clip.tokenizer(capped_texts(texts[lo:lo + batch_size])))
             for lo in range(0, len(texts), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, clip.dim), dtype=np.float32)


def _preprocess_key(clip) -> str:
    """Models whose eval transform has the same settings share cached pixels (e.g. a model before and
    after fine-tuning); without settings to compare, only the same transform object does."""
    cfg = clip.preprocess_cfg or {}
    return repr(sorted(cfg.items())) if cfg else f"transform-{id(clip.preprocess)}"


