"""Model names, `load_model()`, checkpoint formats and fingerprints.

Everything that turns a name or a file into a runnable CLIP lives here:

- OpenAI's names (`ViT-B/32`, `RN50x4`, ...) map to open_clip architectures *with QuickGELU*:
  OpenAI trained with QuickGELU, and open_clip's plain configs use exact GELU, so loading
  OpenAI weights into them gives quietly wrong embeddings.
- `ARCH:PRETRAINED` is any open_clip pair (`ViT-B-32:laion2b_s34b_b79k`), a weights file
  (`ViT-B-32-quickgelu:/path/weights.safetensors`), or `ARCH:random` for untrained weights.
- A local path: this project's checkpoint directory, the earlier adapter's `best.pt`, or an
  open_clip state dict (then the architecture comes from `arch=`).
- `tiny` is a real, small CLIP registered with open_clip for tests and the demo.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import inspect
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .errors import CheckpointError, ModelLoadError, WeightsUnavailableError
from .files import atomic_directory, atomic_path, write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B/32"
TINY = "tiny"
RANDOM_TAGS = frozenset({"random", "none", "scratch"})
MODELS_HINT = "`python -m adapters.clip models` lists the model names"
# Names a newcomer can always load, offline included: said wherever a model name was not understood.
OFFLINE_NAMES = ("'tiny' (a small test model, random weights) or 'ARCH:random' such as 'ViT-B/32:random' "
                 "(untrained: everything runs offline, the rankings mean nothing)")

# OpenAI's released models -> open_clip architectures that use QuickGELU, like OpenAI's code.
OPENAI_MODELS: dict[str, str] = {
    "RN50": "RN50-quickgelu",
    "RN101": "RN101-quickgelu",
    "RN50x4": "RN50x4-quickgelu",
    "RN50x16": "RN50x16-quickgelu",
    "RN50x64": "RN50x64-quickgelu",
    "ViT-B/32": "ViT-B-32-quickgelu",
    "ViT-B/16": "ViT-B-16-quickgelu",
    "ViT-L/14": "ViT-L-14-quickgelu",
    "ViT-L/14@336px": "ViT-L-14-336-quickgelu",
}

CHECKPOINT_CONFIG = "clip_config.json"
CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_FORMAT = "clip-adapter-checkpoint"
CHECKPOINT_VERSION = 1
LEGACY_CHECKPOINT = "best.pt"
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# Keys OpenAI's JIT archives carry that are not parameters.
_OPENAI_NON_PARAMS = ("input_resolution", "context_length", "vocab_size")

NETWORK_PROBE_TIMEOUT_S = 3.0

open_clip.add_model_config(Path(__file__).parent / "model_configs")


class _DropRandomInitNotice(logging.Filter):
    """open_clip logs a root warning for every model built without weights; we build those on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


logging.getLogger().addFilter(_DropRandomInitNotice())


# --------------------------------------------------------------------------------------
# Devices and precision
# --------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; anything else is checked, not trusted."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available here; use 'cpu' or 'auto'")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r} requested but MPS is not available here; use 'cpu' or 'auto'")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 on CPU (autocast there is slow and lossy); bf16 where the GPU has it, else fp16."""
    if precision != "auto":
        if device.type == "cpu" and precision != "fp32":
            log.warning("precision %s requested on CPU; using fp32", precision)
            return "fp32"
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps":
        return "fp16"
    return "fp32"


