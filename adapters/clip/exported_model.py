"""A model made of its exports alone, so `embed` and `index` start without torch.

When a model's exports and `auto`'s choice for this CPU are cached, a new process needs neither
torch nor open_clip: the fingerprint comes from the weights files' identity (export_cache.py:
their stat since it was computed; not from hashing loaded tensors), the towers from the export,
the tokenizer from tokenizer.py, and the preprocessing below, which reproduces open_clip's eval
transform (resize the shorter side with bicubic, centre crop, scale, normalise) for the common
configuration and declines any other, so the caller loads torch instead.
"""
from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image

from .engines import (AUTO, TORCH, VARIANTS, Engine, describe_choice, engine_files, read_choice,
                      runtime_installed)
from .errors import EngineError
from .export_cache import ExportDamaged, check_export, engine_roots, known_fingerprint, read_export_info, warn_damaged

log = logging.getLogger(__name__)


def pil_preprocess(cfg: Optional[dict[str, Any]]) -> Optional[Callable[[Image.Image], np.ndarray]]:
    """open_clip's eval transform without torch for 'shortest' resize + bicubic + RGB, else None.

    Same steps as torchvision on a PIL image (Resize(int) keeps the aspect ratio, truncating the
    long side; CenterCrop rounds its offsets), then the Embedder's numpy ToTensor + Normalize."""
    if not isinstance(cfg, dict) or cfg.get("resize_mode", "shortest") != "shortest":
        return None
    if cfg.get("interpolation", "bicubic") != "bicubic" or cfg.get("mode", "RGB") != "RGB":
        return None
    size = cfg.get("size")
    if isinstance(size, (list, tuple)):
        size = size[0] if len(size) == 2 and size[0] == size[1] else None
    if not isinstance(size, int) or size < 1:
        return None
    mean = np.asarray(cfg.get("mean"), dtype=np.float32)
    std = np.asarray(cfg.get("std"), dtype=np.float32)
    if mean.shape != (3,) or std.shape != (3,):
        return None

    def to_pixels(image: Image.Image) -> np.ndarray:
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.BICUBIC)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        if image.mode != "RGB":
            image = image.convert("RGB")
        array = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        array = (array - mean) / std
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    return to_pixels


@dataclass
class ExportedModel:
    """Enough of a `ClipModel` for the Embedder and a store: both exported towers on one engine."""

    engine: Engine
    preprocess: Callable[[Image.Image], np.ndarray]
    name: str
    fingerprint: str
    dim: int
    image_size: int
    context_length: int
    arch: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def tokenizer(self) -> Callable[[Sequence[str]], np.ndarray]:
        from .tokenizer import ClipTokenizer  # reading the vocabulary costs 0.2 s: only when texts come
        return ClipTokenizer(self.context_length)

    @property
    def engine_name(self) -> str:
        return self.engine.name

    @property
    def description(self) -> str:
        return (f"{self.name}: {self.arch} from its exports (fingerprint {self.fingerprint[:12]}), "
                f"{self.dim}-d, cpu, engine {self.engine_name}")

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return self.engine.encode_images(np.asarray(pixels))

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return self.engine.encode_tokens(np.asarray(tokens))


def accelerator_present() -> bool:
    """A GPU that `--device auto` would use (then torch runs the model, not an export)."""
    if os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0"):
        return True
    return platform.system() == "Darwin" and platform.machine() == "arm64"  # MPS


def open_exported_model(model_name: str, requested: str = AUTO, device: str = "auto", *,
                        towers: Sequence[str] = ("image",)) -> Optional[ExportedModel]:
    """The model from its exports alone, or None when torch must load it (nothing cached, the
    weights changed, `auto` not measured yet or chose torch, a GPU, an unusual preprocessing or
    tokenizer, a damaged export: one warning naming the folder). `towers` are opened now."""
    if requested == TORCH or device not in ("auto", "cpu") or (device == "auto" and accelerator_present()):
        return None
    fingerprint = known_fingerprint(model_name)
    if fingerprint is None:
        return None
    directory = next((root / fingerprint for root in engine_roots(model_name)
                      if read_export_info(root / fingerprint) is not None), None)
    if directory is None:
        return None
    info = read_export_info(directory) or {}
    choice = read_choice(directory) if requested == AUTO else None
    name = choice["engine"] if choice else requested
    if name not in VARIANTS or not runtime_installed(VARIANTS[name][0]):
        return None
    preprocess = pil_preprocess(info.get("preprocess"))
    if preprocess is None or (info.get("tokenizer") or {}).get("kind") != "clip-bpe":
        return None
    try:
        check_export(directory, engine_files(directory, info, name))
        engine = Engine(name, directory)
        for tower in towers:
            engine.tower(tower)
        if choice:
            engine.note = f"auto on this CPU: {describe_choice(choice)}"
        return ExportedModel(engine, preprocess, model_name, fingerprint, int(info["dim"]), int(info["image_size"]),
                             int(info["tokenizer"]["context_length"]), str(info.get("arch", "")))
    except ExportDamaged as exc:
        warn_damaged(exc, "loading the model with torch instead")
    except (EngineError, OSError, KeyError, TypeError, ValueError) as exc:
        log.debug("%s: no torch-free start (%s)", model_name, exc)
    return None

