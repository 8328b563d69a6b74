"""Exported inference engines: where exports live, running them, and the `auto` choice on disk.

Torch-free on purpose: a cold `search` runs the exported text tower through this module
without importing torch (exporting, which needs torch, is in `onnx_export.py`).

Engines (the `engine` setting):
- `torch`: the model as loaded (eager PyTorch); training always uses it.
- `onnxruntime` (fp32), `onnxruntime-int8` (image tower through `quantize_dynamic`: int8 weights and
  activations; text tower fp32),
- `openvino` (fp32), `openvino-bf16` (`INFERENCE_PRECISION_HINT` bf16: every op in bf16; needs
  AVX512-BF16 or AMX), `openvino-bf16-matmul` (mixed precision: the weight layers' products take bf16
  operands, everything else stays f32; see `bf16_weight_products`),
- `auto`: measured on this CPU at first load (see `onnx_export.choose_engine`), torch on GPUs.

Cache layout, one folder per model fingerprint (so a changed weight never reuses an export):

    <root>/<fingerprint>/export.json            what was exported (model, dim, tokenizer, preprocessing),
                                                the weights' fingerprint, each file's size and blake2b
    <root>/<fingerprint>/{image,text}-fp32.onnx  the two towers, dynamic batch (+ .onnx.data: their weights)
    <root>/<fingerprint>/image-int8.onnx          the image tower dynamically quantized
    <root>/<fingerprint>/verified.json           stats of the files already hashed (export_cache.py)
    <root>/<fingerprint>/auto-<cpu key>.json     `auto`'s measured choice on one kind of CPU
    <root>/<fingerprint>/openvino/               OpenVINO's compiled-model cache

`<root>`: `<checkpoint>/engines` for this project's checkpoints (written by `save`, so a fine-tuned
model's artifacts carry them), else `$CLIP_ADAPTER_ENGINES`, else `$XDG_CACHE_HOME/clip-adapter/engines`
(export_cache.py: the order they are read in, read-only roots, the checks before use).

Batch invariance: an item's vector never depends on its batch-mates. fp32 runs are invariant to
float rounding; dynamic int8 scales activations over the whole input and all-bf16 kernels block by
batch size, so those towers run one item at a time (PER_SAMPLE), which `auto` times as such.
bf16-matmul runs whole batches: its vectors alone and in a batch of 32 matched exactly on ViT-B/32
(docs/benchmarks.md), and every variant is held to the 1e-4 bar in tests/test_engines.py.
OpenVINO compiles for throughput (one infer request per stream); `Engine` hands a batch's pieces,
or its single items, to the streams at once.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import platform
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from .errors import EngineError
from .export_cache import (CHECKPOINT_ENGINES, ENGINE_ENV, EXPORT_FORMAT, EXPORT_INFO, ExportDamaged,  # noqa: F401
                           check_export, default_engine_root, engine_roots, read_export_info, tower_file,
                           tower_files, warn_damaged, writable, write_root)
from .files import write_json_atomic

log = logging.getLogger(__name__)

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
    "openvino-bf16-matmul": ("openvino", "fp32", "bf16-matmul"),
}
ENGINES = (AUTO, TORCH, *VARIANTS)
# Towers whose numbers would move with the batch (see the module docstring): run one item at a time.
PER_SAMPLE: dict[str, frozenset[str]] = {
    "onnxruntime-int8": frozenset({"image"}),
    "openvino-bf16": frozenset({"image", "text"}),
}
TOWERS = ("image", "text")


def check_engine_name(name: str) -> str:
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    return name


def runtime_installed(runtime: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(runtime) is not None


# --------------------------------------------------------------------------------------
# Where exports live (export_cache.py: roots, export.json, checks)
# --------------------------------------------------------------------------------------
def export_dir(model_name: str, fingerprint: str) -> Path:
    """The folder holding this fingerprint's export: the first root that has one, else where to write it."""
    for root in engine_roots(model_name):
        if read_export_info(root / fingerprint) is not None:
            return root / fingerprint
    return write_root(model_name) / fingerprint


def engine_files(directory: Path, info: dict[str, Any], name: str) -> list[str]:
    """The files the named variant reads: its image tower's and the fp32 text tower's. EngineError
    when this export has none for it (export.json's `unavailable` says why: a quantizer that failed)."""
    reason = (info.get("unavailable") or {}).get(name)
    if reason:
        raise EngineError(f"{name} is not available for this export: {reason}")
    _, precision, _ = VARIANTS[name]
    return tower_files(directory, "image", precision, info) + tower_files(directory, "text", "fp32", info)


# --------------------------------------------------------------------------------------
# Which CPU this is (the `auto` choice is only valid on the kind of CPU it was measured on)
# --------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
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


# Choices that could not be saved (a read-only cache): kept for this process, keyed by their file.
_unsaved_choices: dict[str, dict[str, Any]] = {}


