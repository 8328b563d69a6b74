"""How long an interactive call takes, for sizing the interactive compute config (docs/platform.md).

    python bench/interactive_bench.py [--model ViT-B/32:random] [--rounds 5] [--threads 10]

A real ClipAdapter (dtlpy's BaseModelAdapter; a dl.Model built offline, no server) embeds what an
interactive call carries: one text (a query typed in the dataset browser), one photo (a pipeline
node on a new item), a batch of 16 photos; then `--threads` one-photo calls at once on the one
adapter, as a service with that concurrency runs them. Items are real dl.Items whose binaries
download from file:// URLs (1600x1200 JPEGs). Engine torch (the slowest; `auto` only picks a
faster one). Prints seconds per call (median of --rounds) and the ratios to the one-text call
measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("DATALOOP_PATH", tempfile.mkdtemp(prefix="dtlpy-bench-"))  # before dtlpy is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dtlpy as dl  # noqa: E402

from adapters.clip_adapter import ClipAdapter  # noqa: E402
from embed_bench import make_photos  # noqa: E402


def file_item(item_id: str, path: Path, mimetype: str) -> dl.Item:
    system = {"mimetype": mimetype, "shebang": {"linkInfo": {"type": "url", "ref": path.resolve().as_uri()}}}
    return dl.Item.from_json({"id": item_id, "name": path.name, "filename": "/" + path.name, "type": "file",
                              "datasetId": "d", "metadata": {"system": system}}, client_api=dl.client_api)


def offline_adapter(model_name: str) -> ClipAdapter:
    model = dl.Model.from_json({"id": "bench", "name": "bench", "configuration": {"model_name": model_name,
                                                                                 "engine": "torch"}},
                               client_api=dl.client_api, project=None, package=None)
    model.update = lambda *args, **kwargs: model  # no server to tell
    adapter = ClipAdapter()
    adapter.model_entity = model
    adapter.load("")
    return adapter


def seconds(call, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B/32:random")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=10)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="interactive-bench-"))
    photos = [file_item(f"img{i}", path, "image/jpeg")
              for i, path in enumerate(make_photos(folder, 16, size=(1600, 1200)))]
    (folder / "query.txt").write_text("a red car parked by the sea")
    text = file_item("txt", folder / "query.txt", "text/plain")

    started = time.perf_counter()
    adapter = offline_adapter(args.model)
    print(f"model {args.model}: loaded in {time.perf_counter() - started:.1f} s (once per pod, not per call)")
    adapter.embed([text, photos[0]])  # warm-up

    one_text = seconds(lambda: adapter.embed([text]), args.rounds)
    one_photo = seconds(lambda: adapter.embed([photos[0]]), args.rounds)
    batch = seconds(lambda: adapter.embed(photos), max(1, args.rounds // 2))
    with ThreadPoolExecutor(args.threads) as pool:
        concurrent = seconds(lambda: list(pool.map(lambda i: adapter.embed([photos[i % len(photos)]]),
                                                   range(args.threads))), max(1, args.rounds // 2))
    rows = [("1 text", one_text), ("1 photo", one_photo), ("16 photos", batch),
            (f"{args.threads} x 1 photo, concurrently", concurrent)]
    print(f"{'call':<30} {'s per call':>10} {'x 1 text':>9}")
    for name, value in rows:
        print(f"{name:<30} {value:>10.3f} {value / one_text:>9.1f}")
    print(f"concurrent one-photo calls: {args.threads} done in {concurrent:.2f} s, "
          f"{args.threads * one_photo / concurrent:.2f}x the throughput of one at a time")


if __name__ == "__main__":
    main()
