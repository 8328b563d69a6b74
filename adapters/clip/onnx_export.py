"""Export a loaded CLIP's two towers to ONNX, and give it the engine asked for (`auto` measures).

- `export_towers` writes `{image,text}-fp32.onnx` once per fingerprint (temp file, then rename;
  `export.json` last, as it vouches for both), `quantized_image_tower` the int8 copy on demand.
- `choose_engine` runs the installed candidates (torch, ONNX Runtime fp32 and int8) on a probe
  batch, keeps those whose vectors agree with torch fp32 (per-vector cosine and top-10 retrieval
  agreement, both towers), and picks the fastest; the figures are cached per fingerprint and CPU.
  The timing source is a parameter, so tests can hand it fake timings.
- `attach_engine(load_model(...), engine)` gives a loaded model its engine: any failure leaves it
  on torch with one warning. Training always runs on torch (`ClipModel.use_torch`).
"""
from __future__ import annotations

import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch

from .engines import (AUTO, EXPORT_FORMAT, EXPORT_INFO, TORCH, TOWERS, VARIANTS, Engine, check_engine_name,
                      choice_file, cpu_key, describe_choice, export_dir, read_choice, read_export_info,
                      runtime_installed, tower_file)
from .errors import EngineError
from .files import atomic_path, fsync_dir, write_json_atomic

if TYPE_CHECKING:
    from .models import ClipModel

log = logging.getLogger(__name__)

OPSET = 17
PROBE_ITEMS = 24              # images and texts in the probe set
TIMING_ROUNDS = 3             # interleaved rounds; the median per candidate counts
MIN_COSINE = 0.999            # per vector, against torch fp32, both towers
MIN_AGREEMENT = 0.95          # mean top-10 overlap with torch fp32's neighbours, both towers
VERIFY_COSINE = 0.99          # a chosen engine must reproduce torch this closely (catches broken, not lossy, ones)

# timer(candidate name, run one probe batch) -> seconds that batch took
Timer = Callable[[str, Callable[[], object]], float]


class _DropQuantizerAdvice(logging.Filter):
    """onnxruntime's quantizer logs pre-processing advice to the root logger on every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")


logging.getLogger().addFilter(_DropQuantizerAdvice())


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------
class _ImageTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, D)
        return self.model.encode_image(pixels)


class _TextTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, D)
        return self.model.encode_text(tokens)


def export_towers(clip: "ClipModel", directory: Optional[Path] = None) -> Path:
    """Both towers as fp32 ONNX with a dynamic batch, once per fingerprint. Returns the folder."""
    directory = directory or export_dir(clip.name, clip.fingerprint)
    if read_export_info(directory) is not None:
        return directory
    log.info("exporting %s (fingerprint %s) to ONNX in %s", clip.name, clip.fingerprint[:12], directory)
    started = time.perf_counter()
    model = clip.model.float().eval()
    pixels = torch.zeros(2, 3, clip.image_size, clip.image_size, device=clip.device)
    tokens = torch.as_tensor(np.asarray(clip.tokenizer(["a photo", "export"])), device=clip.device)
    _export(_ImageTower(model), pixels, "pixels", tower_file(directory, "image", "fp32"))
    _export(_TextTower(model), tokens, "tokens", tower_file(directory, "text", "fp32"))
    write_json_atomic(directory / EXPORT_INFO, {
        "format": EXPORT_FORMAT, "model": clip.name, "arch": clip.arch, "fingerprint": clip.fingerprint,
        "dim": clip.dim, "image_size": clip.image_size, "tokenizer": tokenizer_spec(clip),
        "opset": OPSET, "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1)})
    return directory


def _export(module: torch.nn.Module, example: torch.Tensor, input_name: str, target: Path) -> None:
    """One tower to `target` + `target.data` (weights as external data: runtimes memory-map them, so
    a cold search reads the 77 rows of the token table it uses, not all 100 MB of it)."""
    import onnx

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    # nn.MultiheadAttention's inference fast path is a fused op the ONNX exporter cannot write.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python branches the export fixes
            torch.onnx.export(module, (example,), str(work / "traced.onnx"), dynamo=False, opset_version=OPSET,
                              input_names=[input_name], output_names=["features"],
                              dynamic_axes={input_name: {0: "batch"}, "features": {0: "batch"}})
        data = target.name + ".data"
        onnx.save_model(onnx.load(str(work / "traced.onnx")), str(work / target.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data, size_threshold=1024)
        os.chmod(work / data, 0o644)  # onnx writes it private; a shared cache is read by other users
        os.replace(work / data, target.parent / data)  # the weights first, then the graph that names them
        os.replace(work / target.name, target)
        fsync_dir(target.parent)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        shutil.rmtree(work, ignore_errors=True)


def tokenizer_spec(clip: "ClipModel") -> Optional[dict[str, Any]]:
    """What the torch-free tokenizer needs, when open_clip's tokenizer is the plain CLIP BPE one."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = clip.tokenizer
    if type(tokenizer) is not SimpleTokenizer or getattr(tokenizer, "reduction_fn", None) is not None:
        return None
    if getattr(tokenizer.clean_fn, "__name__", "") != "_clean_lower" or len(tokenizer.all_special_ids) != 2:
        return None
    return {"kind": "clip-bpe", "context_length": int(tokenizer.context_length)}


