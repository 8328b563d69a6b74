"""`embed_dataset` through dtlpy over a network with latency, against the adapter's compute-only rate.

    python bench/platform_embed_bench.py                       # 512 1-MP JPEGs, 50 ms per request
    python bench/platform_embed_bench.py --images 64 --model tiny --engine torch   # a quick look

The fake Dataloop platform (tests/fake_dataloop) serves the dataset on 127.0.0.1, each request
delayed by `--latency-ms` plus its bytes at `--mbps` MB/s (per request); dtlpy's own
`embed_dataset` -> `embed_items` run unmodified above it, with the real ClipAdapter. Measured in
one run, interleaved:
(a) compute only: `ClipAdapter.embed` on the same images already in memory, batch by batch (the
    ceiling: no network at all);
(b) dtlpy's flow as it is: `embed_dataset` with dtlpy's own `embed_items` (download a batch in 16
    threads, then embed it, in turn);
(c) what ships: `embed_dataset` with the adapter's `embed_items` (the next batch downloads while
    a batch embeds, and a batch's vectors upload while the next embeds);
(d) downloads only: every item through `prepare_item_func` in dtlpy's 16-thread pool, batch by batch.
Each round runs (a) before and after (b) and (c); ratios are against the mean of the two (a)s of
their round. The issue's target: (c) >= 0.8 of (a).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DATALOOP_PATH", tempfile.mkdtemp(prefix="dataloop-bench-"))  # before dtlpy
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402


def photos(count: int, size: tuple[int, int]) -> list[bytes]:
    """Photo-like JPEGs (gradients, shapes, noise) of `size`, as bytes."""
    from embed_bench import make_photos

    with tempfile.TemporaryDirectory() as folder:
        return [path.read_bytes() for path in make_photos(Path(folder), count, size=size)]


def shipped_configuration(model_name: str, engine: str) -> dict:
    """The `openai-clip` model's configuration from dataloop.json, with the bench's model and engine."""
    manifest = json.loads((ROOT / "dataloop.json").read_text())
    model = next(m for m in manifest["components"]["models"] if m["name"] == "openai-clip")
    # one execution embeds the whole dataset (the shipped subset limit would split it into executions)
    return {**model["configuration"], "model_name": model_name, "engine": engine,
            "predict_embed_subset_limit": 100_000}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average %.2f, %.2f, %.2f" % os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--megapixels", type=float, default=1.0)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--mbps", type=float, default=20.0, help="MB/s per request (0: unlimited)")
    parser.add_argument("--model", default="ViT-B/32:random")
    parser.add_argument("--engine", default="auto", help="the deployed default is auto")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", help="write the measurements here too")
    args = parser.parse_args()

    import dtlpy as dl

    from adapters.clip.items import IMAGE, ItemInput
    from adapters.clip_adapter import ClipAdapter
    from dataloop_fakes import platform_model
    from fake_dataloop import FakeDataloopServer, connect_dtlpy

    results: dict = {"uptime_start": uptime(), "args": vars(args)}
    side = int(round((args.megapixels * 1e6 * 4 / 3) ** 0.5))
    size = (side, side * 3 // 4)
    started = time.perf_counter()
    data = photos(args.images, size)
    results["photo"] = {"size": size, "mean_kb": sum(map(len, data)) / len(data) / 1e3}
    print(f"{len(data)} JPEGs of {size[0]}x{size[1]}, {results['photo']['mean_kb']:.0f} kB each, made in "
          f"{time.perf_counter() - started:.0f} s", flush=True)

    server = FakeDataloopServer(latency_s=args.latency_ms / 1e3, bytes_per_s=args.mbps * 1e6 or None).start()
    try:
        connect_dtlpy(server.url)
        state = server.state
        project = state.add_project("bench")
        dataset = state.add_dataset(project["id"], "photos")
        for i, raw in enumerate(data):
            state.add_item(dataset["id"], f"/photos/p{i:04d}.jpg", raw, "image/jpeg")
        configuration = shipped_configuration(args.model, args.engine)
        batch = int(configuration["batch_size"])
        model = platform_model(state, configuration, dataset_id=dataset["id"])
        started = time.perf_counter()
        adapter = ClipAdapter(model_entity=model)
        results["load_s"] = time.perf_counter() - started
        results["engine"] = adapter.clip.description
        print(f"loaded in {results['load_s']:.0f} s: {adapter.clip.description}", flush=True)
        ds = dl.datasets.get(dataset_id=dataset["id"])
        inputs = [ItemInput(item_id=str(i), kind=IMAGE, data=raw) for i, raw in enumerate(data)]
        items = list(ds.items.list().all())

        def compute_only() -> float:
            began = time.perf_counter()
            for start in range(0, len(inputs), batch):
                vectors = adapter.embed(inputs[start:start + batch])
                assert all(v is not None for v in vectors)
            return len(inputs) / (time.perf_counter() - began)

        def embed_dataset(overlapped: bool) -> float:
            """dtlpy's embed_dataset on the adapter; without the overlap, with dtlpy's own embed_items
            put back on this one instance (the same loaded model, nothing else changed)."""
            state.features.clear()
            state.requests.clear()
            if not overlapped:
                adapter.embed_items = functools.partial(dl.BaseModelAdapter.embed_items, adapter)
            began = time.perf_counter()
            try:
                adapter.embed_dataset(ds)
            finally:
                adapter.__dict__.pop("embed_items", None)
            rate = len(data) / (time.perf_counter() - began)
            assert len(state.features) == len(data), f"{len(state.features)} vectors for {len(data)} items"
            kinds: dict[str, int] = {}
            for request in list(state.requests):
                method, path = request.split(" ", 1)
                kind = f"{method} " + "/".join("{id}" if len(part) == 24 else part for part in path.split("/"))
                kinds[kind] = kinds.get(kind, 0) + 1
            results["requests"] = kinds
            return rate

        def downloads_only() -> float:
            began = time.perf_counter()
            with ThreadPoolExecutor(max_workers=16) as pool:  # dtlpy's pool, batch by batch
                for start in range(0, len(items), batch):
                    prepared = list(pool.map(adapter.prepare_item_func, items[start:start + batch]))
                    assert all(p.ok for p in prepared)
            return len(items) / (time.perf_counter() - began)

        cpu: dict[str, list[float]] = {}

        def timed(name: str, run: Callable[[], float]) -> float:
            """`run`'s items/s; its CPU seconds per item (this process: client, fake server, model) kept."""
            began = time.process_time()
            rate = run()
            cpu.setdefault(name, []).append((time.process_time() - began) / len(data))
            return rate

        adapter.clip.warmup()
        rounds = []
        for number in range(args.rounds):
            row = {"compute_before": timed("compute", compute_only)}
            row["dtlpy_flow"] = timed("dtlpy_flow", lambda: embed_dataset(overlapped=False))
            row["overlapped"] = timed("overlapped", lambda: embed_dataset(overlapped=True))
            row["compute_after"] = timed("compute", compute_only)
            row["downloads"] = timed("downloads", downloads_only)
            compute = (row["compute_before"] + row["compute_after"]) / 2
            row["ratio_dtlpy_flow"] = row["dtlpy_flow"] / compute
            row["ratio_overlapped"] = row["overlapped"] / compute
            rounds.append(row)
            print(f"round {number + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
        results["rounds"] = rounds
        results["batch_size"] = batch
        results["cpu_ms_per_item"] = {name: 1e3 * statistics.median(values) for name, values in cpu.items()}
    finally:
        server.stop()
    results["uptime_end"] = uptime()
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    results["median"] = median
    compute = (median["compute_before"] + median["compute_after"]) / 2
    # Per image: c of compute, d of download. In turn: N (c + d). Overlapped: the first call's
    # download (FIRST_TURN items), then each batch's compute or the next batch's download, whichever
    # is longer. Neither counts the listing queries or the feature uploads.
    n, first = args.images, min(batch, ClipAdapter.FIRST_TURN, args.images)
    c, d = 1 / compute, 1 / median["downloads"]
    c_batch, d_batch = min(batch, n) * c, min(batch, n) * d
    ideal_sequential = n * (c + d)
    ideal_overlap = first * d + n * c + max(0.0, d - c) * (n - first)
    results["model"] = {"compute_s_per_batch": c_batch, "download_s_per_batch": d_batch,
                        "ideal_dtlpy_flow_ratio": n * c / ideal_sequential,
                        "ideal_overlapped_ratio": n * c / ideal_overlap}
    print()
    print(f"images {args.images} ({size[0]}x{size[1]} JPEG, {results['photo']['mean_kb']:.0f} kB), batch {batch}, "
          f"{args.latency_ms:.0f} ms + {args.mbps:g} MB/s per request; {results['engine']}")
    print("| path | items/s (median) | x compute only |")
    print("|---|---:|---:|")
    print(f"| compute only (`ClipAdapter.embed` on bytes in memory) | {compute:.2f} | 1.00 |")
    print(f"| `embed_dataset`, dtlpy's flow (download a batch, then embed it) | {median['dtlpy_flow']:.2f} | "
          f"{median['ratio_dtlpy_flow']:.2f} |")
    print(f"| `embed_dataset`, overlapped (what ships) | {median['overlapped']:.2f} | "
          f"**{median['ratio_overlapped']:.2f}** |")
    print(f"| downloads only (`prepare_item_func`, 16 threads, batch by batch) | {median['downloads']:.2f} | |")
    print(f"per batch of {batch}: compute {c_batch:.1f} s, download {d_batch:.1f} s; ideal ratios from those: "
          f"dtlpy's flow {results['model']['ideal_dtlpy_flow_ratio']:.2f}, overlapped "
          f"{results['model']['ideal_overlapped_ratio']:.2f}")
    print(f"requests of one embed_dataset: {results['requests']}")
    print("CPU ms per item (this process: dtlpy, the fake server, the model): "
          + ", ".join(f"{name} {ms:.1f}" for name, ms in results["cpu_ms_per_item"].items()))
    print(f"uptime: {results['uptime_start']} -> {results['uptime_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
