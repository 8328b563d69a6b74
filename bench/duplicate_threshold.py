"""Where the near-duplicate threshold should sit: cosine of near-duplicate pairs vs distinct images.

    python bench/duplicate_threshold.py                  # tiny and ViT-B/32 (random weights), 24 photos
    python bench/duplicate_threshold.py --models tiny --photos 8

Each generated photo (the embedding bench's: gradients, shapes, noise; 1024x768 JPEG) is turned into
the copies a dataset collects: a JPEG re-encode at quality 40, a resize to half, center crops keeping
90% and 75% of each side, a mirror, +15% brightness. For every model the script prints the cosine of
each kind of copy to its original and the distribution of cosines between distinct photos, and the
largest threshold that still catches each kind of copy.

What this can and cannot say: offline there are no pretrained weights, only the `tiny` architecture
and ViT-B/32 with random weights. Their cosines show the *method* (which copies stay close, how far
apart distinct images are), not the values pretrained CLIP gives; docs/curation.md says how the
default was chosen from this and from what is published about pretrained CLIP.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from adapters.clip.embed import Embedder  # noqa: E402
from adapters.clip.models import load_model  # noqa: E402


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def crop(image: Image.Image, keep: float) -> Image.Image:
    w, h = image.size
    dw, dh = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
    return image.crop((dw, dh, w - dw, h - dh))


COPIES = {
    "JPEG re-encode q40": lambda im: jpeg(im, 40),
    "resized to half": lambda im: im.resize((im.width // 2, im.height // 2), Image.BILINEAR),
    "center crop 90%": lambda im: crop(im, 0.9),
    "center crop 75%": lambda im: crop(im, 0.75),
    "mirrored": ImageOps.mirror,
    "brightness +15%": lambda im: ImageEnhance.Brightness(im).enhance(1.15),
}


def measure(model: str, photos: list[Path]) -> dict:
    embedder = Embedder(load_model(model, device="cpu"), batch_size=16, num_workers=2)
    originals = [Image.open(p).convert("RGB") for p in photos]
    base = embedder.embed_images(originals).vectors
    result = {"model": model, "copies": {}}
    for name, make in COPIES.items():
        copies = embedder.embed_images([make(im) for im in originals]).vectors
        cosines = np.sum(base * copies, axis=1)
        result["copies"][name] = {"min": float(cosines.min()), "median": float(np.median(cosines))}
    distinct = base @ base.T
    upper = distinct[np.triu_indices(len(base), 1)]
    result["distinct"] = {"median": float(np.median(upper)), "p99": float(np.percentile(upper, 99)),
                          "max": float(upper.max())}
    return result


def report(results: list[dict], command: str) -> str:
    lines = ["| copy of a photo | " + " | ".join(f"{r['model']}: min / median cosine" for r in results) + " |",
             "|---|" + "---:|" * len(results)]
    for name in COPIES:
        lines.append(f"| {name} | " + " | ".join(f"{r['copies'][name]['min']:.3f} / {r['copies'][name]['median']:.3f}"
                                                for r in results) + " |")
    lines.append("| **distinct photos**: median / 99th percentile / max | "
                 + " | ".join(f"{r['distinct']['median']:.3f} / {r['distinct']['p99']:.3f} / {r['distinct']['max']:.3f}"
                              for r in results) + " |")
    return f"Command: `{command}`\n\n" + "\n".join(lines)


def main() -> None:
    from embed_bench import make_photos

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "ViT-B/32:random"])
    parser.add_argument("--photos", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        photos = make_photos(Path(folder), args.photos, size=(1024, 768))
        results = [measure(model, photos) for model in args.models]
    print(json.dumps(results, indent=2))
    print(report(results, "python bench/duplicate_threshold.py" + "".join(f" {a}" for a in sys.argv[1:])))


if __name__ == "__main__":
    main()
