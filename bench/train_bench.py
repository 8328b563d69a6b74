"""Training benchmark: this project's recipe against a plain loop like the earlier adapter's.

The plain loop is what the earlier Dataloop CLIP adapter did: torch's Adam (its default
implementation), a constant learning rate, no warmup, fp32, a single-process DataLoader that
decodes images in the training process, shuffled batches with no care for false negatives.

(a) Throughput, pairs/s, same data, model, batch size and device, for each model in --models.
    The recipe runs `train.train_one_epoch` (threaded decoding, fused AdamW, gradient clipping,
    autocast on GPU). The first step of each loop is a warm-up and is not timed.
(b) Validation Recall@1 after the same number of epochs on the demo's shapes data (tiny model from
    scratch): the recipe (`fit` with the demo's configuration) against the plain loop at the
    earlier adapter's 5e-8 and at the recipe's learning rate. Each is scored at its last epoch
    by the same `evaluate_pairs`.

    python bench/train_bench.py                       # both parts, CPU, a few minutes on 2 cores
    python bench/train_bench.py --device cuda --batch-size 128 --workers 8
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from adapters import demo  # noqa: E402
from adapters.clip.config import ClipConfig  # noqa: E402
from adapters.clip.manifests import load_pairs  # noqa: E402
from adapters.clip.evaluate import EvalData, evaluate_pairs  # noqa: E402
from adapters.clip.models import load_model  # noqa: E402
from adapters.clip.train import (BatchLoader, ContrastiveTask, UniqueBatchSampler, WarmupCosine,  # noqa: E402
                                 build_optimizer, fit, train_one_epoch)

EARLIER_LR = 5e-8


# ---- the plain loop ----------------------------------------------------------------------
class PlainPairs(torch.utils.data.Dataset):
    """Decode + preprocess + tokenize per item, in the training process (num_workers=0)."""

    def __init__(self, pairs, clip) -> None:
        self.pairs, self.clip = pairs, clip

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):
        pair = self.pairs[index]
        with Image.open(pair.image) as image:
            pixels = self.clip.preprocess(image.convert("RGB"))
        return pixels, self.clip.tokenizer([pair.caption])[0]


def plain_epoch(clip, loader, optimizer, max_steps=None, timed_after: int = 1) -> tuple[int, float]:
    """One epoch of the plain loop; returns (pairs timed, seconds timed)."""
    model = clip.model.train()
    pairs, seconds, started = 0, 0.0, None
    for step, (pixels, tokens) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        if step == timed_after:
            started = time.perf_counter()
        pixels, tokens = pixels.to(clip.device), tokens.to(clip.device)
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T
        labels = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if started is not None:
            pairs += len(pixels)
    if clip.device.type == "cuda":
        torch.cuda.synchronize()
    if started is not None:
        seconds = time.perf_counter() - started
    return pairs, seconds


def plain_optimizer(clip, lr: float) -> torch.optim.Optimizer:
    defaults = ClipConfig()
    return torch.optim.Adam(clip.model.parameters(), lr=lr, betas=tuple(defaults.betas), eps=defaults.epsilon,
                            weight_decay=defaults.weight_decay)


def plain_loader(pairs, clip, batch_size: int, seed: int = 0) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(PlainPairs(pairs, clip), batch_size=batch_size, shuffle=True,
                                       num_workers=0, generator=generator)


# ---- (a) throughput ----------------------------------------------------------------------------
def recipe_throughput(model_name: str, pairs, args) -> float:
    config = ClipConfig.from_dict({"model_name": model_name, "device": args.device, "batch_size": args.batch_size,
                                   "num_workers": args.workers})
    clip = load_model(model_name, device=args.device)
    task = ContrastiveTask(clip)
    optimizer = build_optimizer(task, config)
    scaler = torch.amp.GradScaler(clip.device.type, enabled=clip.precision == "fp16")
    plan = UniqueBatchSampler(pairs, args.batch_size).plan(1)[:args.steps + 1]
    schedule = WarmupCosine(1e-5, total_steps=len(plan), warmup_ratio=0.0)
    batches = BatchLoader(pairs, clip, num_workers=args.workers).iterate(plan)
    train_one_epoch(task, [next(batches)], optimizer, scaler, schedule, first_step=0, grad_clip_norm=1.0)  # warm-up
    stats = train_one_epoch(task, batches, optimizer, scaler, schedule, first_step=1, grad_clip_norm=1.0)
    if clip.device.type == "cuda":
        torch.cuda.synchronize()
    return stats.pairs / stats.seconds, clip.precision


def plain_throughput(model_name: str, pairs, args) -> float:
    clip = load_model(model_name, device=args.device, precision="fp32")
    loader = plain_loader(pairs, clip, args.batch_size)
    n, seconds = plain_epoch(clip, loader, plain_optimizer(clip, 1e-5), max_steps=args.steps + 1)
    return n / seconds


# ---- (b) recall after the same number of epochs --------------------------------------------------
def recall_after_epochs(data_dir: Path, epochs: int, work: Path,
                        extra_lrs: tuple[float, ...] = ()) -> dict[str, dict[str, float]]:
    loaded = load_pairs(data_dir)
    train, val = loaded.subset("train"), EvalData.from_pairs(loaded.subset("validation"))
    recipe_config = ClipConfig.from_dict(dict(demo.DEMO_CONFIG, num_epochs=epochs, early_stop=False))
    results = {}
    started = time.perf_counter()
    result = fit(recipe_config, loaded, work / "recipe", show_progress=False)
    last = result.history[-1].val
    results[f"recipe (lr {recipe_config.learning_rate:g})"] = {
        **{k: last[k] for k in ("t2i_r1", "i2t_r1", "mean_recall")},
        "best_epoch_t2i_r1": result.final_metrics["t2i_r1"], "seconds": time.perf_counter() - started}
    for lr in (EARLIER_LR, recipe_config.learning_rate, *extra_lrs):
        started = time.perf_counter()
        torch.manual_seed(recipe_config.seed)
        clip = load_model("tiny", device="cpu")
        optimizer = plain_optimizer(clip, lr)
        loader = plain_loader(train, clip, recipe_config.batch_size, seed=recipe_config.seed)
        for _ in range(epochs):
            plain_epoch(clip, loader, optimizer)
        clip.forget_fingerprint()
        metrics = evaluate_pairs(clip, val, batch_size=64)
        results[f"plain loop (lr {lr:g})"] = {**{k: metrics[k] for k in ("t2i_r1", "i2t_r1", "mean_recall")},
                                             "seconds": time.perf_counter() - started}
    return results


# ---- main ------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["tiny", "ViT-B/32:random"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per loop (after one warm-up step)")
    parser.add_argument("--workers", type=int, default=2, help="the recipe's decoding threads")
    parser.add_argument("--epochs", type=int, default=15, help="epochs for part (b)")
    parser.add_argument("--plain-lr", type=float, action="append", default=[3e-4],
                        help="(b): also run the plain loop at this learning rate (default: 3e-4, which it can take)")
    parser.add_argument("--skip-recall", action="store_true", help="only part (a)")
    parser.add_argument("--skip-throughput", action="store_true", help="only part (b)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    out = {"device": args.device, "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size,
           "steps": args.steps, "throughput": {}, "recall": {}}
    try:
        data_dir = work / "shapes"
        demo.write_prompt_export(data_dir)
        pairs = load_pairs(data_dir).subset("train")
        needed = args.batch_size * (args.steps + 1)
        pairs = (pairs * (needed // len(pairs) + 1))[:needed] if needed > len(pairs) else pairs
        if not args.skip_throughput:
            print(f"(a) throughput, {args.device}, batch {args.batch_size}, {args.steps} timed steps", flush=True)
        for name in [] if args.skip_throughput else args.models:
            plain = plain_throughput(name, pairs, args)
            recipe, precision = recipe_throughput(name, pairs, args)
            out["throughput"][name] = {"plain_pairs_per_s": plain, "recipe_pairs_per_s": recipe,
                                       "recipe_precision": precision, "ratio": recipe / plain}
            print(f"  {name:18} plain {plain:8.1f} pairs/s   recipe ({precision}) {recipe:8.1f} pairs/s   "
                  f"x{recipe / plain:.2f}", flush=True)
        if not args.skip_recall:
            print(f"(b) validation recall after {args.epochs} epochs, tiny from scratch on the demo's shapes "
                  f"(chance R@1 {1 / 48:.1%})", flush=True)
            out["recall"] = recall_after_epochs(data_dir, args.epochs, work, tuple(args.plain_lr))
            for name, r in out["recall"].items():
                print(f"  {name:24} t2i R@1 {r['t2i_r1']:6.1%}   i2t R@1 {r['i2t_r1']:6.1%}   "
                      f"mean recall {r['mean_recall']:6.1%}   ({r['seconds']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
