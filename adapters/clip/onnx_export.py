"""Export a loaded CLIP's two towers to ONNX, and give it the engine asked for (`auto` measures).

- `export_towers` writes `{image,text}-fp32.onnx` and the image tower's int8 copy once per
  fingerprint (built in a work folder, each file fsynced and renamed in, `export.json` with their
  hashes last), under a per-fingerprint lock; `ensure_export` finds a sound one or rebuilds it.
- `choose_engine` runs the installed candidates (torch, ONNX Runtime fp32/int8, OpenVINO fp32/bf16/bf16-matmul)
  on a probe batch, keeps those whose vectors agree with torch fp32 (per-vector cosine and top-10
  retrieval agreement, both towers) and do not move with their batch, and picks the fastest; the
  figures are cached per fingerprint and CPU. The timing source is a parameter, so tests can hand
  it fake timings.
- `attach_engine(load_model(...), engine)` gives a loaded model its engine: any failure leaves it
  on torch with one warning. Training always runs on torch (`ClipModel.use_torch`).
"""
from __future__ import annotations

import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
from PIL import Image

from .engines import (AUTO, AUTO_RULES, TORCH, TOWERS, VARIANTS, Engine, check_engine_name, cpu_key,
                      describe_choice, engine_files, export_dir, read_choice, runtime_installed, save_choice)
from .errors import EngineError
from .export_cache import (EXPORT_FORMAT, EXPORT_INFO, WORK_PREFIX, ExportDamaged, check_export, describe_file,
                           discard_export, durable_rename, engine_roots, export_lock, forget_checks,
                           known_fingerprint, read_export_info, remember_fingerprint, sweep_debris, tower_file,
                           warn_damaged, writable, write_root)
from .faults import faultpoint
from .files import fsync_dir, write_json_atomic

if TYPE_CHECKING:
    from .models import ClipModel

log = logging.getLogger(__name__)

OPSET = 17
PROBE_ITEMS = 32              # images and texts in the probe set
TIMING_ROUNDS = 3             # interleaved rounds; the median per candidate counts
MIN_COSINE = 0.999            # per vector, against torch fp32, both towers
MIN_AGREEMENT = 0.98          # mean top-10 overlap with torch fp32's neighbours, both towers
MAX_BATCH_DRIFT = 1e-4        # an item's vector alone vs inside the probe batch (max abs difference)
BATCH_PROBE = 4               # items embedded alone for that check
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


# torch's exporter and its attention fast-path switch are process-global: one export at a time per
# process (export_lock orders processes), and the switch is restored by whoever turned it off.
_EXPORTER = threading.Lock()


def ensure_export(clip: "ClipModel") -> Path:
    """A checked folder with this model's export: the first sound one among the roots; a damaged
    one is rebuilt where it can be written (one warning naming it), skipped where it cannot; with
    none, the model is exported into the first writable root."""
    for root in engine_roots(clip.name):
        directory = root / clip.fingerprint
        if not (directory / EXPORT_INFO).exists():
            continue
        try:
            check_export(directory)
            return directory
        except ExportDamaged as exc:
            if writable(directory):
                warn_damaged(exc, "rebuilding it from the weights")
                return export_towers(clip, directory)
            warn_damaged(exc, "it cannot be rebuilt there (read-only); exporting into a writable cache")
    return export_towers(clip, write_root(clip.name) / clip.fingerprint)


def export_towers(clip: "ClipModel", directory: Optional[Path] = None) -> Path:
    """Both towers as fp32 ONNX with a dynamic batch, and the image tower's int8 copy, into
    `directory` (default: where this fingerprint's export belongs), unless a sound export is there.
    Safe from many threads and processes; a damaged or half-written export is replaced. Returns the folder."""
    directory = directory or export_dir(clip.name, clip.fingerprint)
    with export_lock(directory):
        sweep_debris(directory)
        try:
            check_export(directory)
            return directory  # sound, or finished by another exporter while this one waited
        except ExportDamaged:
            discard_export(directory)
        _write_export(clip, directory)
    return directory