# The version of `auto`'s rules (its probe and bars). A choice made under other rules is measured
# again: 2 probes with photo-like megapixel images, under which int8 and bf16 stopped passing; 3 adds
# a candidate (openvino-bf16-matmul), which an earlier choice never measured.
AUTO_RULES = 3


def read_choice(directory: Path, cpu: Optional[str] = None) -> Optional[dict[str, Any]]:
    path = choice_file(directory, cpu)
    if str(path) in _unsaved_choices:
        return _unsaved_choices[str(path)]
    try:
        choice = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(choice, dict) or choice.get("engine") not in ENGINES:
        return None
    return choice if choice.get("rules") == AUTO_RULES else None  # chosen under other rules: measured again


def save_choice(directory: Path, choice: dict[str, Any]) -> None:
    """Cache `auto`'s choice beside the export; where that cannot be written, keep it for this
    process and say so once (each new process will measure again)."""
    path = choice_file(directory)
    try:
        write_json_atomic(path, choice)
        _unsaved_choices.pop(str(path), None)
    except OSError as exc:
        if str(path) not in _unsaved_choices:
            log.warning("engine auto: cannot save its choice in %s (%s); it is kept for this process only, so "
                        "every new process measures again (make the folder writable, or bake the choice in)",
                        directory, exc.strerror or exc)
        _unsaved_choices[str(path)] = choice


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


class _OpenVinoTower:
    """A compiled model in OpenVINO's THROUGHPUT mode: `streams` infer requests, each on its share of
    the cores. One request per calling thread (an infer request is not thread-safe); `Engine._run`
    hands the streams a batch's pieces at once (per-item bf16 on 2 cores: 33 -> 39 img/s against one
    LATENCY request, docs/benchmarks.md), and the vectors do not change with the split."""

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self.streams = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._local = threading.local()

    def __call__(self, array: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        if array.dtype not in _OPENVINO_READY:
            # pyopenvino builds function-local statics on the first infer of an input type; two threads
            # doing so at once deadlocked here (one in __cxa_guard_acquire, the other waiting for the
            # GIL: an `embed` hung at 0% CPU, 1 of 8 fresh processes). One item of the first input
            # of each type runs alone first (tens of ms), then the streams run freely.
            with _OPENVINO_FIRST:
                if array.dtype not in _OPENVINO_READY:
                    request.infer({0: np.ascontiguousarray(array[:1])})
                    _OPENVINO_READY.add(array.dtype)
        return np.array(request.infer({0: array})[0], copy=True)


_OPENVINO_FIRST = threading.Lock()
_OPENVINO_READY: set = set()  # input dtypes pyopenvino has run once in this process


BF16_MATMUL = "bf16-matmul"   # the OpenVINO option for mixed precision (bf16_weight_products)


def _openvino_tower(path: Path, option: str, threads: Optional[int]) -> Tower:
    mixed = option == BF16_MATMUL
    config = {"INFERENCE_PRECISION_HINT": "f32" if mixed else option, "PERFORMANCE_HINT": "THROUGHPUT"}
    if writable(path.parent):  # compiled once, imported after (a read-only cache compiles each time)
        config["CACHE_DIR"] = str(path.parent / "openvino")
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    core = _openvino_core()
    with signal_stack_kept():
        model: Any = str(path)
        if mixed:  # rewritten in memory (0.06 s for ViT-B/32's image tower); the cache keys on the result
            model = core.read_model(str(path))
            bf16_weight_products(model)
        return _OpenVinoTower(core.compile_model(model, "CPU", config))


# Mixed precision, as torch's autocast does it on a GPU: only the products with a weight matrix (the
# linear and convolution layers, nearly all of a CLIP tower's arithmetic) take bf16 operands and
# give bf16 results, which go on in f32; the bias sums, layer norms, softmax, attention scores and
# the residual stream stay f32. OpenVINO's `bf16` hint instead keeps every activation in bf16 (the
# residual stream too), and loses more: on the bench's photos (ViT-B/32, random weights) top-10
# agreement with torch fp32 was 0.969 for it and 0.983 for this rewrite, at 41.4 and 41.9 img/s
# against f32's 22.0 (docs/benchmarks.md). Batch-invariant: a vector alone and in a batch of 32
# matched exactly (tests/test_engines.py holds every variant to 1e-4).
WEIGHT_PRODUCTS = ("MatMul", "Convolution")
# Ops that turn a constant into a constant (a transposed or cast weight is still a weight).
_CONSTANT_CARRIERS = ("Convert", "Transpose", "Reshape", "Unsqueeze", "Squeeze")


def _is_weight(node: Any, depth: int = 4) -> bool:
    if node.get_type_name() == "Constant":
        return True
    return (depth > 0 and node.get_type_name() in _CONSTANT_CARRIERS
            and _is_weight(node.input_value(0).get_node(), depth - 1))


def bf16_weight_products(model: Any) -> int:
    """Give every MatMul/Convolution with a constant weight bf16 operands, its bf16 result converted
    back to f32, in place; how many were changed. A product of two activations (attention's scores)
    is left in f32."""
    import openvino as ov
    try:
        import openvino.opset13 as ops
    except ImportError:  # openvino 2024.x keeps its opsets under openvino.runtime
        import openvino.runtime.opset13 as ops

    changed = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() not in WEIGHT_PRODUCTS or not _is_weight(node.input_value(1).get_node()):
            continue
        if node.get_output_element_type(0) != ov.Type.f32:
            continue
        consumers = list(node.output(0).get_target_inputs())
        for port in (0, 1):
            node.input(port).replace_source_output(ops.convert(node.input_value(port), ov.Type.bf16).output(0))
        result = ops.convert(node.output(0), ov.Type.f32)
        for consumer in consumers:
            consumer.replace_source_output(result.output(0))
        changed += 1
    model.validate_nodes_and_infer_types()  # the products' outputs become bf16 here (in 2024.x too)
    return changed


# OpenVINO's CPU plugin and signals. Creating the plugin (a Core's first compile) replaces the
# calling thread's alternate signal stack with an 11.5 kB buffer of the plugin's; destroying it (when
# its Core is garbage-collected) unmaps the buffer and resets the *destroying* thread's stack. When a
# Core made on one thread died on another, the first thread was left with an unmapped signal stack,
# and Python runs its signal handlers there (SA_ONSTACK): the next SIGCHLD with a handler installed
# (a DataLoader's forked workers, subprocesses) killed the process with SIGSEGV (si_code SI_KERNEL),
# or wrote its frame into freed memory (a later crash in malloc). So: one Core for the process, never
# destroyed before exit, and the caller's signal stack put back after each compile.
_OPENVINO_CORE: Any = None


def _openvino_core() -> Any:
    global _OPENVINO_CORE
    with _OPENVINO_FIRST:
        if _OPENVINO_CORE is None:
            import openvino as ov

            _OPENVINO_CORE = ov.Core()
        return _OPENVINO_CORE


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]  # Linux


