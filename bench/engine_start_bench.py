"""Issue 18 items 1-4 measured in one run: batch-invariant engines, whole commands, first loads.

    python bench/engine_start_bench.py [--model ViT-B/32:random] [--images 128] [--rounds 2]

(1) every engine `auto` may pick, on decoded 1-MP photos: img/s as shipped (int8 and bf16 towers
    one item at a time) and with the whole batch in one call (how int8 ran before), ratio to
    torch eager in the same round; the largest change of a vector alone vs inside a batch of 32;
    min cosine and top-10 agreement with torch fp32 (images and captions);
(2) `auto`'s own choice, measured afresh (OpenVINO among the candidates now);
(3) whole commands, new processes, exports and auto's choice cached: `embed` of N 1-MP JPEGs with
    `--engine torch` vs `--engine auto` (interleaved rounds), and a one-image `embed` (auto vs torch),
    with whether torch was imported, and how the two commands' N vectors agree (min cosine, top-10
    image neighbours);
(4) a saved checkpoint (weights + the exports `save` writes + auto's choice), copied as an artifact
    download makes it (new files), then a new process loading it with engine auto through
    `ClipAdapter`'s library calls and embedding one image: wall time.

Prints `uptime` before and after; every comparison is interleaved so background load hits all alike.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from adapters.clip import engines  # noqa: E402
from adapters.clip.embed import Embedder  # noqa: E402
from adapters.clip.errors import EngineError  # noqa: E402
from adapters.clip.models import load_model, save_checkpoint  # noqa: E402
from adapters.clip.onnx_export import (agreement, choose_engine, ensure_export, export_with_checkpoint,  # noqa: E402
                                       open_engine, retrieval_agreement)
from engine_bench import CAPTIONS, make_megapixel_mix  # noqa: E402


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run_cli(args: list[str], env: dict) -> tuple[float, bool]:
    """Wall seconds of a whole `python -m adapters.clip` command, and whether it imported torch."""
    code = ("import sys, runpy; sys.argv = ['adapters.clip'] + sys.argv[1:];"
            "import adapters.clip.cli as c; rc = c.main(sys.argv[1:]);"
            "print('TORCH', 'torch' in sys.modules); sys.exit(rc)")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{args}: {done.stderr[-2000:]}")
    return wall, "TORCH True" in done.stdout


def engines_on_photos(clip, directory: Path, pixels: torch.Tensor, tokens, rounds: int) -> dict:
    names = [n for n in engines.VARIANTS if engines.runtime_installed(engines.VARIANTS[n][0])]
    opened, unavailable = {}, {}
    for name in names:
        try:
            opened[name] = open_engine(directory, name)
        except EngineError as exc:  # e.g. no int8 copy: ONNX Runtime cannot quantize OpenAI's ResNets
            unavailable[name] = {"unavailable": str(exc)}
    reference = (clip.torch_encode_images(pixels), clip.torch_encode_tokens(tokens))
    array = pixels.numpy()
    runs = {"torch": lambda: [clip.torch_encode_images(pixels[i:i + 32]) for i in range(0, len(pixels), 32)]}
    for name, engine in opened.items():
        runs[name] = lambda e=engine: [e.encode_images(array[i:i + 32]) for i in range(0, len(array), 32)]
        if name in engines.PER_SAMPLE:
            runs[f"{name} (whole batch)"] = lambda e=engine: [engines.normalize_rows(e.tower("image")(array[i:i + 32]))
                                                             for i in range(0, len(array), 32)]
    for run in runs.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            rates[name].append(len(array) / (time.perf_counter() - started))
    rows = {}
    for name, values in rates.items():
        ratio = float(np.median([v / b for v, b in zip(values, rates["torch"])]))
        rows[name] = {"img_s": float(np.median(values)), "x_torch": ratio}
    n = min(32, len(array))
    for name, engine in opened.items():
        batch = engine.encode_images(array[:n])
        alone = np.concatenate([engine.encode_images(array[i:i + 1]) for i in range(n)])
        rows[name]["drift_alone_vs_batch32"] = float(np.abs(alone - batch).max())
        rows[name].update(agreement(reference, (engine.encode_images(array), engine.encode_tokens(tokens))))
        if name in engines.PER_SAMPLE:
            whole = engines.normalize_rows(engine.tower("image")(array[:n]))
            lone = np.concatenate([engines.normalize_rows(engine.tower("image")(array[i:i + 1])) for i in range(n)])
            rows[f"{name} (whole batch)"]["drift_alone_vs_batch32"] = float(np.abs(lone - whole).max())
    return {**rows, **unavailable}


def first_load_of_saved_checkpoint(model: str, work: Path, env: dict) -> dict:
    """save -> copy (an artifact download) -> a new process: load with auto + embed one image."""
    clip = load_model(model, device="cpu")
    saved = save_checkpoint(clip, work / "saved")
    measured = engines.choice_file(engines.export_dir(model, clip.fingerprint))
    if measured.is_file():  # auto already measured these weights on this CPU in this run: save would repeat it
        (saved / "engines" / clip.fingerprint).mkdir(parents=True, exist_ok=True)
        shutil.copy(measured, saved / "engines" / clip.fingerprint / measured.name)
    started = time.perf_counter()
    export_with_checkpoint(load_model(str(saved), device="cpu"), saved)  # what ClipAdapter.save adds
    save_seconds = time.perf_counter() - started
    downloaded = work / "downloaded"
    shutil.rmtree(downloaded, ignore_errors=True)  # a reused --work folder: a fresh copy each run
    shutil.copytree(saved, downloaded)
    image = sorted((work / "mp").glob("*.jpg"))[0]
    code = ("import time, sys; t = time.perf_counter();"
            "from adapters.clip.models import load_model; from adapters.clip.onnx_export import attach_engine;"
            "from adapters.clip.embed import Embedder;"
            f"clip = attach_engine(load_model({str(downloaded)!r}, device='cpu'), 'auto');"
            f"v = Embedder(clip, num_workers=0).embed_images([{str(image)!r}]).vectors;"
            "print('ENGINE', clip.engine_name, 'SECONDS', round(time.perf_counter() - t, 2))")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return {"save_exports_and_auto_s": round(save_seconds, 1), "first_load_and_embed_wall_s": round(wall, 2),
            "line": done.stdout.strip().splitlines()[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B/32:random")
    parser.add_argument("--images", type=int, default=128, help="1-MP JPEGs for the whole-command embed")
    parser.add_argument("--photos", type=int, default=48, help="decoded photos for the engine comparison")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["engines", "auto", "cli", "checkpoint"],
                        help="parts to leave out ('auto': keep a cached choice in --work)")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--work", help="work folder to reuse and keep (default: a new temp folder, removed)")
    args = parser.parse_args()
    results: dict = {"uptime_before": uptime(), "model": args.model}
    print(results["uptime_before"], flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="engine-start-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), engines.ENGINE_ENV: str(work / "engines")}
    os.environ[engines.ENGINE_ENV] = env[engines.ENGINE_ENV]
    try:
        if not (work / "jpegs").is_dir():
            (work / "mp").mkdir(exist_ok=True)
            mix = make_megapixel_mix(work / "mp", max(-(-args.images * 5 // 4), args.photos))  # every 5th is a PNG
            (work / "jpegs").mkdir()
            for p in [p for p in mix if p.suffix == ".jpg"][:args.images]:
                shutil.copy(p, work / "jpegs" / p.name)
        mix = sorted((work / "mp").iterdir())
        jpegs = sorted((work / "jpegs").iterdir())
        clip = load_model(args.model, device="cpu")
        started = time.perf_counter()
        directory = ensure_export(clip)
        results["export_s"] = round(time.perf_counter() - started, 1)
        if "auto" not in args.skip or engines.read_choice(directory) is None:
            started = time.perf_counter()
            choice = choose_engine(clip, directory)
            results["auto"] = {"seconds": round(time.perf_counter() - started, 1),
                               "described": engines.describe_choice(choice), "figures": choice["figures"]}
            print("auto:", results["auto"]["described"], flush=True)
        if "engines" not in args.skip:
            prep = Embedder(clip, num_workers=0)
            pixels = torch.stack([prep.prepare(p).tensor for p in mix[:args.photos]])
            tokens = clip.tokenizer(CAPTIONS)
            results["engines"] = engines_on_photos(clip, directory, pixels, tokens, args.rounds)
            for name, row in results["engines"].items():
                print(f"  {name}: {row}", flush=True)
        if "cli" not in args.skip:
            run_cli(["embed", str(jpegs[0]), "--model", args.model, "--device", "cpu", "--out", str(work / "w")], env)
            walls: dict[str, list] = {"torch": [], "auto": [], "one torch": [], "one auto": []}
            imported = {}
            for _ in range(args.rounds):
                for engine in ("torch", "auto"):
                    wall, imported[engine] = run_cli(["embed", str(work / "jpegs"), "--model", args.model, "--engine",
                                                      engine, "--device", "cpu", "--out", str(work / engine)], env)
                    walls[engine].append(round(wall, 2))
                    wall, imported[f"one {engine}"] = run_cli(
                        ["embed", str(jpegs[1]), "--model", args.model, "--engine", engine, "--device", "cpu",
                         "--out", str(work / f"one-{engine}")], env)
                    walls[f"one {engine}"].append(round(wall, 2))
                print(f"  cli walls so far: {walls}", flush=True)
            a, b = np.load(work / "torch.npy"), np.load(work / "auto.npy")
            cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            a, b = engines.normalize_rows(a), engines.normalize_rows(b)
            results["cli"] = {"images": len(jpegs), "walls": walls, "torch_imported": imported,
                              "median": {k: float(np.median(v)) for k, v in walls.items()},
                              "min_cosine_auto_vs_torch": float(cos.min()),
                              "top10_auto_vs_torch": retrieval_agreement(a, a, b, b, exclude_self=True)}
            m = results["cli"]["median"]
            print(f"  embed {len(jpegs)}: torch {m['torch']:.1f}s auto {m['auto']:.1f}s "
                  f"x{m['torch'] / m['auto']:.2f}; one image: torch {m['one torch']:.2f}s auto {m['one auto']:.2f}s; "
                  f"the {len(jpegs)} vectors: min cosine {results['cli']['min_cosine_auto_vs_torch']:.6f}, "
                  f"top-10 image neighbours {results['cli']['top10_auto_vs_torch']:.3f}", flush=True)
        if "checkpoint" not in args.skip:
            results["checkpoint"] = first_load_of_saved_checkpoint(args.model, work, env)
            print("  checkpoint:", results["checkpoint"], flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    results["uptime_after"] = uptime()
    print(results["uptime_after"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
