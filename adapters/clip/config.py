"""The configuration users edit in Dataloop's Model Management UI, as one validated model.

`ClipConfig.from_dict` is the only way in: it maps the earlier adapter's misspelt keys
(`early_stopping`, `episilon`) to the real ones with a warning, reads its `weights_filename`,
and turns pydantic's errors into one readable `ConfigError`. An unknown key names the closest
valid one; it is an error where the person who typed it is there to fix it (the CLI:
`unknown_keys="error"`, the default), and only a warning on the platform
(`unknown_keys="warn"`), where a key from a later platform release or another app must never
stop a deployed model.
The validated config is recorded in every checkpoint this project writes.
"""
from __future__ import annotations

import difflib
import logging
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B/32"

# Published CLIP fine-tuning of pretrained weights uses about 5e-6 to 3e-5 with AdamW
# (see docs/fine-tuning.md); the earlier adapter's 5e-8 barely moved the weights.
DEFAULT_LEARNING_RATE = 1e-5

# Keys the earlier Dataloop CLIP adapter wrote into its models' configuration.
LEGACY_ALIASES = {"early_stopping": "early_stop", "episilon": "epsilon"}

# Keys the Dataloop platform itself may add to a model's configuration; not ours to validate.
PLATFORM_KEYS = frozenset({"id_to_label_map", "label_to_id_map"})

Monitor = Literal["mean_recall", "recall@1", "loss"]
# engines.ENGINES, spelt out for pydantic (tests/test_engines.py checks they stay the same)
Engine = Literal["auto", "torch", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16",
                 "openvino-bf16-matmul"]