def _read_signal_stack() -> Optional[_SignalStack]:
    """This thread's alternate signal stack as sigaltstack gives it; None off Linux or on failure."""
    if not sys.platform.startswith("linux"):
        return None
    stack = _SignalStack()
    return stack if ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack)) == 0 else None


def current_signal_stack() -> Optional[tuple[int, int, int]]:
    """This thread's alternate signal stack (address, flags, size); None where it cannot be read."""
    stack = _read_signal_stack()
    return None if stack is None else (stack.ss_sp or 0, stack.ss_flags, stack.ss_size)


@contextlib.contextmanager
def signal_stack_kept() -> Iterator[None]:
    """Whatever runs inside leaves this thread's alternate signal stack as it found it (Linux)."""
    saved = _read_signal_stack()
    try:
        yield
    finally:
        if saved is not None:
            ctypes.CDLL(None).sigaltstack(ctypes.byref(saved), None)


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
    _pool: Optional[ThreadPoolExecutor] = field(default=None, repr=False)  # runs pieces on parallel streams

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
        return normalize_rows(self._run("image", np.ascontiguousarray(pixels, dtype=np.float32)))

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """(B, L) int64 token ids -> (B, D) L2-normalised float32."""
        return normalize_rows(self._run("text", np.ascontiguousarray(tokens, dtype=np.int64)))

    def _run(self, which: str, array: np.ndarray) -> np.ndarray:
        """The tower on `array`: in pieces of one item where the runtime is not batch-invariant, and
        over the runtime's parallel streams where it has several (every piece's rows are computed
        alone, so splitting never changes a vector)."""
        tower = self.tower(which)
        streams = getattr(tower, "streams", 1)
        size = 1 if which in PER_SAMPLE.get(self.name, ()) else -(-len(array) // streams)
        pieces = [array[i:i + size] for i in range(0, len(array), max(1, size))]
        if len(pieces) <= 1:
            return tower(array)
        if streams == 1:
            return np.concatenate([tower(piece) for piece in pieces])
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=streams, thread_name_prefix=f"{self.name}-stream")
        return np.concatenate(list(self._pool.map(tower, pieces)))


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
        check_export(directory, tower_files(directory, "text", "fp32", info))
        tokenizer = ClipTokenizer(int(info["tokenizer"]["context_length"]))
        engine = Engine(name, directory, optimize=False)
        engine.tower("text")
    except ExportDamaged as exc:
        warn_damaged(exc, "answering with torch")
        return None
    except (EngineError, OSError, KeyError, ValueError) as exc:
        log.debug("no cold text path for %s: %s", model_name, exc)
        return None
    return ExportedTextModel(engine, tokenizer, int(info["dim"]), model_name)
