"""Inference engines side by side, in one run: model-only, end-to-end, the CLI, and a cold search.

    python bench/engine_bench.py [--model ViT-B/32:random] [--rounds 5] [--batch-size 32]

(1) model-only: preprocessed (B, 3, 224, 224) batches through each engine (torch eager, ONNX
    Runtime fp32/int8, OpenVINO fp32/bf16, and what `auto` chose, measured fresh in this run):
    img/s, ratio to torch eager (per round, then the median), min cosine and top-10 retrieval
    agreement against torch fp32 on real decoded photos and captions;
(2) end-to-end on files, 12-MP JPEGs and a 1-MP mix (JPEG sizes around a megapixel, some PNG):
    today's Embedder (torch, PIL reduced-scale decode in threads) against the Embedder on the
    default engine, and against two faster decode paths on that engine: simplejpeg's DCT-scaled
    decode with fast IDCT/upsampling in threads, and PIL decode in worker processes;
(3) `python -m adapters.clip embed DIR --engine torch` vs `--engine auto` (new processes, exports
    already cached): wall time and min cosine of the two outputs;
(4) a cold `python -m adapters.clip search "text" --store S` on a 10k-item store (new process).

Every comparison is interleaved within rounds, so background load hits all paths alike;
ratios are taken within a round, then the median. Prints `uptime` before and after.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from adapters.clip import engines  # noqa: E402
from adapters.clip.embed import Embedder, Prepared  # noqa: E402
from adapters.clip.onnx_export import (PROBE_CAPTIONS, PROBE_SIZES, agreement, attach_engine,  # noqa: E402
                                       export_towers, open_engine, synthetic_photo)
from adapters.clip.models import load_model  # noqa: E402
from embed_bench import make_photos  # noqa: E402

CAPTIONS = list(PROBE_CAPTIONS)  # the captions `auto` probes with


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def median(values) -> float:
    return float(np.median(list(values)))


# ---- inputs ------------------------------------------------------------------------------------
def make_megapixel_mix(folder: Path, count: int) -> list[Path]:
    """Around 1 MP each: mostly JPEG at several aspect ratios, every fifth a PNG."""
    rng = np.random.default_rng(1)
    paths = []
    for i in range(count):
        image = synthetic_photo(rng, *PROBE_SIZES[i % len(PROBE_SIZES)])  # as `auto`'s probe makes them
        path = folder / (f"mp_{i:03d}.png" if i % 5 == 4 else f"mp_{i:03d}.jpg")
        image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)
        paths.append(path)
    return paths


# ---- decode paths --------------------------------------------------------------------------------
class SimpleJpegEmbedder(Embedder):
    """JPEGs through simplejpeg at the smallest DCT scale >= the model's input, fast IDCT/upsampling."""

    def prepare(self, source):
        import simplejpeg
        path = Path(source)
        if path.suffix.lower() not in (".jpg", ".jpeg"):
            return super().prepare(source)
        size = self.clip.image_size
        data = path.read_bytes()
        array = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True,
                                       min_height=size, min_width=size)
        return Prepared(self._to_pixels(Image.fromarray(array)), None)


_WORKER: dict = {}


def _worker_prepare(path: str):
    prepared = _WORKER["embedder"].prepare(path)
    return prepared.tensor.numpy() if prepared.tensor is not None else None, prepared.error


def embed_with_processes(embedder: Embedder, paths: list[Path], workers: int, pool: ProcessPoolExecutor) -> None:
    """Decode + preprocess in worker processes (forked with a torch-free copy of the Embedder)."""
    def prepared():
        for array, error in pool.map(_worker_prepare, [str(p) for p in paths], chunksize=2):
            yield Prepared(torch.from_numpy(array) if array is not None else None, error)

    for _ in embedder._batches(prepared(), embedder.batch_size):
        pass


# ---- measurements ----------------------------------------------------------------------------------
def model_only(clips: dict, pixels: torch.Tensor, batch_size: int, rounds: int) -> dict:
    rates = {name: [] for name in clips}
    for round_ in range(rounds):
        for name, clip in clips.items():
            started = time.perf_counter()
            for lo in range(0, len(pixels), batch_size):
                clip.encode_images(pixels[lo:lo + batch_size])
            rates[name].append(len(pixels) / (time.perf_counter() - started))
        print(f"  model-only round {round_ + 1}: " + ", ".join(f"{n} {r[-1]:.1f}" for n, r in rates.items()),
              flush=True)
    return rates


