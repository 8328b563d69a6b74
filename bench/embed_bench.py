"""End-to-end image embedding throughput against two baselines measured in the same run.

    python bench/embed_bench.py [--images 48] [--batch-size 16] [--model ViT-B/32:random] [--device cpu]

(a) model-only: encoding already-preprocessed tensors (the ceiling);
(b) naive: open, convert and preprocess each image in the main thread, then encode batch by
    batch, as the earlier adapter did (full 12-megapixel decode, no overlap);
(c) Embedder.embed_images: parallel decode at reduced JPEG scale, overlapped with the model.

Inputs are generated 4000x3000 JPEGs (photo-like: gradients, shapes, noise). Prints images/s
for each and the ratios; the targets are (c) >= 0.8x (a) and (c) >= 1.5x (b).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.clip.embed import Embedder  # noqa: E402
from adapters.clip.models import load_model  # noqa: E402


def make_photos(folder: Path, count: int, size=(4000, 3000)) -> list[Path]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size[1]:8, 0:size[0]:8]
    paths = []
    for i in range(count):
        base = np.stack([(x * (i + 1) % 256), (y * 3 % 256), ((x + y) % 256)], axis=-1).astype(np.uint8)
        image = Image.fromarray(base).resize(size, Image.BILINEAR)
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = rng.integers(0, size[0] - 400), rng.integers(0, size[1] - 400)
            draw.ellipse([x0, y0, x0 + rng.integers(100, 400), y0 + rng.integers(100, 400)],
                         fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        noise = rng.integers(-12, 12, (size[1], size[0], 3))
        image = Image.fromarray(np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8))
        path = folder / f"photo_{i:03d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def model_only(clip, tensors: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(tensors), batch_size):
        clip.encode_images(tensors[i:i + batch_size])
    return len(tensors) / (time.perf_counter() - start)


def naive_loop(clip, paths: list[Path], batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        batch = [clip.preprocess(Image.open(p).convert("RGB")) for p in paths[i:i + batch_size]]
        clip.encode_images(torch.stack(batch))
    return len(paths) / (time.perf_counter() - start)


def end_to_end(clip, paths: list[Path], batch_size: int, workers: int) -> float:
    embedder = Embedder(clip, batch_size=batch_size, num_workers=workers)
    start = time.perf_counter()
    result = embedder.embed_images(paths)
    elapsed = time.perf_counter() - start
    assert result.ok.all(), result.errors
    return len(paths) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="ViT-B/32:random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=max(2, min(8, os.cpu_count() or 2)))
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each is kept")
    args = parser.parse_args()

    clip = load_model(args.model, device=args.device)
    print(f"model: {clip.description}")
    print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, device {clip.device}")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = make_photos(Path(tmp), args.images)
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        print(f"generated {len(paths)} 4000x3000 JPEGs ({mb:.1f} MB each) in {time.perf_counter() - t0:.0f}s")
        tensors = torch.stack([clip.preprocess(Image.open(p).convert("RGB")) for p in paths[:args.batch_size]])
        tensors = tensors.repeat((len(paths) + len(tensors) - 1) // len(tensors), 1, 1, 1)[:len(paths)]
        clip.warmup()
        decode_s = decode_cost(clip, paths)
        rounds = []
        for round_ in range(args.rounds):  # interleaved, so background load hits all three alike
            row = {"model-only": model_only(clip, tensors, args.batch_size),
                   "naive": naive_loop(clip, paths, args.batch_size),
                   "embedder": end_to_end(clip, paths, args.batch_size, args.workers)}
            rounds.append(row)
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in row.items())
                  + f"; embedder/model-only {row['embedder'] / row['model-only']:.2f}")
    # Ratios within a round (same machine load), then the median over rounds.
    vs_model = float(np.median([r["embedder"] / r["model-only"] for r in rounds]))
    vs_naive = float(np.median([r["embedder"] / r["naive"] for r in rounds]))
    median = {k: float(np.median([r[k] for r in rounds])) for k in rounds[0]}
    # With C cores busy with the model, decoding adds decode_s / C of wall time per image at best.
    cores = os.cpu_count() or 1
    bound = (1 / median["model-only"]) / (1 / median["model-only"] + decode_s / cores) if clip.device.type == "cpu" \
        else float("nan")
    print()
    print(f"decode + preprocess, one thread: {1000 * decode_s:.1f} ms/image")
    print("| path | images/s (median) | ratio to model-only (median of per-round ratios) |")
    print("|---|---:|---:|")
    print(f"| model only (preprocessed tensors) | {median['model-only']:.1f} | 1.00 |")
    print(f"| naive loop (earlier adapter) | {median['naive']:.1f} | {vs_model / vs_naive:.2f} |")
    print(f"| Embedder, {args.workers} decode threads | {median['embedder']:.1f} | {vs_model:.2f} |")
    print()
    print(f"end-to-end / model-only = {vs_model:.2f} (target >= 0.8; ideal overlap on {cores} cores: {bound:.2f})")
    print(f"end-to-end / naive      = {vs_naive:.2f} (target >= 1.5)")


def decode_cost(clip, paths: list[Path]) -> float:
    """Seconds per image to decode (at reduced JPEG scale) and preprocess, in one thread."""
    embedder = Embedder(clip, num_workers=0)
    start = time.perf_counter()
    for path in paths[:16]:
        embedder.prepare(path)
    return (time.perf_counter() - start) / min(16, len(paths))


if __name__ == "__main__":
    main()