def quantized_image_tower(directory: Path) -> None:
    """An int8 copy of the image tower (dynamic quantization: int8 weights, activations scaled per batch)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = tower_file(directory, "image", "int8")
    if not target.is_file():
        with atomic_path(target) as tmp:
            quantize_dynamic(str(tower_file(directory, "image", "fp32")), str(tmp), weight_type=QuantType.QInt8)


def open_engine(directory: Path, name: str, *, eager: bool = True) -> Engine:
    """The named variant over this export (its int8 file made first if needed). eager: open both
    towers now (fail here, not mid-run); otherwise each opens on first use."""
    runtime, precision, _ = VARIANTS[name]
    if not runtime_installed(runtime):
        raise EngineError(f"{runtime} is not installed (pip install {runtime})")
    if precision == "int8":
        quantized_image_tower(directory)
    engine = Engine(name, directory)
    for tower in TOWERS if eager else ():
        engine.tower(tower)
    return engine


# --------------------------------------------------------------------------------------
# Agreement with torch fp32
# --------------------------------------------------------------------------------------
def probe_inputs(clip: "ClipModel", count: int = PROBE_ITEMS, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Photo-like preprocessed pixels (smooth colour fields, edges, noise) and varied captions."""
    rng = np.random.default_rng(seed)
    size = clip.image_size
    coarse = rng.uniform(0, 1, (count, 3, 6, 6)).astype(np.float32)
    images = np.kron(coarse, np.ones((1, 1, size // 6 + 1, size // 6 + 1), np.float32))[..., :size, :size]
    images += rng.normal(0, 0.08, images.shape).astype(np.float32)
    mean = np.asarray(clip.preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), np.float32)
    std = np.asarray(clip.preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), np.float32)
    pixels = (np.clip(images, 0, 1) - mean[:, None, None]) / std[:, None, None]
    colours = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
    things = ["dog", "car", "house", "tree", "person on a bike", "bowl of soup", "beach at sunset", "city street"]
    captions = [f"a photo of a {colours[i % 8]} {things[(i * 3 + i // 8) % 8]}" for i in range(count)]
    return torch.from_numpy(np.ascontiguousarray(pixels)), np.asarray(clip.tokenizer(captions))


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def retrieval_agreement(ref_queries: np.ndarray, ref_gallery: np.ndarray, queries: np.ndarray, gallery: np.ndarray,
                        k: int = 10, exclude_self: bool = False) -> float:
    """Mean overlap of each query's top-k gallery items under the reference and the candidate."""
    def top(q: np.ndarray, g: np.ndarray) -> np.ndarray:
        scores = q @ g.T
        if exclude_self:
            np.fill_diagonal(scores, -np.inf)
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]

    k = min(k, len(ref_gallery) - (1 if exclude_self else 0))
    ref, cand = top(ref_queries, ref_gallery), top(queries, gallery)
    return float(np.mean([len(set(r) & set(c)) / k for r, c in zip(ref, cand)]))


