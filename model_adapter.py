"""The earlier CLIP app's entry point, kept for its import path: `from model_adapter import ClipAdapter`
(its unit tests, notebooks and Dataloop's CLIP tutorial import it so). The adapter is
adapters/clip_adapter.py (dataloop.json's entryPoint); this module only re-exports it."""
from adapters.clip_adapter import ClipAdapter

__all__ = ["ClipAdapter"]