def _write_export(clip: "ClipModel", directory: Path) -> None:
    """Everything built in a work folder, each file fsynced and renamed in, export.json (with the
    files' hashes) last: a kill at any moment leaves no folder that claims to be complete."""
    log.info("exporting %s (fingerprint %s) to ONNX in %s", clip.name, clip.fingerprint[:12], directory)
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=directory))
    try:
        model = clip.model.float().eval()
        pixels = torch.zeros(2, 3, clip.image_size, clip.image_size, device=clip.device)
        tokens = torch.as_tensor(np.asarray(clip.tokenizer(["a photo", "export"])), device=clip.device)
        _export(_ImageTower(model), pixels, "pixels", work, tower_file(work, "image", "fp32").name)
        _export(_TextTower(model), tokens, "tokens", work, tower_file(work, "text", "fp32").name)
        unavailable = {}
        if runtime_installed("onnxruntime"):
            failed = quantize_image_tower(work)
            if failed:
                log.warning("%s: no onnxruntime-int8 engine for this model: %s", clip.name, failed)
                unavailable["onnxruntime-int8"] = failed
        files = {}
        for path in sorted(p for p in work.iterdir() if p.name.endswith((".onnx", ".onnx.data"))):
            os.chmod(path, 0o644)  # onnx writes external data private; a shared cache is read by other users
            files[path.name] = describe_file(path)
        faultpoint("export.files-written")
        for name in files:
            durable_rename(work / name, directory / name)
        fsync_dir(directory)
        faultpoint("export.files-renamed")
        write_json_atomic(directory / EXPORT_INFO, {
            "format": EXPORT_FORMAT, "model": clip.name, "arch": clip.arch, "fingerprint": clip.fingerprint,
            "dim": clip.dim, "image_size": clip.image_size, "tokenizer": tokenizer_spec(clip),
            "preprocess": clip.preprocess_cfg, "opset": OPSET, "torch": torch.__version__,
            "seconds": round(time.perf_counter() - started, 1), "files": files, "unavailable": unavailable})
    finally:
        shutil.rmtree(work, ignore_errors=True)
        forget_checks(directory)


def _export(module: torch.nn.Module, example: torch.Tensor, input_name: str, work: Path, name: str) -> None:
    """One tower to `work/name` + `work/name.data` (weights as external data: runtimes memory-map them,
    so a cold search reads the 77 rows of the token table it uses, not all 100 MB of it)."""
    import onnx

    traced = work / f"traced-{name}"
    with _EXPORTER:
        # nn.MultiheadAttention's inference fast path is a fused op the ONNX exporter cannot write.
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about Python branches the export fixes
                torch.onnx.export(module, (example,), str(traced), dynamo=False, opset_version=OPSET,
                                  input_names=[input_name], output_names=["features"],
                                  dynamic_axes={input_name: {0: "batch"}, "features": {0: "batch"}})
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    onnx.save_model(onnx.load(str(traced)), str(work / name), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=name + ".data", size_threshold=1024)
    traced.unlink()


def tokenizer_spec(clip: "ClipModel") -> Optional[dict[str, Any]]:
    """What the torch-free tokenizer needs, when open_clip's tokenizer is the plain CLIP BPE one."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = clip.tokenizer
    if type(tokenizer) is not SimpleTokenizer or getattr(tokenizer, "reduction_fn", None) is not None:
        return None
    if getattr(tokenizer.clean_fn, "__name__", "") != "_clean_lower" or len(tokenizer.all_special_ids) != 2:
        return None
    return {"kind": "clip-bpe", "context_length": int(tokenizer.context_length)}


def quantize_image_tower(work: Path) -> Optional[str]:
    """The int8 copy of the image tower (dynamic quantization: int8 weights; activations scaled per
    input, which is why that tower runs one item at a time, engines.PER_SAMPLE); None when written,
    else why not. ONNX Runtime's quantizer cannot take every graph (OpenAI's ResNets: "Expected
    onnx::Conv_879 to be an initializer"), and an export without its int8 copy is still whole."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = tower_file(work, "image", "int8")
    try:
        quantize_dynamic(str(tower_file(work, "image", "fp32")), str(target), weight_type=QuantType.QInt8)
        return None
    except Exception as exc:  # noqa: BLE001 - the quantizer's failures are untyped; the variant is dropped
        for partial in work.glob(target.name + "*"):
            partial.unlink()
        return f"ONNX Runtime could not quantize the image tower ({type(exc).__name__}: {exc})"[:300]


def open_engine(directory: Path, name: str, *, eager: bool = True) -> Engine:
    """The named variant over this export, its files checked against export.json first (ExportDamaged).
    eager: open both towers now (fail here, inside the caller's fall-back, not mid-run)."""
    runtime, _, _ = VARIANTS[name]
    if not runtime_installed(runtime):
        raise EngineError(f"{runtime} is not installed (pip install {runtime})")
    info = read_export_info(directory)
    if info is None:
        raise ExportDamaged(directory, "no complete export here")
    check_export(directory, engine_files(directory, info, name))
    engine = Engine(name, directory)
    for tower in TOWERS if eager else ():
        engine.tower(tower)
    return engine


