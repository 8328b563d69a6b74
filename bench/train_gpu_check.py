"""Training checks on a GPU machine (never in CI): mixed precision, exact resume, gradient caching.

    python bench/train_gpu_check.py --out results/

For bf16, fp16 (GradScaler) and fp32 on CUDA, `fit` trains the tiny model for 3 epochs: losses
stay finite, parameters stay fp32 (master weights), the GradScaler state is checkpointed, and a
run killed after epoch 1 and resumed ends with the same weights as an uninterrupted run. Then the
gradient-cached gradient is compared with the full-batch gradient under fp16 autocast.
Writes train_gpu_check.json. (Figures: docs/fine-tuning.md, docs/benchmarks.md.)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from adapters.clip.config import ClipConfig  # noqa: E402
from adapters.clip.pairs import CaptionPair  # noqa: E402
from adapters.clip.models import load_model, read_state_dict  # noqa: E402
from adapters.clip.train import BatchLoader, ContrastiveTask, fit  # noqa: E402
from conftest import pattern_image  # noqa: E402


class Killed(Exception):
    pass


def kill_after_first_epoch(record, num_epochs) -> None:
    if record.epoch == 1:
        raise Killed


def make_pairs(root: Path) -> list[CaptionPair]:
    pairs = []
    for i in range(48):
        path = root / f"{i}.png"
        pattern_image(i).save(path)
        pairs.append(CaptionPair(image=path, caption=f"picture {i}", subset="train" if i < 36 else "validation"))
    return pairs


def check_precision(precision: str, device: str, pairs, root: Path) -> dict:
    config = ClipConfig.from_dict({"model_name": "tiny", "device": device, "precision": precision, "batch_size": 12,
                                   "num_epochs": 3, "learning_rate": 1e-3, "early_stop": False})
    started = time.perf_counter()
    whole = fit(config, pairs, root / f"whole-{precision}", show_progress=False)
    try:
        fit(config, pairs, root / f"split-{precision}", on_epoch_end=kill_after_first_epoch, show_progress=False)
    except Killed:
        pass
    fit(config, pairs, root / f"split-{precision}", resume=True, show_progress=False)
    a = read_state_dict(root / f"whole-{precision}" / "last" / "model.safetensors")
    b = read_state_dict(root / f"split-{precision}" / "last" / "model.safetensors")
    trainer = torch.load(root / f"whole-{precision}" / "last" / "trainer.pt", weights_only=True)
    losses = [r.train_loss for r in whole.history[1:]]
    return {"precision": whole.clip.precision, "param_dtypes": sorted({str(p.dtype) for p in whole.clip.model.parameters()}),
            "train_losses": losses, "finite": all(math.isfinite(x) for x in losses),
            "scaler_state": {k: float(v) for k, v in trainer["scaler"].items()},
            "resume_max_weight_difference": max(float((a[k] - b[k]).abs().max()) for k in a),
            "seconds": round(time.perf_counter() - started, 1)}


def check_grad_cache(device: str, pairs) -> float:
    """Max relative difference (per parameter) between cached and full-batch gradients under fp16."""
    grads = []
    for chunk in (0, 5):
        clip = load_model("tiny", device=device, precision="fp16")
        task = ContrastiveTask(clip, grad_cache_chunk=chunk)
        scaler = torch.amp.GradScaler(clip.device.type, enabled=clip.precision == "fp16", init_scale=1024.0)
        task.forward_backward(next(BatchLoader(pairs, clip, 0).iterate([list(range(16))])), scaler)
        grads.append({n: p.grad.float() / scaler.get_scale() for n, p in task.parameters()})
    return max(float((grads[0][n] - grads[1][n]).norm() / (grads[0][n].norm() + 1e-12)) for n in grads[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".", help="folder for train_gpu_check.json")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = make_pairs(Path(tmp))
        for precision in ("bf16", "fp16", "fp32"):
            results[precision] = check_precision(precision, device, pairs, Path(tmp))
            print(precision, json.dumps(results[precision]), flush=True)
        results["grad_cache_fp16_max_relative_error"] = check_grad_cache(device, pairs)
    print("grad cache vs full batch under fp16, max relative error:", results["grad_cache_fp16_max_relative_error"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "train_gpu_check.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
