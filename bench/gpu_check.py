"""GPU checks, run on a lent GPU machine (never in CI):

    python bench/gpu_check.py --out results/

1. device 'auto' picks CUDA and bf16 (or fp16) autocast; weights stay fp32;
2. autocast embeddings agree with fp32 embeddings (cosine > 0.99) for images and texts;
3. the same input alone or in a batch gives the same vector on the GPU (bf16 tolerance);
4. fine-tuning ViT-B/32 (random weights) for a few steps under bf16 and fp16 (GradScaler):
   finite losses, fp32 master weights, logit scale clamped, best checkpoint reloads;
5. embedding throughput: end-to-end Embedder vs model-only on the GPU (bench/embed_bench.py).
Writes gpu_check.json and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.clip.config import ClipConfig  # noqa: E402
from adapters.clip.pairs import CaptionPair  # noqa: E402
from adapters.clip.embed import Embedder  # noqa: E402
from adapters.clip.models import load_model  # noqa: E402
from adapters.clip.train import fit  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def shape_dataset(folder: Path, per_class: int = 16) -> list[CaptionPair]:
    pairs, rng = [], np.random.default_rng(0)
    for color, rgb in COLORS.items():
        for shape in SHAPES:
            for i in range(per_class):
                image = Image.new("RGB", (224, 224), (245, 245, 245))
                x, y = rng.integers(20, 120, 2)
                box = [int(x), int(y), int(x) + 80, int(y) + 80]
                draw = ImageDraw.Draw(image)
                (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=rgb)
                path = folder / f"{color}_{shape}_{i}.png"
                image.save(path)
                subset = "validation" if i % 4 == 0 else "train"
                pairs.append(CaptionPair(path, f"a {color} {shape} number {i}", subset, label=f"{color} {shape}"))
    return pairs


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def check_embedding(results: dict, pairs: list[CaptionPair], model: str, device: str) -> None:
    auto = load_model(model, device="auto")
    fp32 = load_model(model, device=device, precision="fp32")
    results["device"] = str(auto.device)
    results["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    results["auto_precision"] = auto.precision
    results["weights_dtype"] = str(next(auto.model.parameters()).dtype)
    images = [p.image for p in pairs[:64]]
    texts = [p.caption for p in pairs[:64]]
    a, b = Embedder(auto, batch_size=32), Embedder(fp32, batch_size=32)
    results["image_cosine_autocast_vs_fp32_min"] = float(cosine_rows(a.embed_images(images).vectors,
                                                                     b.embed_images(images).vectors).min())
    results["text_cosine_autocast_vs_fp32_min"] = float(cosine_rows(a.embed_texts(texts).vectors,
                                                                    b.embed_texts(texts).vectors).min())
    alone = a.embed_images(images[:1]).vectors[0]
    batched = a.embed_images(images[:32]).vectors[0]
    results["alone_vs_batch_max_abs_diff"] = float(np.abs(alone - batched).max())


def check_training(results: dict, pairs: list[CaptionPair], run_root: Path, model: str, device: str) -> None:
    for precision in ("bf16", "fp16"):
        config = ClipConfig.from_dict({"model_name": model, "batch_size": 32, "num_epochs": 2,
                                       "learning_rate": 1e-4, "device": device, "precision": precision,
                                       "early_stop": False})
        started = time.perf_counter()
        result = fit(config, pairs, run_root / precision, show_progress=False)
        losses = [r.train_loss for r in result.history if r.train_loss is not None]
        entry = {"seconds": round(time.perf_counter() - started, 1), "train_losses": losses,
                 "finite": bool(losses) and all(math.isfinite(x) for x in losses),
                 "pairs_per_s": [r.pairs_per_s for r in result.history if r.pairs_per_s],
                 "weights_dtype": str(next(result.clip.model.parameters()).dtype),
                 "logit_scale": float(result.clip.model.logit_scale.detach().float().cpu())}
        entry["logit_scale_clamped"] = entry["logit_scale"] <= math.log(100) + 1e-4
        reloaded = load_model(str(run_root / precision / "best"), device=device)
        entry["best_reloads"] = reloaded.fingerprint == load_model(str(run_root / precision / "best")).fingerprint
        results[f"train_{precision}"] = entry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu-results")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the script itself")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, device = ("tiny", "cpu") if args.dry_run else ("ViT-B/32:random", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a GPU machine (or --dry-run)")
    results: dict = {"torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = shape_dataset(Path(tmp))
        for name, check in (("embedding", lambda: check_embedding(results, pairs, model, device)),
                            ("training", lambda: check_training(results, pairs, Path(tmp) / "runs", model, device))):
            try:
                check()
            except Exception as exc:  # noqa: BLE001 - report every check, even after one fails
                results[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    if not args.skip_bench:
        bench = subprocess.run([sys.executable, str(ROOT / "bench" / "embed_bench.py"), "--device", "cuda",
                                "--images", "96", "--batch-size", "32", "--workers", "12", "--rounds", "2"],
                               capture_output=True, text=True)
        (out / "embed_bench_gpu.txt").write_text(bench.stdout + bench.stderr)
        print(bench.stdout[-3000:], bench.stderr[-2000:])


if __name__ == "__main__":
    main()