class ClipConfig(BaseModel):
    """Every key the adapter reads, with the documented defaults."""

    # allow_inf_nan=False: every number here is meaningless at infinity or NaN (`epsilon=Infinity`
    # trained silently while learning nothing; `weight_decay=Infinity` diverged to NaN).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    # --- the seed's documented keys -------------------------------------------------
    model_name: str = Field(DEFAULT_MODEL, min_length=1, description=(
        "An OpenAI CLIP name (RN50 ... ViT-L/14@336px), an open_clip 'ARCH:PRETRAINED' pair, "
        "or a local checkpoint path."))
    batch_size: int = Field(128, ge=1, description="Contrastive batch size for training; also the embedding batch size.")
    num_epochs: int = Field(100, ge=1, description="Maximum number of training epochs.")
    early_stop: bool = Field(True, description="Stop when the monitored validation metric stops improving.")
    early_stopping_epochs: int = Field(5, ge=1, description="Patience: epochs without improvement before stopping.")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas, each in [0, 1).")
    epsilon: float = Field(1e-6, gt=0, description="AdamW epsilon.")
    learning_rate: float = Field(DEFAULT_LEARNING_RATE, gt=0, le=1.0, description="Peak learning rate (after warmup).")
    weight_decay: float = Field(0.001, ge=0, description="AdamW weight decay (not applied to biases, norms, logit scale).")

    # --- platform bookkeeping ---------------------------------------------------------
    weights_filename: Optional[str] = Field(None, min_length=1, description=(
        "The earlier Dataloop CLIP adapter's weights file among the model's artifacts (it wrote 'best.pt'); "
        "loaded when the artifacts hold no checkpoint of this project's format."))
    embeddings_size: Optional[int] = Field(None, ge=1, description="Written by the adapter from the loaded model.")

    # --- training extras --------------------------------------------------------------
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of all steps spent warming up linearly.")
    monitor: Monitor = Field("mean_recall", description="Validation metric that early stopping and 'best' watch.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change of the monitored metric that counts as better.")
    grad_clip_norm: Optional[float] = Field(1.0, gt=0, description="Clip the gradient norm to this; null disables.")
    freeze: Literal["none", "image", "text"] = Field("none", description="Freeze one tower during fine-tuning.")
    grad_cache_chunk: int = Field(0, ge=0, description=(
        "Gradient caching: encode the contrastive batch in chunks of this size (0 = off), so the batch can "
        "exceed what fits in memory."))
    wise_ft_alpha: Optional[Union[float, Literal["auto"]]] = Field(None, description=(
        "WiSE-FT: interpolate fine-tuned and starting weights (1.0 = fine-tuned only); 'auto' picks it on validation."))
    seed: int = Field(0, description="Seed for a reproducible run.")
    resume_upload_minutes: float = Field(30.0, ge=0, description=(
        "On the platform: at the end of an epoch, upload the training's resume state to the model's artifacts "
        "when this many minutes have passed since the last upload, so a pod killed outright loses at most that "
        "much training (0: only when training fails)."))

    # --- runtime ----------------------------------------------------------------------
    device: str = Field("auto", description="'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda', 'cuda:1', 'mps'.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description=(
        "'auto': fp32 on CPU, fp16/bf16 autocast on GPU."))
    engine: Engine = Field("auto", description=(
        "What runs inference (training is always torch): 'auto' measures torch, ONNX Runtime (fp32, int8) "
        "and OpenVINO (fp32, bf16, bf16 matrix products) on this CPU at first load and keeps the fastest "
        "that agrees with torch; 'torch'; or by name 'onnxruntime', 'onnxruntime-int8', 'openvino', "
        "'openvino-bf16', 'openvino-bf16-matmul' (docs/benchmarks.md). GPUs use torch."))
    num_workers: int = Field(2, ge=0, description=(
        "Parallel image decoding beside the model: threads when embedding, processes when training."))

    # --- zero-shot predict --------------------------------------------------------------
    labels: Optional[list[str]] = Field(None, description="Zero-shot labels when the model entity has none.")
    prompt_templates: list[str] = Field(["a photo of a {}."], min_length=1, description=(
        "Templates turning a label into a text prompt; their embeddings are averaged."))
    top_k: int = Field(1, ge=1, description="How many labels predict returns per image.")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        head = value.split(":", 1)[0]
        if head not in {"auto", "cpu", "cuda", "mps"}:
            raise ValueError(f"must be 'auto', 'cpu', 'cuda[:N]' or 'mps', got {value!r}")
        return value

    @field_validator("prompt_templates")
    @classmethod
    def _templates_have_slot(cls, value: list[str]) -> list[str]:
        for template in value:
            if "{}" not in template:
                raise ValueError(f"template {template!r} has no '{{}}' for the label")
        return value

    @field_validator("wise_ft_alpha")
    @classmethod
    def _alpha_in_range(cls, value):
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise ValueError(f"must be in [0, 1] or 'auto', got {value}")
        return value

    # ------------------------------------------------------------------------------------
    @classmethod
    def valid_keys(cls) -> list[str]:
        return list(cls.model_fields)

    @classmethod
    def from_dict(cls, raw: Optional[dict[str, Any]] = None,
                  warn: Callable[[str], None] = log.warning,
                  unknown_keys: Literal["error", "warn"] = "error") -> "ClipConfig":
        """Validate a configuration dict. Raises `ConfigError` naming every bad key; with
        `unknown_keys="warn"` an unknown key is one warning (naming the closest key) and ignored."""
        data = _resolve_aliases(dict(raw or {}), warn, strict=unknown_keys == "error")
        for key in PLATFORM_KEYS:
            data.pop(key, None)
        unknown = [key for key in data if key not in cls.model_fields]
        if unknown and unknown_keys == "error":
            raise ConfigError(_unknown_keys_message(unknown, cls.valid_keys()))
        for key in unknown:
            warn(f"ignored {_unknown_keys_message([key], cls.valid_keys(), list_valid=False)}")
            data.pop(key)
        try:
            return cls(**data)
        except ValidationError as exc:
            raise ConfigError(_readable(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists), as stored in checkpoints and on the model entity."""
        return self.model_dump(mode="json")

    def updated(self, **changes: Any) -> "ClipConfig":
        """A validated copy with `changes` applied (e.g. command-line overrides)."""
        return ClipConfig.from_dict({**self.to_dict(), **changes})


def _resolve_aliases(data: dict[str, Any], warn: Callable[[str], None], strict: bool = True) -> dict[str, Any]:
    for old, new in LEGACY_ALIASES.items():
        if old not in data:
            continue
        value = data.pop(old)
        if new in data and data[new] != value:
            conflict = (f"both '{old}' ({value!r}) and '{new}' ({data[new]!r}) are set; "
                        f"'{old}' is the earlier adapter's spelling, keep only '{new}'")
            if strict:
                raise ConfigError(conflict)
            warn(f"{conflict}; using '{new}'")
            continue
        data.setdefault(new, value)
        warn(f"configuration key '{old}' is deprecated; read as '{new}' (rename it in the model's configuration)")
    return data


def _unknown_keys_message(unknown: list[str], valid: list[str], list_valid: bool = True) -> str:
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        parts.append(f"'{key}'{hint}")
    message = f"unknown configuration key {', '.join(parts)}"
    return f"{message}; valid keys: {', '.join(valid)}" if list_valid else message


def _readable(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "configuration"
        msg = err["msg"].removeprefix("Value error, ")
        got = f" (got {err.get('input')!r})" if "got" not in msg else ""
        lines.append(f"{where}: {msg}{got}")
    return "invalid configuration: " + "; ".join(lines)