# --------------------------------------------------------------------------------------
# Agreement with torch fp32
# --------------------------------------------------------------------------------------
# The probe is what the bar is stated on (bench/engine_start_bench.py's photos): photo-like
# megapixel images put through the model's own preprocessing, and short photo captions. Smaller or
# smoother synthetic inputs let a lossy engine pass (bf16 passed 24 colour fields at 6x6 blocks and
# reordered the bench photos' neighbours: top-10 0.969).
PROBE_SIZES = ((1280, 800), (1024, 1024), (800, 1200), (1200, 900), (1152, 864))
PROBE_CAPTIONS = tuple(f"a photo of {a} {b}" for a in ("a red", "a small", "an old", "a bright", "two", "a blurry")
                       for b in ("dog", "car", "beach", "city at night", "bowl of fruit", "mountain lake"))


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: a random colour field at 1/16 resolution upsampled bicubically (smooth
    regions and edges at many orientations), plus per-pixel noise as a sensor gives."""
    small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    noise = rng.integers(-10, 10, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8))


def probe_inputs(clip: "ClipModel", count: int = PROBE_ITEMS, seed: int = 1) -> tuple[torch.Tensor, np.ndarray]:
    """`count` photo-like images through the model's preprocessing, and as many photo captions.

    Megapixel images for OpenAI's models (224 px and up: their short side stays over 3.5x the
    input); for a smaller model (the tests' 64 px tiny) the same images at a smaller scale."""
    rng = np.random.default_rng(seed)
    scale = min(1.0, 4 * clip.image_size / min(min(size) for size in PROBE_SIZES))
    sizes = [(round(w * scale) // 16 * 16, round(h * scale) // 16 * 16) for w, h in PROBE_SIZES]
    pixels = torch.stack([clip.preprocess(synthetic_photo(rng, *sizes[i % len(sizes)])) for i in range(count)])
    captions = [PROBE_CAPTIONS[(i + seed) % len(PROBE_CAPTIONS)] for i in range(count)]
    return pixels.contiguous(), np.asarray(clip.tokenizer(captions))


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
    """(image, text) vectors of a candidate vs torch fp32: the worst cosine and the worse retrieval
    overlap (`agreement`), with its two halves: image -> image neighbours and caption -> image."""
    (ref_img, ref_txt), (img, txt) = reference, candidate
    halves = {"top10_image_image": retrieval_agreement(ref_img, ref_img, img, img, exclude_self=True),
              "top10_text_image": retrieval_agreement(ref_txt, ref_img, txt, img)}
    return {"min_cosine": min(min_cosine(ref_img, img), min_cosine(ref_txt, txt)),
            "agreement": min(halves.values()), **halves}


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


AUTO_RUNTIMES = ("onnxruntime", "openvino")
# Which variants auto may try (comma-separated; default all installed but OPT_IN): a deployment can
# leave one out, or name an OPT_IN one.
AUTO_ENGINES_ENV = "CLIP_ADAPTER_AUTO_ENGINES"
# Variants auto tries only when named above. openvino-bf16 rounds every activation to bf16 where
# openvino-bf16-matmul rounds only the weight products' operands, at the same speed on this CPU
# (ViT-B/32 on auto's probe: 42.6 vs 43.2 img/s); the extra rounding puts it on the agreement bar:
# top-10 0.981 on auto's probe and 0.969 on the bench's photos, where bf16-matmul scored 0.988 and
# 0.983 (docs/benchmarks.md). A timing tie could hand auto the worse of the two.
OPT_IN = frozenset({"openvino-bf16"})


def candidate_names() -> list[str]:
    allowed = [n.strip() for n in os.environ.get(AUTO_ENGINES_ENV, "").split(",") if n.strip()]
    return [TORCH] + [name for name, (runtime, _, _) in VARIANTS.items()
                      if runtime in AUTO_RUNTIMES and runtime_installed(runtime)
                      and (name in allowed if allowed else name not in OPT_IN)]


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
        row["batch_drift"] = batch_drift(engine, pixels.numpy()[:BATCH_PROBE], vectors[0][:BATCH_PROBE])
        row["ok"] = (row["min_cosine"] >= MIN_COSINE and row["agreement"] >= MIN_AGREEMENT
                     and row["batch_drift"] <= MAX_BATCH_DRIFT)
        if not row["ok"]:
            row["reason"] = (f"disagrees (cosine {row['min_cosine']:.5f}, top-10 {row['agreement']:.3f}, "
                             f"alone vs in a batch {row['batch_drift']:.1e})")
        figures[name] = row
        runs[name] = lambda engine=engine: engine.encode_images(pixels.numpy())
    timed = _interleaved_seconds(runs, timer)
    for name, seconds in timed.items():
        figures[name]["seconds_per_image"] = seconds / len(pixels)
        figures[name]["images_per_s"] = len(pixels) / seconds if seconds > 0 else float("inf")
    usable = [name for name, row in figures.items() if row["ok"] and name in timed]
    best = min(usable, key=lambda name: timed[name])
    choice = {"engine": best, "rules": AUTO_RULES, "model": clip.name, "arch": clip.arch,
              "fingerprint": clip.fingerprint, "cpu": cpu_key(), "probe_items": len(pixels),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "figures": figures}
    save_choice(directory, choice)
    return choice


def batch_drift(engine: Engine, pixels: np.ndarray, in_batch: np.ndarray) -> float:
    """Largest change of a vector between being embedded alone and inside `pixels`' batch."""
    alone = np.concatenate([engine.encode_images(pixels[i:i + 1]) for i in range(len(pixels))])
    return float(np.max(np.abs(alone - in_batch)))


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

    Everything that can fail (the export, its check, opening both towers) happens inside the
    fall-back, so a broken cache never makes loading fail. A damaged export is rebuilt once.
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
        adopt_known_fingerprint(clip)
        try:
            engine = _engine_for(clip, requested, timer, say)
        except ExportDamaged as exc:  # damaged between the check and the open: rebuilt, once
            warn_damaged(exc, "rebuilding it from the weights")
            export_towers(clip, exc.directory)
            engine = _engine_for(clip, requested, timer, say)
    except Exception as exc:  # noqa: BLE001 - an engine is an optimisation; torch always works
        log.warning("engine %s unavailable for %s (%s); using torch", requested, clip.name,
                    str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        return clip
    clip.engine = engine
    return clip


def _engine_for(clip: "ClipModel", requested: str, timer: Timer, say: Callable[[str], None]) -> Optional[Engine]:
    if not any((root / clip.fingerprint / EXPORT_INFO).exists() for root in engine_roots(clip.name)):
        say(f"exporting {clip.name}'s image and text towers to ONNX (once per model) ...")
    directory = ensure_export(clip)
    if clip.weights_files is not None:
        remember_fingerprint(clip.name, clip.weights_files, clip.fingerprint, directory.parent)
    if requested != AUTO:
        engine = open_engine(directory, requested)
        verify_engine(clip, engine)
        return engine
    choice = read_choice(directory)
    if choice is None:
        say(f"timing {', '.join(candidate_names())} on {PROBE_ITEMS} probe images to pick the fastest "
            f"engine (once per model and CPU) ...")
        choice = choose_engine(clip, directory, timer=timer)
        say(f"engine: {describe_choice(choice)}")
    log.info("engine auto for %s on this CPU: %s", clip.name, describe_choice(choice))
    if choice["engine"] == TORCH:
        return None
    # Measured against torch on this fingerprint and CPU already; the files were just checked.
    engine = open_engine(directory, choice["engine"])
    engine.note = f"auto on this CPU: {describe_choice(choice)}"
    return engine


def adopt_known_fingerprint(clip: "ClipModel") -> None:
    """Take the fingerprint recorded for this name when its weights files are unchanged since
    (their stat): hashing every tensor again costs a second on ViT-B/32."""
    if clip.weights_files is not None and "fingerprint" not in clip.__dict__:
        known = known_fingerprint(clip.name)
        if known is not None:
            clip.__dict__["fingerprint"] = known


def export_with_checkpoint(clip: "ClipModel", checkpoint: Path, *, measure: bool = True,
                           timer: Timer = wall_clock) -> Path:
    """Exports of a just-saved checkpoint into `<checkpoint>/engines/<fingerprint>`, so its artifacts
    carry them and a CPU pod's first load only opens them; on a CPU, `auto`'s choice too (valid
    wherever the CPU is of the same kind; another kind measures once at its first load) when `measure`."""
    from .export_cache import CHECKPOINT_ENGINES
    from .models import CHECKPOINT_WEIGHTS

    directory = export_towers(clip, Path(checkpoint) / CHECKPOINT_ENGINES / clip.fingerprint)
    remember_fingerprint(str(checkpoint), [str(Path(checkpoint) / CHECKPOINT_WEIGHTS)], clip.fingerprint,
                         directory.parent)
    if measure and clip.device.type == "cpu" and read_choice(directory) is None:
        choose_engine(clip, directory, timer=timer)
    return directory
