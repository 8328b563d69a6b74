"""CLIP embeddings, search and fine-tuning: the library under the Dataloop adapter.

Never imports dtlpy, so everything here runs and is tested without the platform.
Heavy modules (torch, open_clip) load on first use, so `python -m adapters.clip --help` is quick.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "2.0.0"

_EXPORTS = {
    "ClipConfig": "config",
    "ClipModel": "models",
    "load_model": "models",
    "save_checkpoint": "models",
    "Embedder": "embed",
    "Embeddings": "embed",
    "load_image": "images",
    "ClipAdapterError": "errors",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