def agreement(reference: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """(image, text) vectors of a candidate vs torch fp32: the worst cosine and the worse retrieval overlap."""
    (ref_img, ref_txt), (img, txt) = reference, candidate
    return {"min_cosine": min(min_cosine(ref_img, img), min_cosine(ref_txt, txt)),
            "agreement": min(retrieval_agreement(ref_img, ref_img, img, img, exclude_self=True),
                             retrieval_agreement(ref_txt, ref_img, txt, img))}


def verify_engine(clip: "ClipModel", engine: Engine, count: int = 4) -> None:
    """A few probe items through the engine and torch; EngineError when they disagree."""
    pixels, tokens = probe_inputs(clip, count)
    reference = (clip.torch_encode_images(pixels), clip.torch_encode_tokens(torch.from_numpy(tokens)))
    figures = agreement(reference, (engine.encode_images(pixels.numpy()), engine.encode_tokens(tokens)))
    if figures["min_cosine"] < VERIFY_COSINE:
        raise EngineError(f"{engine.name} disagrees with torch (min cosine {figures['min_cosine']:.5f})")


# --------------------------------------------------------------------------------------
# auto
# --------------------------------------------------------------------------------------
def wall_clock(name: str, run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


# OpenVINO is not among auto's candidates: a process that has run it and then forks (training's
# decode workers, as the demo does) died with SIGSEGV in tests/test_demo.py; it stays selectable by name.
AUTO_RUNTIMES = ("onnxruntime",)


def candidate_names() -> list[str]:
    return [TORCH] + [name for name, (runtime, _, _) in VARIANTS.items()
                      if runtime in AUTO_RUNTIMES and runtime_installed(runtime)]


def choose_engine(clip: "ClipModel", directory: Path, *, timer: Timer = wall_clock,
                  candidates: Optional[list[str]] = None) -> dict[str, Any]:
    """Measure the candidates on this CPU, keep those agreeing with torch fp32, pick the fastest; cache it."""
    pixels, tokens = probe_inputs(clip)
    reference = (clip.torch_encode_images(pixels), clip.torch_encode_tokens(torch.from_numpy(tokens)))
    figures: dict[str, dict[str, Any]] = {TORCH: {"ok": True, "min_cosine": 1.0, "agreement": 1.0}}
    runs: dict[str, Callable[[], object]] = {TORCH: lambda: clip.torch_encode_images(pixels)}
    for name in candidates or candidate_names():
        if name == TORCH:
            continue
        try:
            engine = open_engine(directory, name)
            vectors = (engine.encode_images(pixels.numpy()), engine.encode_tokens(tokens))
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is just not chosen
            figures[name] = {"ok": False, "reason": f"failed: {type(exc).__name__}: {exc}"[:300]}
            continue
        row = agreement(reference, vectors)
        row["ok"] = row["min_cosine"] >= MIN_COSINE and row["agreement"] >= MIN_AGREEMENT
        if not row["ok"]:
            row["reason"] = f"disagrees (cosine {row['min_cosine']:.5f}, top-10 {row['agreement']:.3f})"
        figures[name] = row
        runs[name] = lambda engine=engine: engine.encode_images(pixels.numpy())
    timed = _interleaved_seconds(runs, timer)
    for name, seconds in timed.items():
        figures[name]["seconds_per_image"] = seconds / len(pixels)
        figures[name]["images_per_s"] = len(pixels) / seconds if seconds > 0 else float("inf")
    usable = [name for name, row in figures.items() if row["ok"] and name in timed]
    best = min(usable, key=lambda name: timed[name])
    choice = {"engine": best, "model": clip.name, "arch": clip.arch, "fingerprint": clip.fingerprint,
              "cpu": cpu_key(), "probe_items": len(pixels), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "figures": figures}
    write_json_atomic(choice_file(directory), choice)
    return choice


def _interleaved_seconds(runs: dict[str, Callable[[], object]], timer: Timer) -> dict[str, float]:
    """Median seconds per candidate over interleaved rounds (background load hits them alike)."""
    for run in runs.values():
        run()  # warm-up: first-call allocations and lazy compilation are not the steady state
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(TIMING_ROUNDS):
        for name, run in runs.items():
            samples[name].append(timer(name, run))
    return {name: statistics.median(values) for name, values in samples.items()}


def attach_engine(clip: "ClipModel", requested: str = AUTO, *, timer: Timer = wall_clock,
                  progress: Optional[Callable[[str], None]] = None) -> "ClipModel":
    """Give `clip` the requested engine; on any failure keep torch with one warning.

    `progress` hears of the slow first-use steps (the export, `auto`'s measurement) as they start.
    """
    say = progress or (lambda message: None)
    check_engine_name(requested)
    clip.use_torch()
    if requested == TORCH:
        return clip
    if clip.device.type != "cpu":
        if requested != AUTO:
            log.warning("engine %s runs on the CPU only; %s stays on torch (%s)", requested, clip.name,
                        clip.device.type)
        return clip
    try:
        if read_export_info(export_dir(clip.name, clip.fingerprint)) is None:
            say(f"exporting {clip.name}'s image and text towers to ONNX (once per model) ...")
        directory = export_towers(clip)
        if requested == AUTO:
            choice = read_choice(directory)
            if choice is None:
                say(f"timing {', '.join(candidate_names())} on {PROBE_ITEMS} probe images to pick the fastest "
                    f"engine (once per model and CPU) ...")
                choice = choose_engine(clip, directory, timer=timer)
                say(f"engine: {describe_choice(choice)}")
            log.info("engine auto for %s on this CPU: %s", clip.name, describe_choice(choice))
            if choice["engine"] == TORCH:
                return clip
            # Measured against torch on this fingerprint and CPU already: towers open when first used.
            engine = open_engine(directory, choice["engine"], eager=False)
            engine.note = f"auto on this CPU: {describe_choice(choice)}"
        else:
            engine = open_engine(directory, requested)
            verify_engine(clip, engine)
    except Exception as exc:  # noqa: BLE001 - an engine is an optimisation; torch always works
        log.warning("engine %s unavailable for %s (%s); using torch", requested, clip.name,
                    str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        return clip
    clip.engine = engine
    return clip