def end_to_end(paths: list[Path], runners: dict, rounds: int) -> dict:
    rates = {name: [] for name in runners}
    for round_ in range(rounds):
        for name, run in runners.items():
            started = time.perf_counter()
            run(paths)
            rates[name].append(len(paths) / (time.perf_counter() - started))
        print(f"  round {round_ + 1}: " + ", ".join(f"{n} {r[-1]:.1f}" for n, r in rates.items()), flush=True)
    return rates


def ratio_rows(rates: dict, base: str) -> dict:
    return {name: {"img_s": median(values), "ratio": median(v / b for v, b in zip(values, rates[base]))}
            for name, values in rates.items()}


def cli(args: list[str], env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "adapters.clip", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{args}: {done.stderr[-2000:]}")
    return time.perf_counter() - started


def cold_search(model: str, dim: int, items: int, rounds: int, env: dict, work: Path) -> dict:
    """A store of `items` vectors bound to `model` (its fingerprint), searched by new processes."""
    from adapters.clip.store import ModelBinding, Store
    clip = load_model(model, device="cpu")
    store_dir = work / "store"
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((items, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with Store.open(store_dir, create=ModelBinding.of(clip)) as store:
        store.add_vectors([f"/photos/{i:05d}.jpg" for i in range(items)], vectors)
    del clip
    walls = {"cold (exported text tower)": [], "torch (--engine torch)": []}
    for _ in range(rounds):
        walls["cold (exported text tower)"].append(cli(["search", "a dog on a beach", "--store", str(store_dir)], env))
        walls["torch (--engine torch)"].append(
            cli(["search", "a dog on a beach", "--store", str(store_dir), "--engine", "torch"], env))
    probe = ("import sys; sys.argv = ['adapters.clip', 'search', 'a dog', '--store', %r];"
             "import adapters.clip.cli as c; c.main(sys.argv[1:]); print('torch' in sys.modules)") % str(store_dir)
    imported = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    return {"walls": walls, "torch_imported": imported.stdout.strip().splitlines()[-1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B/32:random")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="model-only rounds (end-to-end: --e2e-rounds)")
    parser.add_argument("--e2e-rounds", type=int, default=3)
    parser.add_argument("--model-images", type=int, default=64)
    parser.add_argument("--photos", type=int, default=32, help="12-MP JPEGs")
    parser.add_argument("--megapixel", type=int, default=64, help="1-MP images")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--store-items", type=int, default=10_000)
    parser.add_argument("--cli-rounds", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["model", "e2e", "cli", "search"])
    parser.add_argument("--reuse-auto", action="store_true", help="keep auto's cached choice (default: measure again)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    results: dict = {"uptime_before": uptime(), "model": args.model}
    print(results["uptime_before"], flush=True)
    clip = load_model(args.model, device="cpu")
    # Decode workers are forked before any engine runs here: OpenVINO in a process that then forks crashed.
    _WORKER["embedder"] = Embedder(clip, num_workers=0)
    pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("fork"))
    pool.submit(_worker_prepare, "/nonexistent.jpg").result()
    directory = export_towers(clip)
    if not args.reuse_auto:
        engines.choice_file(directory).unlink(missing_ok=True)  # auto measures afresh, under this run's load
    started = time.perf_counter()
    auto = attach_engine(dataclasses.replace(clip), "auto")
    results["auto"] = {"engine": auto.engine_name, "seconds": time.perf_counter() - started,
                       "figures": engines.read_choice(directory)["figures"]}
    print(f"auto chose {auto.engine_name} in {results['auto']['seconds']:.0f}s: "
          f"{engines.describe_choice(engines.read_choice(directory))}", flush=True)
    clips = {"torch": clip}
    for name in engines.VARIANTS:
        clips[name] = dataclasses.replace(clip, engine=open_engine(directory, name))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "photos").mkdir()
        (work / "mp").mkdir()
        t0 = time.perf_counter()
        photos = make_photos(work / "photos", args.photos)
        mix = make_megapixel_mix(work / "mp", args.megapixel)
        print(f"generated {len(photos)} 12-MP JPEGs and {len(mix)} 1-MP images in {time.perf_counter() - t0:.0f}s",
              flush=True)
        prep = Embedder(clip, num_workers=0)
        real = torch.stack([prep.prepare(p).tensor for p in (photos + mix)[:48]])
        tokens = clip.tokenizer(CAPTIONS)
        reference = (clip.torch_encode_images(real), clip.torch_encode_tokens(tokens))

        if "model" not in args.skip:
            print("model-only:", flush=True)
            pixels = real.repeat((args.model_images + len(real) - 1) // len(real), 1, 1, 1)[:args.model_images]
            for c in clips.values():
                c.encode_images(pixels[:4])
            rows = ratio_rows(model_only(clips, pixels, args.batch_size, args.rounds), "torch")
            for name, c in clips.items():
                rows[name].update(agreement(reference, (c.encode_images(real), c.encode_tokens(tokens))))
            results["model_only"] = rows

        if "e2e" not in args.skip:
            default = clips[auto.engine_name]
            runners = {
                "today (torch, PIL threads)": lambda p: Embedder(clip, batch_size=args.batch_size,
                                                                 num_workers=args.workers).embed_images(p),
                f"{auto.engine_name}, PIL threads": lambda p: Embedder(default, batch_size=args.batch_size,
                                                                       num_workers=args.workers).embed_images(p),
                f"{auto.engine_name}, simplejpeg threads": lambda p: SimpleJpegEmbedder(
                    default, batch_size=args.batch_size, num_workers=args.workers).embed_images(p),
                f"{auto.engine_name}, PIL processes": lambda p: embed_with_processes(
                    Embedder(default, batch_size=args.batch_size, num_workers=0), p, args.workers, pool),
            }
            for label, paths in (("1-MP mix", mix), ("12-MP JPEGs", photos)):
                print(f"end-to-end, {label}:", flush=True)
                rates = end_to_end(paths, runners, args.e2e_rounds)
                results[f"e2e {label}"] = ratio_rows(rates, "today (torch, PIL threads)")
            decode = {}
            for label, paths in (("1-MP mix", mix), ("12-MP JPEGs", photos)):
                for name, cls in (("PIL", Embedder), ("simplejpeg", SimpleJpegEmbedder)):
                    e = cls(clip, num_workers=0)
                    t = time.perf_counter()
                    for p in paths[:16]:
                        e.prepare(p)
                    decode[f"{label}, {name}"] = 1000 * (time.perf_counter() - t) / min(16, len(paths))
            results["decode_ms_per_image_one_thread"] = decode

        if "cli" not in args.skip:
            print("CLI embed (new processes, exports cached):", flush=True)
            walls = {"torch": [], "auto": []}
            outputs = {}
            for _ in range(args.cli_rounds):
                for engine in walls:
                    out = work / f"cli-{engine}"
                    walls[engine].append(cli(["embed", str(work / "mp"), "--model", args.model, "--engine", engine,
                                              "--device", "cpu", "--out", str(out)], env))
                    outputs[engine] = np.load(out.with_suffix(".npy"))
            a, b = outputs["torch"], outputs["auto"]
            cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            results["cli_embed"] = {"walls": walls, "median": {k: median(v) for k, v in walls.items()},
                                    "min_cosine": float(cos.min()), "images": len(a)}
            print(f"  {results['cli_embed']}", flush=True)

        if "search" not in args.skip:
            print("cold search:", flush=True)
            results["cold_search"] = cold_search(args.model, clip.dim, args.store_items, 3, env, work)
            print(f"  {results['cold_search']}", flush=True)

    pool.shutdown()
    results["uptime_after"] = uptime()
    print(results["uptime_after"])
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


def report(results: dict) -> None:
    print(f"\nmodel: {results['model']}; auto chose {results['auto']['engine']} "
          f"(measured in {results['auto']['seconds']:.0f}s at first load)")
    if "model_only" in results:
        print("\n| engine | img/s | x torch eager | min cosine | top-10 agreement |\n|---|---:|---:|---:|---:|")
        for name, row in results["model_only"].items():
            print(f"| {name} | {row['img_s']:.1f} | {row['ratio']:.2f} | {row['min_cosine']:.5f} | "
                  f"{row['agreement']:.3f} |")
    for key in [k for k in results if k.startswith("e2e ")]:
        print(f"\n{key[4:]}: | path | img/s | x today's Embedder |\n|---|---:|---:|")
        for name, row in results[key].items():
            print(f"| {name} | {row['img_s']:.1f} | {row['ratio']:.2f} |")
    if "decode_ms_per_image_one_thread" in results:
        print("\ndecode + preprocess, ms/image, one thread:",
              ", ".join(f"{k} {v:.1f}" for k, v in results["decode_ms_per_image_one_thread"].items()))
    if "cli_embed" in results:
        c = results["cli_embed"]
        print(f"\nCLI embed of {c['images']} images: torch {c['median']['torch']:.1f}s, auto {c['median']['auto']:.1f}s "
              f"(x{c['median']['torch'] / c['median']['auto']:.2f}); min cosine {c['min_cosine']:.5f}")
    if "cold_search" in results:
        walls = results["cold_search"]["walls"]
        print("\ncold search (new process, 10k store): " + ", ".join(
            f"{k} median {median(v):.2f}s (runs {', '.join(f'{x:.2f}' for x in v)})" for k, v in walls.items()))


if __name__ == "__main__":
    main()
