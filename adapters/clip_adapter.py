"""`ClipAdapter`: the Dataloop model adapter. Thin: every decision is made in `adapters.clip`.

The platform calls `load` (after downloading the model's artifacts), `save` (before uploading
them), `embed` (from `embed_items`/`embed_dataset`, which `model.embed(...)` ends up calling),
`train` and `predict`. Library errors become one-line messages here, at the edge.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Optional, TypeVar

import sys
from pathlib import Path

import dtlpy as dl
from dtlpy.ml.base_model_adapter import AdapterDefaults

# Dataloop's runner loads this file by path (dataloop.json entryPoint); make the package importable.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from adapters.clip.config import ClipConfig  # noqa: E402
from adapters.clip.embed import Embedder  # noqa: E402
from adapters.clip.errors import ClipAdapterError  # noqa: E402
from adapters.clip.items import IMAGE, PROMPT, TEXT, ItemInput, decode_payload, item_kind  # noqa: E402
from adapters.clip.models import ClipModel, find_checkpoint, load_model, save_checkpoint  # noqa: E402

log = logging.getLogger("clip-adapter")

# Keys dtlpy itself keeps in a model's configuration; ours are validated by ClipConfig.
DTLPY_KEYS = frozenset({f.name for f in dataclasses.fields(AdapterDefaults)} | {
    "include_background", "include_model_annotations", "column",
    "predict_embed_subset_limit", "predict_embed_timeout",
})

F = TypeVar("F", bound=Callable[..., Any])


class ClipAdapterFailure(RuntimeError):
    """What the platform shows when a hook fails for a reason the user can fix."""


def user_errors(hook: F) -> F:
    """Turn the library's typed errors into one readable line for the platform's logs."""

    @functools.wraps(hook)
    def wrapper(*args, **kwargs):
        try:
            return hook(*args, **kwargs)
        except ClipAdapterError as exc:
            raise ClipAdapterFailure(f"CLIP adapter: {exc}") from None

    return wrapper  # type: ignore[return-value]


class ClipAdapter(dl.BaseModelAdapter):
    def __init__(self, model_entity: Optional[dl.Model] = None):
        self.clip: Optional[ClipModel] = None
        self.embedder: Optional[Embedder] = None
        self.settings: ClipConfig = ClipConfig()
        super().__init__(model_entity=model_entity)

    # ---- configuration -------------------------------------------------------------------
    def read_settings(self) -> ClipConfig:
        """The model entity's configuration, validated (defaults without an entity)."""
        raw = {k: v for k, v in dict(self.configuration).items() if k not in DTLPY_KEYS}
        self.settings = ClipConfig.from_dict(raw, warn=self.logger.warning)
        return self.settings

    def _record_embeddings_size(self, dim: int) -> None:
        """The feature set is created with configuration['embeddings_size'] (dtlpy defaults to 256)."""
        if self._model_entity is None:
            return
        configured = self.configuration["embeddings_size"] if "embeddings_size" in self.configuration else None
        if configured is not None and configured != dim:
            self.logger.warning(f"configuration embeddings_size={configured} does not match the model's "
                                f"{dim}-d embeddings; corrected to {dim}")
        if configured != dim:
            self.configuration["embeddings_size"] = dim
        self.settings = self.settings.updated(embeddings_size=dim)

    # ---- hooks ---------------------------------------------------------------------------
    @user_errors
    def load(self, local_path: str, **kwargs) -> None:
        """Fine-tuned weights in `local_path` if there are any, else the model named by model_name."""
        settings = self.read_settings()
        checkpoint = find_checkpoint(local_path) if local_path else None
        source = str(checkpoint) if checkpoint else settings.model_name
        self.clip = load_model(source, device=settings.device, precision=settings.precision,
                               arch=settings.model_name if checkpoint else None)
        self.clip.warmup()
        self.embedder = Embedder(self.clip, batch_size=settings.batch_size, num_workers=settings.num_workers)
        self.model = self.clip.model
        self._record_embeddings_size(self.clip.dim)
        self.logger.info(f"loaded {self.clip.description}")

    @user_errors
    def save(self, local_path: str, **kwargs) -> None:
        """Write the project's checkpoint format into `local_path` (uploaded as the model's artifacts)."""
        self._require_loaded()
        save_checkpoint(self.clip, local_path, config=self.settings.to_dict(),
                        metrics=kwargs.get("metrics"), replace_directory=False)

    def prepare_item_func(self, item: dl.Item) -> ItemInput:
        """Download one item (dtlpy calls this in 16 threads); never raises, so no item is lost.

        The base class would turn prompt items into None for an 'image' model; CLIP embeds
        their text, and text items too.
        """
        kind = item_kind(getattr(item, "mimetype", None), getattr(item, "system", None))
        prepared = ItemInput(item_id=item.id, kind=kind, item=item)
        if kind not in (IMAGE, TEXT, PROMPT):
            prepared.error = f"unsupported item type {item.mimetype!r} (CLIP embeds images, texts and prompt items)"
            return prepared
        try:
            buffer = item.download(save_locally=False)
            if buffer is None:
                prepared.error = "download failed: the platform returned no data"
            else:
                prepared.data, prepared.error = decode_payload(kind, buffer.getvalue())
        except Exception as exc:  # noqa: BLE001 - a failed download is this item's problem only
            prepared.error = f"download failed: {type(exc).__name__}: {exc}"
        return prepared

    @user_errors
    def embed(self, batch: list, **kwargs) -> list[Optional[list[float]]]:
        """One L2-normalised vector (list of floats) or None per element, in order."""
        self._require_loaded()
        inputs = [x if isinstance(x, ItemInput) else self.prepare_item_func(x) for x in batch]
        vectors: list[Optional[list[float]]] = [None] * len(inputs)
        reasons = {i: x.error for i, x in enumerate(inputs) if x.error}
        images = [i for i, x in enumerate(inputs) if x.ok and x.kind == IMAGE]
        texts = [i for i, x in enumerate(inputs) if x.ok and x.kind in (TEXT, PROMPT)]
        for indices, result in ((images, self.embedder.embed_images([inputs[i].data for i in images])),
                                (texts, self.embedder.embed_texts([inputs[i].data for i in texts]))):
            for position, index in enumerate(indices):
                vectors[index] = result.vector(position).tolist() if position not in result.errors else None
                if position in result.errors:
                    reasons[index] = result.errors[position]
        for index, reason in reasons.items():
            self.logger.warning(f"item {inputs[index].item_id}: no embedding: {reason}")
        return vectors

    # ---- predict (zero-shot classification) ---------------------------------------------

    # ---- train / evaluate ----------------------------------------------------------------

    # ---- helpers -------------------------------------------------------------------------
    def _require_loaded(self) -> None:
        if self.clip is None or self.embedder is None:
            raise ClipAdapterFailure("CLIP adapter: no model loaded; call load() (or load_from_model) first")

