"""One ClipAdapter serves several executions at once: a service with `concurrency` N runs up to N
executions in threads of one process, on the adapter it loaded once (dataloop.json runs clip-cpu
and clip-dataset with concurrency > 1). Concurrent calls must give the vectors and zero-shot
predictions that sequential ones give.

Real ClipAdapter with the `tiny` model, real dtlpy `embed_items`, items that really download from
file:// URLs; the model is on the fake platform (tests/fake_dataloop), and `upload_features=False`
keeps the vectors off it.
"""
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from adapters.clip_adapter import ClipAdapter
from conftest import pattern_image
from dataloop_fakes import file_item, platform_model

MANIFEST = json.loads((Path(__file__).parents[1] / "dataloop.json").read_text())
THREADS = max(config["runtime"]["concurrency"] for config in MANIFEST["components"]["computeConfigs"])
DIM = 64  # tiny's embedding size


@pytest.fixture(scope="module")
def adapter(module_platform):
    return ClipAdapter(model_entity=platform_model(module_platform, {"model_name": "tiny", "batch_size": 3,
                                                                     "embeddings_size": DIM}))


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    folder = tmp_path_factory.mktemp("items")
    made = []
    for i in range(7):
        pattern_image(i).save(folder / f"photo_{i}.png")
        made.append(file_item(f"img{i}", folder / f"photo_{i}.png", "image/png"))
    for i, text in enumerate(["a red car", "two dogs on a beach", "a bowl of soup", "night sky"]):
        (folder / f"caption_{i}.txt").write_text(text)
        made.append(file_item(f"txt{i}", folder / f"caption_{i}.txt", "text/plain"))
    return made


def test_the_manifest_runs_the_adapter_with_concurrency_above_one():
    assert THREADS > 1  # otherwise this module tests a case the platform never creates


def test_concurrent_embed_items_give_the_sequential_vectors(adapter, items):
    calls = [items[i % len(items):] + items[:i % len(items)] for i in range(THREADS)]  # each its own order
    expected = {it.id: vector for it, vector in zip(*adapter.embed_items(items, upload_features=False))}
    assert len(expected) == len(items) and all(len(v) == DIM for v in expected.values())

    start = threading.Barrier(THREADS)

    def run(batch):
        start.wait()  # every thread enters the adapter at the same moment
        return adapter.embed_items(batch, upload_features=False)

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(run, calls))
    for batch, (returned, vectors) in zip(calls, results):
        assert [it.id for it in returned] == [it.id for it in batch]
        for item, vector in zip(returned, vectors):
            np.testing.assert_allclose(vector, expected[item.id], atol=1e-5, err_msg=item.id)


def test_concurrent_embed_of_texts_and_images_gives_the_sequential_vectors(adapter, items):
    prepared = [adapter.prepare_item_func(it) for it in items]
    expected = adapter.embed(prepared)
    start = threading.Barrier(THREADS)

    def run(offset):
        start.wait()
        return adapter.embed(prepared[offset:] + prepared[:offset])

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(run, range(THREADS)))
    for offset, vectors in enumerate(results):
        np.testing.assert_allclose(np.array(vectors), np.array(expected[offset:] + expected[:offset]), atol=1e-5)


def test_concurrent_zero_shot_predictions_equal_the_sequential_ones(items, module_platform):
    """clip-cpu also runs predict_items 10 at a time; the class vectors are built once and shared."""
    adapter = ClipAdapter(model_entity=platform_model(module_platform, {"model_name": "tiny", "embeddings_size": DIM},
                                                      labels=["red square", "green circle", "blue sky"]))
    prepared = [adapter.prepare_item_func(it) for it in items]

    def scores(collections):
        return [[(a.label, a.metadata["user"]["model"]["confidence"]) for a in c.annotations] for c in collections]

    expected = scores(adapter.predict(prepared))
    assert sum(len(per_item) for per_item in expected) == 7  # one label per image, none for the texts
    start = threading.Barrier(THREADS)

    def run(_):
        start.wait()
        return scores(adapter.predict(prepared))

    with ThreadPoolExecutor(THREADS) as pool:
        for result in pool.map(run, range(THREADS)):
            assert [[label for label, _ in per_item] for per_item in result] == \
                [[label for label, _ in per_item] for per_item in expected]
            np.testing.assert_allclose([s for per_item in result for _, s in per_item],
                                       [s for per_item in expected for _, s in per_item], atol=1e-5)
