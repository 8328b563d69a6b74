"""Exported inference engines: where exports live, running them, and the `auto` choice on disk.

Torch-free on purpose: a cold `search` runs the exported text tower through this module
without importing torch (exporting, which needs torch, is in `onnx_export.py`).

Engines (the `engine` setting):
- `torch`: the model as loaded (eager PyTorch); training always uses it.
- `onnxruntime` (fp32), `onnxruntime-int8` (image tower through `quantize_dynamic`: int8 weights and
  activations; text tower fp32),
- `openvino` (fp32), `openvino-bf16` (`INFERENCE_PRECISION_HINT` bf16; needs AVX512-BF16 or AMX),
- `auto`: measured on this CPU at first load (see `onnx_export.choose_engine`), torch on GPUs.

Cache layout, one folder per model fingerprint (so a changed weight never reuses an export):

    <root>/<fingerprint>/export.json            what was exported (model, dim, tokenizer)
    <root>/<fingerprint>/{image,text}-fp32.onnx  the two towers, dynamic batch (+ .onnx.data: their weights)
    <root>/<fingerprint>/image-int8.onnx          the image tower dynamically quantized, made on demand
    <root>/<fingerprint>/auto-<cpu key>.json     `auto`'s measured choice on one kind of CPU
    <root>/<fingerprint>/openvino/               OpenVINO's compiled-model cache

`<root>` is beside the weights: `<checkpoint>/engines` for this project's checkpoints, else
`$CLIP_ADAPTER_ENGINES`, else `$XDG_CACHE_HOME/clip-adapter/engines` (~/.cache/...).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .errors import EngineError

log = logging.getLogger(__name__)

ENGINE_ENV = "CLIP_ADAPTER_ENGINES"
CHECKPOINT_CONFIG = "clip_config.json"  # models.CHECKPOINT_CONFIG, repeated here to stay torch-free
CHECKPOINT_ENGINES = "engines"
EXPORT_INFO = "export.json"
EXPORT_FORMAT = 1

TORCH = "torch"
AUTO = "auto"
# variant -> (runtime, precision of the image tower's ONNX file, runtime option). The text tower is
# always the fp32 file: it is cheap beside the image tower, and its int8 copy disagreed with torch
# (min cosine 0.9989 on ViT-B/32's probe set, below auto's 0.999) where the image tower's did not.
VARIANTS: dict[str, tuple[str, str, Optional[str]]] = {
    "onnxruntime": ("onnxruntime", "fp32", None),
    "onnxruntime-int8": ("onnxruntime", "int8", None),
    "openvino": ("openvino", "fp32", "f32"),
    "openvino-bf16": ("openvino", "fp32", "bf16"),
}
ENGINES = (AUTO, TORCH, *VARIANTS)
TOWERS = ("image", "text")


def check_engine_name(name: str) -> str:
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    return name


def runtime_installed(runtime: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(runtime) is not None


# --------------------------------------------------------------------------------------
# Where exports live
# --------------------------------------------------------------------------------------
def default_engine_root() -> Path:
    if os.environ.get(ENGINE_ENV):
        return Path(os.environ[ENGINE_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "clip-adapter" / CHECKPOINT_ENGINES


def engine_root_for(model_name: str) -> Path:
    """Beside the weights: inside a project checkpoint directory, else the library's cache."""
    path = Path(model_name).expanduser()
    if path.name == CHECKPOINT_CONFIG:
        path = path.parent
    if path.is_dir() and (path / CHECKPOINT_CONFIG).is_file() and os.access(path, os.W_OK):
        return path / CHECKPOINT_ENGINES
    return default_engine_root()


def export_dir(model_name: str, fingerprint: str) -> Path:
    return engine_root_for(model_name) / fingerprint


def tower_file(directory: Path, tower: str, precision: str) -> Path:
    return directory / f"{tower}-{precision}.onnx"