_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------
# The loaded model
# --------------------------------------------------------------------------------------
@dataclass
class ClipModel:
    """What is needed to embed and fine-tune: the network, its transforms and tokenizer.

    Weights stay fp32 (also on GPU, where autocast does the low-precision math), so the
    same object serves inference and training with fp32 master weights.
    """

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]          # eval transform: PIL RGB -> (3, H, W)
    preprocess_train: Callable[[Any], torch.Tensor]    # with open_clip's light augmentation
    tokenizer: Callable[[Sequence[str]], torch.Tensor]  # -> (N, context_length) int64
    dim: int
    name: str            # what the user asked for
    arch: str            # open_clip architecture name
    source: str          # where the weights came from, for people
    device: torch.device
    precision: str
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    extra_info: dict[str, Any] = field(default_factory=dict)  # checkpoint metadata, if any
    engine: Optional[Any] = None  # an exported `engines.Engine` for inference; None: eager torch
    # The files the weights were read from ([] for a seeded random init); None once they changed in
    # memory. Lets the export cache find the fingerprint from the files' identity (export_cache.py).
    weights_files: Optional[list[str]] = None

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg.get("size", 224)
        return int(max(size) if isinstance(size, (tuple, list)) else size)

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    @cached_property
    def fingerprint(self) -> str:
        """Changes when the architecture or any weight changes (blake2b over every tensor)."""
        return fingerprint_state(self.arch, self.model.state_dict())

    def forget_fingerprint(self) -> None:
        """Call after changing the weights in place (training does): an export of the old weights goes too."""
        self.__dict__.pop("fingerprint", None)
        self.weights_files = None
        self.use_torch()

    def use_torch(self) -> None:
        """Drop the exported engine: inference runs on the torch model again (training does this)."""
        self.engine = None

    @property
    def engine_name(self) -> str:
        return self.engine.name if self.engine is not None else "torch"

    @property
    def description(self) -> str:
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        return (f"{self.name}: open_clip {self.arch}, weights {self.source}, {self.dim}-d, "
                f"{params:.1f}M parameters, {self.device.type} {self.precision}, engine {self.engine_name}")

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def encode_images(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        """(B, 3, H, W) preprocessed pixels -> (B, D) L2-normalised float32, on the engine if there is one."""
        if self.engine is not None:
            return self.engine.encode_images(_as_numpy(pixels))
        return self.torch_encode_images(torch.as_tensor(pixels))

    def encode_tokens(self, tokens: torch.Tensor | np.ndarray) -> np.ndarray:
        """(B, L) token ids -> (B, D) L2-normalised float32, on the engine if there is one."""
        if self.engine is not None:
            return self.engine.encode_tokens(_as_numpy(tokens))
        return self.torch_encode_tokens(torch.as_tensor(tokens))

    @torch.inference_mode()
    def torch_encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        self.model.eval()
        with self.autocast():
            features = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return F.normalize(features.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def torch_encode_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        self.model.eval()
        with self.autocast():
            features = self.model.encode_text(tokens.to(self.device, non_blocking=True))
        return F.normalize(features.float(), dim=-1).cpu().numpy()

    def warmup(self) -> None:
        """Run both towers once on a grey picture and a short text, so the first real request is not the
        slow one; a model that answers them with NaN or inf is refused here (`ModelLoadError`), before
        it serves anything: a NaN weight, or preprocessing that divides by a zero std."""
        from PIL import Image

        grey = self.preprocess(Image.new("RGB", (self.image_size, self.image_size), (128, 128, 128)))
        towers = {"image": self.encode_images(torch.as_tensor(grey).unsqueeze(0)),
                  "text": self.encode_tokens(self.tokenizer(["warm up"]))}
        broken = [tower for tower, vectors in towers.items() if not np.isfinite(vectors).all()]
        if broken:
            raise ModelLoadError(f"{self.name} ({self.source}) gives NaN or infinite vectors from its "
                                 f"{' and '.join(broken)} tower{'s' if len(broken) > 1 else ''} on a test input: "
                                 f"its weights or preprocessing are broken (a NaN weight, preprocess std 0?); "
                                 f"not loaded")


def _as_numpy(array: torch.Tensor | np.ndarray) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def fingerprint_state(arch: str, state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(arch.encode())
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name: which architecture, and which weights."""

    kind: str            # 'pretrained' | 'random' | 'project' | 'state_dict'
    arch: Optional[str]  # None only while a state dict still needs one
    weights: Optional[str] = None  # pretrained tag or a file/directory path
    name: str = ""


def resolve_arch(name: str) -> str:
    """OpenAI names and open_clip architecture names -> a registered open_clip architecture."""
    if name in OPENAI_MODELS:
        return OPENAI_MODELS[name]
    if name in open_clip.list_models():
        return name
    cleaned = name.replace("/", "-")
    if cleaned in open_clip.list_models():
        return cleaned
    close = similar_model_names(name)
    guess = f"did you mean {close[0]!r}? " if close else ""
    raise ModelLoadError(
        f"unknown model architecture {name!r}; {guess}OpenAI models: {', '.join(OPENAI_MODELS)}; {OFFLINE_NAMES}; "
        f"or any open_clip architecture (`python -m adapters.clip models --all` lists them)")


def similar_model_names(name: str) -> list[str]:
    """Known names that `name` is probably a typo of: same letters in another case first, then close ones."""
    known = [*OPENAI_MODELS, TINY, *open_clip.list_models()]
    same = [k for k in known if k.lower() == name.lower()]
    by_lower = {k.lower(): k for k in reversed(known)}  # the first spelling of each wins
    swapped = [k for k in known if len(name) >= 3 and sorted(k.lower()) == sorted(name.lower())]  # 'tiyn'
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.8)
    return list(dict.fromkeys(same + swapped + [by_lower[c] for c in close]))


def parse_model_spec(name: str, arch: Optional[str] = None) -> ModelSpec:
    """Decide what `name` means. `arch` names the architecture for bare weight files."""
    name = str(name).strip()
    if not name:
        raise ModelLoadError("empty model name")
    path = Path(name).expanduser()
    if path.exists():
        return _spec_for_path(path, arch, name)
    if name in OPENAI_MODELS:
        return ModelSpec("pretrained", OPENAI_MODELS[name], "openai", name)
    if ":" in name:
        arch_part, weights = name.split(":", 1)
        resolved = resolve_arch(arch_part)
        if weights.lower() in RANDOM_TAGS:
            return ModelSpec("random", resolved, None, name)
        weights_path = Path(weights).expanduser()
        if weights_path.exists():
            return ModelSpec("state_dict", resolved, str(weights_path), name)
        if _looks_like_path(weights):
            raise ModelLoadError(f"weights file {weights!r} (from model name {name!r}) does not exist")
        return ModelSpec("pretrained", _with_tag_activation(resolved, weights), weights, name)
    if name == TINY:
        return ModelSpec("random", TINY, None, name)
    if _looks_like_path(name):
        close = similar_model_names(name)
        if close:
            raise ModelLoadError(f"unknown model {name!r} (no such name, and no such path); did you mean "
                                 f"{close[0]!r}? {MODELS_HINT}")
        raise ModelLoadError(f"model path {name!r} does not exist, and it is no model name: OpenAI models are "
                             f"{', '.join(OPENAI_MODELS)}; {OFFLINE_NAMES} ({MODELS_HINT})")
    resolved = resolve_arch(name)
    tags = open_clip.list_pretrained_tags_by_model(resolved)
    raise ModelLoadError(
        f"{name!r} is an architecture without weights; name them as '{resolved}:TAG' "
        f"(tags: {', '.join(tags) or 'none'}), '{resolved}:/path/to/weights', or '{resolved}:random'")


def _with_tag_activation(arch: str, tag: str) -> str:
    """Weights trained with QuickGELU need the QuickGELU variant of the architecture.

    open_clip only warns about the mismatch (e.g. 'ViT-B-32:openai'); the embeddings would be wrong.
    """
    wants_quick_gelu = open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False)
    has_quick_gelu = (open_clip.get_model_config(arch) or {}).get("quick_gelu", False)
    variant = f"{arch}-quickgelu"
    if wants_quick_gelu and not has_quick_gelu and variant in open_clip.list_models():
        return variant
    return arch


def _looks_like_path(text: str) -> bool:
    return os.sep in text or text.startswith(".") or text.endswith(STATE_DICT_SUFFIXES)


def _spec_for_path(path: Path, arch: Optional[str], name: str) -> ModelSpec:
    if path.is_dir():
        if (path / CHECKPOINT_CONFIG).is_file():
            return ModelSpec("project", None, str(path), name)
        if (path / LEGACY_CHECKPOINT).is_file():
            return ModelSpec("state_dict", _arch_or_none(arch), str(path / LEGACY_CHECKPOINT), name)
        files = sorted(p for p in path.iterdir() if p.suffix in STATE_DICT_SUFFIXES)
        if len(files) == 1:
            return ModelSpec("state_dict", _arch_or_none(arch), str(files[0]), name)
        raise CheckpointError(
            f"{path}: expected a checkpoint directory ({CHECKPOINT_CONFIG} + {CHECKPOINT_WEIGHTS}), "
            f"a {LEGACY_CHECKPOINT}, or a single weights file; found {len(files)} weights files")
    if path.name == CHECKPOINT_CONFIG:
        return ModelSpec("project", None, str(path.parent), name)
    if path.suffix in STATE_DICT_SUFFIXES:
        return ModelSpec("state_dict", _arch_or_none(arch), str(path), name)
    raise CheckpointError(f"{path}: not a checkpoint (expected a directory or a {'/'.join(STATE_DICT_SUFFIXES)} file)")


def _arch_or_none(arch: Optional[str]) -> Optional[str]:
    return resolve_arch(arch) if arch else None


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
def load_model(name: str = DEFAULT_MODEL, *, device: str | torch.device = "auto", precision: str = "auto",
               arch: Optional[str] = None, cache_dir: Optional[str] = None) -> ClipModel:
    """Load a CLIP by name or path (see the module docstring). Raises `ModelLoadError`.

    It runs on torch; `onnx_export.attach_engine(clip, engine)` moves its inference to an exported engine.
    """
    spec = parse_model_spec(name, arch)
    torch_device = resolve_device(device)
    with _model_lock(spec), no_implicit_root_handler():  # one load at a time: no doubled downloads or memory peak
        return _load(spec, torch_device, precision, cache_dir)


@contextlib.contextmanager
def no_implicit_root_handler() -> Iterator[None]:
    """While open_clip builds a model, its module-level `logging.info` calls must not configure logging.

    `logging.info` calls `basicConfig()` when the root logger has no handler; from then on the process
    printed every record that reached the root at any level, dtlpy's DEBUG log included (a line per
    cookie read, several per download, in a model service's log). A NullHandler on the root while open_clip
    runs makes that call a no-op; a handler the application set up itself is left alone."""
    root = logging.getLogger()
    if root.handlers:
        yield
        return
    guard = logging.NullHandler()
    root.addHandler(guard)
    try:
        yield
    finally:
        root.removeHandler(guard)


_MODEL_LOCKS: dict[tuple, threading.Lock] = {}
_MODEL_LOCKS_GUARD = threading.Lock()


def _model_lock(spec: ModelSpec) -> threading.Lock:
    """The lock of one model (architecture and weights): threads loading other models are not held up."""
    key = (spec.kind, spec.arch, spec.weights)
    with _MODEL_LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(key, threading.Lock())


def _load(spec: ModelSpec, torch_device: torch.device, precision: str, cache_dir: Optional[str]) -> ClipModel:
    if spec.kind == "project":
        model, arch_name, preprocess_cfg, source, info = _load_project_checkpoint(Path(spec.weights))
        weights_files = [str(Path(spec.weights) / CHECKPOINT_WEIGHTS)]
    else:
        if spec.arch is None:
            raise CheckpointError(
                f"{spec.weights}: a bare weights file does not say its architecture; set model_name to the "
                f"model it was trained from (e.g. 'ViT-B/32'), or name it 'ARCH:{spec.weights}'")
        arch_name, info = spec.arch, {}
        model, preprocess_cfg, source, weights_files = _build(spec, cache_dir)
    model = model.float().to(torch_device).eval()
    clip = _assemble(model, arch_name, spec.name, source, torch_device, precision, preprocess_cfg, info)
    clip.weights_files = weights_files
    return clip


def _assemble(model: torch.nn.Module, arch: str, name: str, source: str, device: torch.device,
              precision: str, preprocess_cfg: dict, info: dict) -> ClipModel:
    pp_cfg = open_clip.transform.PreprocessCfg(**{k: v for k, v in preprocess_cfg.items()
                                                  if k in open_clip.transform._PREPROCESS_KEYS})
    preprocess = open_clip.image_transform(pp_cfg.size, is_train=False, mean=pp_cfg.mean, std=pp_cfg.std,
                                           interpolation=pp_cfg.interpolation, resize_mode=pp_cfg.resize_mode,
                                           fill_color=pp_cfg.fill_color)
    preprocess_train = open_clip.image_transform(pp_cfg.size, is_train=True, mean=pp_cfg.mean, std=pp_cfg.std,
                                                 interpolation=pp_cfg.interpolation,
                                                 resize_mode=pp_cfg.resize_mode, fill_color=pp_cfg.fill_color)
    tokenizer = open_clip.get_tokenizer(arch)
    cfg = open_clip.get_model_config(arch) or {}
    dim = int(cfg.get("embed_dim") or _probe_dim(model, device))
    return ClipModel(model=model, preprocess=preprocess, preprocess_train=preprocess_train, tokenizer=tokenizer,
                     dim=dim, name=name, arch=arch, source=source, device=device,
                     precision=resolve_precision(precision, device),
                     preprocess_cfg=dict(open_clip.transform.asdict(pp_cfg)), extra_info=info)


def _probe_dim(model: torch.nn.Module, device: torch.device) -> int:
    with torch.inference_mode():
        size = open_clip.get_model_preprocess_cfg(model).get("size", 224)
        size = size if isinstance(size, int) else size[0]
        return int(model.encode_image(torch.zeros(1, 3, size, size, device=device)).shape[-1])


def _build(spec: ModelSpec, cache_dir: Optional[str]) -> tuple[torch.nn.Module, dict, str, list[str]]:
    """Architecture + weights for the 'pretrained', 'random' and 'state_dict' kinds, and the weights' file."""
    preprocess_cfg = default_preprocess_cfg(spec.arch)
    if spec.kind == "random":
        return _new_model(spec.arch), preprocess_cfg, "random (seed 0)", []
    if spec.kind == "pretrained":
        weights_file, tag_cfg = fetch_pretrained(spec.arch, spec.weights, cache_dir=cache_dir, name=spec.name)
        preprocess_cfg = open_clip.transform.merge_preprocess_dict(preprocess_cfg, tag_cfg)
        model = _new_model(spec.arch)
        _load_weights(model, read_state_dict(Path(weights_file)), Path(weights_file), spec.arch)
        return model, preprocess_cfg, f"{spec.weights} ({weights_file})", [str(weights_file)]
    model = _new_model(spec.arch)
    _load_weights(model, read_state_dict(Path(spec.weights)), Path(spec.weights), spec.arch)
    return model, preprocess_cfg, str(spec.weights), [str(spec.weights)]


def default_preprocess_cfg(arch: str) -> dict[str, Any]:
    """open_clip's defaults (OpenAI mean/std, bicubic) at the architecture's image size."""
    cfg = open_clip.get_model_config(arch) or {}
    base = open_clip.transform.merge_preprocess_dict(open_clip.transform.PreprocessCfg(),
                                                     cfg.get("preprocess_cfg", {}))
    base["size"] = cfg.get("vision_cfg", {}).get("image_size", base["size"])
    return base


def _new_model(arch: str) -> torch.nn.Module:
    """Randomly initialised architecture; seeded so 'tiny' twice is the same model.

    Its random draws come from a generator of its own, never from torch's global one: that is
    shared by every thread, so ten threads building 'tiny' at once got ten different models (and
    disturbed the draws of any other thread). The weights are those of the global generator seeded 0.
    """
    if _INIT_TAKES_GENERATOR:
        with _PrivateGenerator(torch.Generator().manual_seed(0)):
            return open_clip.create_model(arch, pretrained=None, device="cpu")
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):  # torch < 2.2: nn.init draws globally
        torch.manual_seed(0)
        return open_clip.create_model(arch, pretrained=None, device="cpu")


# The random functions a model's construction calls, to which `_PrivateGenerator` hands its generator.
_RANDOM_INIT = frozenset(getattr(torch.nn.init, name) for name in (
    "uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
    "xavier_normal_", "orthogonal_", "sparse_"))
_RANDOM_OPS = frozenset({
    torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.random_, torch.Tensor.bernoulli_,
    torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.log_normal_, torch.Tensor.cauchy_,
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal, torch.bernoulli, torch.multinomial})
_INIT_TAKES_GENERATOR = "generator" in inspect.signature(torch.nn.init.normal_).parameters
_GLOBAL_RNG_LOCK = threading.Lock()


class _PrivateGenerator(TorchFunctionMode):
    """Within it, this thread's random tensor ops and nn.init calls draw from `generator`.

    Torch function modes are per thread, so other threads' draws are untouched. nn.init functions
    are intercepted whole (the ops inside them no longer pass through the mode), hence both sets.
    """

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if (func in _RANDOM_OPS or func in _RANDOM_INIT) and kwargs.get("generator") is None:
            kwargs["generator"] = self.generator
        return func(*args, **kwargs)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from safetensors, or from a torch file loaded with weights_only=True.

    Accepts open_clip state dicts, open_clip training checkpoints (`state_dict`), and the
    earlier Dataloop adapter's `best.pt` (`model_state_dict` of OpenAI's CLIP).
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: weights file is empty (0 bytes)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            raw: Any = load_file(str(path), device="cpu")
        else:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure means "not what it claims"
        raise CheckpointError(
            f"{path}: not a readable weights file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            f"expected safetensors or a torch state dict (loaded with weights_only=True, so pickled "
            f"objects other than tensors are refused)") from None
    state = _unwrap_state_dict(raw, path)
    state = {k.removeprefix("module."): v for k, v in state.items() if k not in _OPENAI_NON_PARAMS}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _unwrap_state_dict(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(raw, dict):
        for key in ("model_state_dict", "state_dict"):
            if key in raw and isinstance(raw[key], dict):
                raw = raw[key]
                break
        tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(
        f"{path}: holds no model weights; expected a state dict of tensors, an open_clip checkpoint "
        f"('state_dict') or the earlier adapter's best.pt ('model_state_dict')")


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Strict load with a readable account of what does not fit."""
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs {arch} {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise CheckpointError(f"{path}: weights do not fit architecture {arch}: {'; '.join(parts)}. "
                              f"Is model_name the model these weights were trained from?")
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------
# Pretrained weights: cache first, then a bounded network probe, then download
# --------------------------------------------------------------------------------------
def fetch_pretrained(arch: str, tag: str, *, cache_dir: Optional[str] = None,
                     name: Optional[str] = None) -> tuple[str, dict]:
    """Local path of the weights for (arch, tag), downloading them if the network allows.

    Fails within seconds, not after a retry loop, when they are neither cached nor reachable.
    """
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ModelLoadError(f"unknown pretrained tag {tag!r} for {arch}; known tags: {', '.join(tags) or 'none'}")
    label = name or f"{arch}:{tag}"
    if tag_cfg.get("hf_hub"):
        return _fetch_from_hf(tag_cfg["hf_hub"], cache_dir, label), tag_cfg
    return _fetch_from_url(tag_cfg["url"], cache_dir, label), tag_cfg


def _hf_candidates(hf_hub: str) -> tuple[str, list[str]]:
    """open_clip writes 'org/repo/' (default file name) or 'org/repo/file.bin'; safetensors first."""
    repo_id, filename = os.path.split(hf_hub)
    filename = filename or open_clip.constants.HF_WEIGHTS_NAME
    names = [filename]
    if filename == open_clip.constants.HF_WEIGHTS_NAME:
        names.insert(0, open_clip.constants.HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.insert(0, filename.rsplit(".", 1)[0] + ".safetensors")
    return repo_id, names


def _fetch_from_hf(hf_hub: str, cache_dir: Optional[str], label: str) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub import constants as hf_constants

    repo_id, names = _hf_candidates(hf_hub)
    for filename in names:
        try:
            return hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached under this name
            continue
    where = cache_dir or hf_constants.HF_HUB_CACHE
    _require_network(hf_constants.ENDPOINT, label, f"Hugging Face cache {where} (repo {repo_id})")
    last_error: Optional[Exception] = None
    for filename in names:
        try:
            return hf_hub_download(repo_id, filename, cache_dir=cache_dir, etag_timeout=5)
        except Exception as exc:  # noqa: BLE001 - try the next file name
            last_error = exc
    raise WeightsUnavailableError(f"could not download weights for {label} from {repo_id}: {last_error}")


def _fetch_from_url(url: str, cache_dir: Optional[str], label: str) -> str:
    target_dir = Path(cache_dir or os.path.expanduser("~/.cache/clip"))
    target = target_dir / os.path.basename(url)
    if target.is_file() and target.stat().st_size > 0:
        return str(target)
    _require_network(url, label, str(target))
    from open_clip.pretrained import download_pretrained_from_url
    return download_pretrained_from_url(url, cache_dir=str(target_dir))


def _require_network(url: str, label: str, looked_in: str) -> None:
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urllib.parse.urlparse(proxy or url)
    probe = target.hostname or url
    port = target.port or (80 if target.scheme == "http" else 443)
    if not host_reachable(probe, port):
        raise WeightsUnavailableError(
            f"weights for {label} are not cached and {probe}:{port} cannot be reached (offline?). "
            f"Looked in {looked_in}. Supply them locally: {WeightsUnavailableError.HOW_TO_PASS} a checkpoint "
            f"directory or 'ARCH:/path/to/weights.safetensors', or run `python -m adapters.clip download "
            f"{label}` on a machine with network and copy its cache (HF_HOME) here")


def host_reachable(host: str, port: int = 443, timeout: float = NETWORK_PROBE_TIMEOUT_S) -> bool:
    """TCP connect with a hard deadline: DNS lookups cannot be timed out, so run it in a thread."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


# --------------------------------------------------------------------------------------
# The project's checkpoint format: a directory with safetensors weights and a JSON file
# --------------------------------------------------------------------------------------
def find_checkpoint(directory: str | Path, weights_filename: Optional[str] = None) -> Optional[Path]:
    """The checkpoint inside a model's artifact directory, if any: this project's format first,
    then the earlier adapter's weights file (`weights_filename`, which it defaulted to best.pt)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    if (directory / CHECKPOINT_CONFIG).is_file():
        return directory
    legacy = directory / (weights_filename or LEGACY_CHECKPOINT)
    return legacy if legacy.is_file() else None  # an untrained model of that adapter has none yet


def save_checkpoint(clip: ClipModel, directory: str | Path, *, config: Optional[dict] = None,
                    metrics: Optional[dict] = None, extra: Optional[dict] = None,
                    replace_directory: bool = True) -> Path:
    """Write a checkpoint; a process killed at any moment leaves a loadable one in place.

    replace_directory=True builds the directory beside and swaps it in whole (old or new,
    never half). False writes the two files into an existing directory, each through a
    temp file and a rename, leaving other files there alone (Dataloop uploads the lot).
    """
    directory = Path(directory)
    if replace_directory:
        with atomic_directory(directory) as tmp:
            write_checkpoint_files(clip, tmp, config=config, metrics=metrics, extra=extra)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        write_checkpoint_files(clip, directory, config=config, metrics=metrics, extra=extra)
    return directory


def write_checkpoint_files(clip: ClipModel, directory: Path, *, config: Optional[dict] = None,
                           metrics: Optional[dict] = None, extra: Optional[dict] = None) -> None:
    """The two files of a checkpoint, each written atomically; the JSON last, as it vouches for the weights."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in clip.model.state_dict().items()}
    with atomic_path(directory / CHECKPOINT_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    info = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": clip.arch,
        "embed_dim": clip.dim,
        "model_cfg": open_clip.get_model_config(clip.arch),
        "preprocess": clip.preprocess_cfg,
        "source": clip.source,
        "fingerprint": fingerprint_state(clip.arch, state),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "metrics": metrics,
        **(extra or {}),
    }
    write_json_atomic(directory / CHECKPOINT_CONFIG, info)


def read_checkpoint_info(directory: str | Path) -> dict[str, Any]:
    """The JSON half of a project checkpoint, validated."""
    path = Path(directory) / CHECKPOINT_CONFIG
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; is {directory} a checkpoint directory?") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint description ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} file (format={info.get('format') if isinstance(info, dict) else None!r})")
    if int(info.get("version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: format version {info['version']} is newer than this code reads "
                              f"({CHECKPOINT_VERSION}); upgrade the adapter")
    for key in ("arch", "embed_dim"):
        if key not in info:
            raise CheckpointError(f"{path}: missing '{key}'")
    return info


def _load_project_checkpoint(directory: Path) -> tuple[torch.nn.Module, str, dict, str, dict]:
    info = read_checkpoint_info(directory)
    arch = info["arch"]
    if arch not in open_clip.list_models():
        raise CheckpointError(f"{directory}: architecture {arch!r} is not known to this open_clip; "
                              f"upgrade open-clip-torch")
    model = _new_model(arch)
    weights = directory / CHECKPOINT_WEIGHTS
    _load_weights(model, read_state_dict(weights), weights, arch)
    if int(info["embed_dim"]) != int((open_clip.get_model_config(arch) or {}).get("embed_dim", info["embed_dim"])):
        raise CheckpointError(f"{directory}: embed_dim {info['embed_dim']} does not match architecture {arch}")
    preprocess = info.get("preprocess") or open_clip.get_model_preprocess_cfg(model)
    return model, arch, preprocess, f"checkpoint {directory}", info


# --------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    name: str
    arch: str
    dim: int
    image_size: int
    cached: bool


def list_known_models(include_all: bool = False) -> list[ModelInfo]:
    """OpenAI's models and `tiny`; with include_all, every open_clip (arch, tag) pair."""
    rows = [_info(name, arch, "openai") for name, arch in OPENAI_MODELS.items()]
    rows.append(_info(TINY, TINY, None))
    if include_all:
        rows += [_info(f"{arch}:{tag}", arch, tag) for arch, tag in open_clip.list_pretrained()]
    return rows


def _info(name: str, arch: str, tag: Optional[str]) -> ModelInfo:
    cfg = open_clip.get_model_config(arch) or {}
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    return ModelInfo(name=name, arch=arch, dim=int(cfg.get("embed_dim", 0)),
                     image_size=int(size if isinstance(size, int) else size[0]),
                     cached=tag is None or is_cached(arch, tag))


def is_cached(arch: str, tag: str, cache_dir: Optional[str] = None) -> bool:
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not tag_cfg:
        return False
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache
        repo_id, names = _hf_candidates(tag_cfg["hf_hub"])
        return any(isinstance(try_to_load_from_cache(repo_id, n, cache_dir=cache_dir), str) for n in names)
    target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(tag_cfg.get("url", ""))
    return target.is_file()

