"""Issue 18 item 5: one execution downloads the next batch while it embeds the current one, and
uploads a batch's vectors while it embeds the next.

dtlpy's own `embed_items` / `predict_items` / `embed_dataset` run unmodified over the fake platform
(tests/fake_dataloop); the adapter only wraps `embed_items`/`predict_items` around dtlpy's and hands
`prepare_item_func` what its prefetcher downloaded. The contract: the same vectors on the same items
as dtlpy's flow without the overlap (dtlpy's `BaseModelAdapter.embed_items` called directly on the
same adapter), bad items isolated as before, and the next batch's downloads requested while a batch
is still being embedded. CI runs this file on the oldest dtlpy it supports and on the newest.
"""
from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import dtlpy as dl
import numpy as np
import pytest

from adapters.clip_adapter import ClipAdapter
from conftest import pattern_image
from dataloop_fakes import platform_model

BATCH = 3
CONFIG = {"model_name": "tiny", "device": "cpu", "batch_size": BATCH, "num_workers": 0}


def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    pattern_image(seed, size=(96, 80)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def soon(condition, seconds: float = 3.0) -> bool:
    """Whether `condition()` holds within `seconds` (polled)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


class RecordingAdapter(ClipAdapter):
    """With `upcoming` set (a list of the item ids of each next batch), records at the start of each
    `embed` call whether the next batch's items were requested from the platform before this batch's
    embedding finished (it waits up to 3 s for them to be)."""

    platform = None
    upcoming: list[list[str]] = []
    seen_ahead: list[bool] = []

    def embed(self, batch: list, **kwargs):
        if self.upcoming:
            later = self.upcoming.pop(0)
            self.seen_ahead.append(soon(lambda: set(later) <= set(stream_requests(self.platform))))
        return super().embed(batch, **kwargs)


@pytest.fixture(scope="module")
def loaded(module_platform):
    """Ten JPEGs, a broken one, a text item and a video (no vector) in one dataset (four batches of 3),
    and one adapter loaded for the module (as a deployed service keeps one)."""
    platform = module_platform
    project = platform.add_project("clip-overlap")
    dataset = platform.add_dataset(project["id"], "photos")
    seeded = [platform.add_item(dataset["id"], f"/photos/p{i:02d}.jpg", jpeg_bytes(i), "image/jpeg")
              for i in range(10)]
    seeded.insert(4, platform.add_item(dataset["id"], "/photos/broken.jpg", b"\xff\xd8 not a jpeg", "image/jpeg"))
    seeded.insert(7, platform.add_item(dataset["id"], "/notes/caption.txt", b"a striped pattern", "text/plain"))
    seeded.append(platform.add_item(dataset["id"], "/clips/c.mp4", b"\x00" * 32, "video/mp4"))
    model = platform_model(platform, CONFIG, labels=["stripes", "dots", "sky"], dataset_id=dataset["id"])
    adapter = RecordingAdapter(model_entity=model)
    adapter.platform = platform
    return platform, dataset, seeded, adapter


def stream_requests(platform) -> list[str]:
    return [r.split("/")[2] for r in list(platform.requests) if r.startswith("GET /items/") and r.endswith("/stream")]


def test_overlapped_embed_items_gives_the_same_vectors_on_the_same_items_as_dtlpys_flow(loaded):
    platform, data, seeded, adapter = loaded
    items = [dl.items.get(item_id=i["id"]) for i in seeded]

    sequential_items, sequential = dl.BaseModelAdapter.embed_items(adapter, items)
    overlapped_items, overlapped = adapter.embed_items(items)

    # dtlpy returns (and uploads) the items that got a vector: all but the broken JPEG and the video
    expected = [i["id"] for i in seeded if i["id"] not in (seeded[4]["id"], seeded[-1]["id"])]
    assert [i.id for i in overlapped_items] == [i.id for i in sequential_items] == expected
    for a, b in zip(overlapped, sequential):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert adapter._prefetchers == []  # nothing left running after the call


def test_overlapped_embed_dataset_uploads_the_same_features_as_dtlpys_flow(loaded):
    platform, data, seeded, adapter = loaded
    items = [dl.items.get(item_id=i["id"]) for i in seeded]
    platform.features.clear()
    dl.BaseModelAdapter.embed_items(adapter, items)                     # dtlpy's flow, no overlap
    (feature_set,) = platform.feature_sets.values()
    before = platform.vectors_of(feature_set["id"])
    platform.features.clear()

    adapter.embed_dataset(dl.datasets.get(dataset_id=data["id"]))      # dtlpy's embed_dataset, overlapped
    after = platform.vectors_of(feature_set["id"])
    assert set(after) == set(before) == {i["id"] for i in seeded} - {seeded[4]["id"], seeded[-1]["id"]}
    for item_id, vector in after.items():
        np.testing.assert_allclose(vector, before[item_id], atol=1e-6)


def test_the_next_batch_downloads_while_a_batch_embeds(loaded):
    platform, data, seeded, adapter = loaded
    downloadable = [i["id"] for i in seeded if not i["filename"].endswith(".mp4")]
    batches = [[i["id"] for i in seeded[start:start + BATCH]] for start in range(0, len(seeded), BATCH)]
    items = [dl.items.get(item_id=i["id"]) for i in seeded]
    platform.requests.clear()
    adapter.seen_ahead = []
    adapter.upcoming = [[i for i in later if i in downloadable] for later in batches[1:]]

    adapter.embed_items(items)

    assert adapter.seen_ahead == [True] * (len(batches) - 1)
    assert sorted(stream_requests(platform)) == sorted(downloadable)  # each item downloaded once


class UploadWatchingAdapter(ClipAdapter):
    """Records, at the start of each `embed` after the first, whether the items of the batch before
    have their vectors on the platform already (it waits up to 3 s for them to be); fails the batch
    holding `poisoned` as a model error would."""

    platform = None
    feature_set_id = ""
    earlier: list[str] = []
    seen_uploaded: list[bool] = []
    poisoned = ""

    def embed(self, batch: list, **kwargs):
        if self.earlier:
            earlier = set(self.earlier)
            self.seen_uploaded.append(soon(lambda: earlier <= set(self.platform.vectors_of(self.feature_set_id))))
        self.earlier = [x.item_id for x in batch]
        if self.poisoned in self.earlier:
            raise RuntimeError("a model error in this batch")
        return super().embed(batch, **kwargs)


@pytest.fixture
def upload_watching(loaded):
    platform, data, seeded, recording = loaded
    adapter = UploadWatchingAdapter(model_entity=recording.model_entity)
    adapter.platform = platform
    adapter.embed_items([dl.items.get(item_id=seeded[0]["id"])])  # creates the feature set
    (feature_set,) = platform.feature_sets.values()
    adapter.feature_set_id, adapter.earlier = feature_set["id"], []
    images = [dl.items.get(item_id=i["id"]) for i in seeded if i["filename"].startswith("/photos/p")][:9]
    platform.features.clear()
    platform.requests.clear()
    return platform, adapter, images


def test_a_batchs_vectors_upload_while_the_next_batch_embeds(upload_watching):
    """dtlpy uploads all vectors after the last batch; here each batch's upload (dtlpy's own code)
    is under way while the next batch embeds, and the first call takes FIRST_TURN items."""
    platform, adapter, images = upload_watching
    adapter.FIRST_TURN = 2
    done, vectors = adapter.embed_items(images)

    assert adapter.seen_uploaded == [True, True, True]  # turns of 2, 3, 3 and 1 items
    assert [i.id for i in done] == [i.id for i in images] and len(vectors) == len(images)
    assert set(platform.vectors_of(adapter.feature_set_id)) == {i.id for i in images}
    assert platform.requests.count("POST /features/vectors") == 4


def test_a_failing_batch_fails_the_call_and_every_other_batch_is_uploaded(upload_watching):
    platform, adapter, images = upload_watching
    adapter.poisoned = images[4].id
    with pytest.raises(Exception, match=images[4].id):
        adapter.embed_items(images)
    uploaded = set(platform.vectors_of(adapter.feature_set_id))
    assert uploaded == {i.id for i in images[:3] + images[6:]}  # the batch of items 3-5 is the failed one


def test_predict_items_overlapped_labels_the_same_as_dtlpys_flow(loaded):
    platform, data, seeded, adapter = loaded
    images = [dl.items.get(item_id=i["id"]) for i in seeded if i["filename"].endswith(".jpg")]
    _, sequential = dl.BaseModelAdapter.predict_items(adapter, images)
    _, overlapped = adapter.predict_items(images)

    def labels(annotations):
        return [(a.item_id, a.label, round(a.metadata["user"]["model"]["confidence"], 5)) for a in annotations]

    assert labels(overlapped) == labels(sequential)
    assert {a.item_id for a in overlapped} == {i.id for i in images} - {seeded[4]["id"]}


def test_sixteen_downloads_run_at_once_not_dtlpys_default_pool_of_three_per_cpu(loaded, fake_dataloop_server):
    """dtlpy runs every `item.download` in one pool of `client_api.num_processes` threads, 3 per CPU
    (6 on a 2-core pod), under dtlpy's 16 download threads; loading the adapter raises it (dtlpy's
    public setting), so 13 items asked for in 16 threads, as dtlpy asks, are all on the wire at once."""
    platform, data, seeded, adapter = loaded
    assert dl.client_api.num_processes >= 2 * ClipAdapter.DOWNLOAD_THREADS
    items = [dl.items.get(item_id=i["id"]) for i in seeded]
    network = fake_dataloop_server.network
    network.latency_s, network.most_in_flight = 1.0, 0  # long enough for all 13 to start under any load
    try:
        with ThreadPoolExecutor(max_workers=ClipAdapter.DOWNLOAD_THREADS) as pool:
            prepared = list(pool.map(adapter.prepare_item_func, items))
    finally:
        network.latency_s = 0.0
    assert not [p.error for p in prepared if p.error and "download failed" in p.error]
    assert network.most_in_flight >= len(items) - 1, network.most_in_flight