def read_export_info(directory: Path) -> Optional[dict[str, Any]]:
    """The export's description, or None when there is no complete export here."""
    try:
        info = json.loads((directory / EXPORT_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        return None
    if not all(tower_file(directory, t, "fp32").is_file() for t in TOWERS):
        return None
    return info


# --------------------------------------------------------------------------------------
# Which CPU this is (the `auto` choice is only valid on the kind of CPU it was measured on)
# --------------------------------------------------------------------------------------
def cpu_key() -> str:
    """Model name, instruction-set flags, core count and runtime versions, hashed."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    versions = " ".join(f"{r}={_version(r)}" for r in ("onnxruntime", "openvino"))
    text = f"{model}|{flags}|{os.cpu_count()}|{versions}"
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def _version(package: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def choice_file(directory: Path, cpu: Optional[str] = None) -> Path:
    return directory / f"auto-{cpu or cpu_key()}.json"


def read_choice(directory: Path, cpu: Optional[str] = None) -> Optional[dict[str, Any]]:
    try:
        choice = json.loads(choice_file(directory, cpu).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return choice if isinstance(choice, dict) and choice.get("engine") in ENGINES else None


def cached_choices(root: Optional[Path] = None) -> list[dict[str, Any]]:
    """Every `auto` choice measured on this CPU under `root` (for `models`)."""
    root = root or default_engine_root()
    cpu = cpu_key()
    rows = []
    for path in sorted(root.glob(f"*/auto-{cpu}.json")) if root.is_dir() else []:
        choice = read_choice(path.parent, cpu)
        if choice:
            rows.append(choice)
    return rows


def describe_choice(choice: dict[str, Any]) -> str:
    """'onnxruntime-int8 (2.41x torch; onnxruntime 1.12x, openvino-bf16 2.30x, ...)'."""
    figures = choice.get("figures", {})
    base = figures.get(TORCH, {}).get("seconds_per_image")

    def ratio(row: dict) -> str:
        seconds = row.get("seconds_per_image")
        if not row.get("ok"):
            return row.get("reason", "rejected")
        return f"{base / seconds:.2f}x" if base and seconds else "?"

    chosen = figures.get(choice["engine"], {})
    others = ", ".join(f"{name} {ratio(row)}" for name, row in figures.items() if name != choice["engine"])
    return f"{choice['engine']} ({ratio(chosen)} torch; {others})"


# --------------------------------------------------------------------------------------
# Running an exported tower
# --------------------------------------------------------------------------------------
Tower = Callable[[np.ndarray], np.ndarray]


def open_tower(path: Path, runtime: str, option: Optional[str], *, threads: Optional[int] = None,
               optimize: bool = True) -> Tower:
    """A callable running one exported ONNX file; raises EngineError when the runtime cannot.

    optimize=False skips ONNX Runtime's graph optimizations: for one query they cost more at
    session start than they save (the cold search path).
    """
    if not path.is_file():
        raise EngineError(f"{path}: no exported model here")
    try:
        if runtime == "onnxruntime":
            return _onnxruntime_tower(path, threads, optimize)
        if runtime == "openvino":
            return _openvino_tower(path, option or "f32", threads)
    except ImportError as exc:
        raise EngineError(f"{runtime} is not installed ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - any runtime failure means "cannot use this engine"
        raise EngineError(f"{runtime} cannot run {path.name}: {type(exc).__name__}: {exc}") from None
    raise EngineError(f"unknown runtime {runtime!r}")


def _onnxruntime_tower(path: Path, threads: Optional[int], optimize: bool) -> Tower:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # its warnings about unused initializers are noise to users
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(array: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: array})[0]

    return run


def _openvino_tower(path: Path, precision_hint: str, threads: Optional[int]) -> Tower:
    import openvino as ov

    core = ov.Core()
    core.set_property({"CACHE_DIR": str(path.parent / "openvino")})  # compiled once, imported after
    config = {"INFERENCE_PRECISION_HINT": precision_hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(str(path), "CPU", config)
    local = threading.local()  # an infer request is not thread-safe; one per calling thread

    def run(array: np.ndarray) -> np.ndarray:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        return np.array(request.infer({0: array})[0], copy=True)

    return run


def normalize_rows(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


@dataclass
class Engine:
    """Both towers of one exported model on one runtime; each tower opens on first use."""

    name: str
    directory: Path
    optimize: bool = True     # False: start fast, for a one-off query (see open_tower)
    note: str = ""            # why this engine: auto's measured figures, for the service log
    towers: dict[str, Tower] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def runtime(self) -> str:
        return VARIANTS[self.name][0]

    def tower(self, which: str) -> Tower:
        with self._lock:
            if which not in self.towers:
                runtime, precision, option = VARIANTS[self.name]
                precision = precision if which == "image" else "fp32"
                self.towers[which] = open_tower(tower_file(self.directory, which, precision), runtime, option,
                                                optimize=self.optimize)
            return self.towers[which]

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 preprocessed pixels -> (B, D) L2-normalised float32."""
        return normalize_rows(self.tower("image")(np.ascontiguousarray(pixels, dtype=np.float32)))

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """(B, L) int64 token ids -> (B, D) L2-normalised float32."""
        return normalize_rows(self.tower("text")(np.ascontiguousarray(tokens, dtype=np.int64)))


# --------------------------------------------------------------------------------------
# The cold path: a store's text tower without torch
# --------------------------------------------------------------------------------------
@dataclass
class ExportedTextModel:
    """Enough of a `ClipModel` for `Embedder.embed_texts`: the exported text tower and a tokenizer."""

    engine: Engine
    tokenizer: Callable[[Sequence[str]], np.ndarray]
    dim: int
    name: str
    preprocess: None = None   # no image tower here: image queries take the full model

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return self.engine.encode_tokens(np.asarray(tokens))


def cold_text_engine(requested: str) -> Optional[str]:
    """Which runtime answers a one-off text query: an explicit variant as asked; for `auto`, fp32
    ONNX Runtime (exact, and the quickest to start: `auto` measured image batches, not this)."""
    if requested == TORCH:
        return None
    if requested in VARIANTS:
        return requested
    for name in ("onnxruntime", "openvino"):
        if runtime_installed(name):
            return name
    return None


def open_exported_text_model(model_name: str, fingerprint: str, requested: str = AUTO) -> Optional[ExportedTextModel]:
    """The store model's exported text tower with a torch-free tokenizer, or None (then load torch)."""
    directory = export_dir(model_name, fingerprint)
    info = read_export_info(directory)
    if info is None or (info.get("tokenizer") or {}).get("kind") != "clip-bpe":
        return None
    name = cold_text_engine(requested)
    if name is None:
        return None
    from .tokenizer import ClipTokenizer
    try:
        tokenizer = ClipTokenizer(int(info["tokenizer"]["context_length"]))
        engine = Engine(name, directory, optimize=False)
        engine.tower("text")
    except (EngineError, OSError, KeyError, ValueError) as exc:
        log.debug("no cold text path for %s: %s", model_name, exc)
        return None
    return ExportedTextModel(engine, tokenizer, int(info["dim"]), model_name)
