"""ClipAdapter.find_duplicates and sample_diverse through dtlpy, unmodified, against the fake platform
(tests/fake_dataloop, docs/platform-tests.md).

The feature vectors are seeded into the model's feature set as the platform holds them (what an
earlier embed_dataset left), with known near-duplicate groups and clusters; the functions read them
back in pages through dtlpy's `feature_set.features.list` and write item metadata through dtlpy's
`item.update()`. Each test asserts what was left on the platform.
"""
from __future__ import annotations

import copy

import dtlpy as dl
import numpy as np
import pytest

from adapters.clip_adapter import ClipAdapter, ClipAdapterFailure
from test_curation import clusters, near, unit
from test_platform_contract import make_model, png_bytes

DIM = 64  # the tiny model's


@pytest.fixture
def project(platform):
    return platform.add_project("clip-curation")


def seed(platform, dataset, vectors, *, created=None, metadata=None, names=None) -> list[str]:
    """One image item per vector (or None: an item without a vector), created in order."""
    ids = []
    for i, vector in enumerate(vectors):
        name = names[i] if names else f"/photos/{i:03d}.png"
        item = platform.add_item(dataset["id"], name, png_bytes(i % 4), "image/png",
                                 metadata=copy.deepcopy(metadata[i]) if metadata and metadata[i] else None)
        if created:
            item["createdAt"] = created[i]
        ids.append(item["id"])
    return ids


def feature_set_of(platform, model, project) -> dict:
    return platform.add_feature_set(project["id"], model.name, DIM, model_id=model.id)


def add_vectors(platform, feature_set, ids, vectors) -> None:
    for item_id, vector in zip(ids, vectors):
        if vector is not None:
            platform.add_feature(feature_set["id"], item_id, [float(v) for v in vector])


def group_field(platform, item_id):
    return ((platform.items[item_id]["metadata"].get("user") or {}).get("clip") or {}).get("duplicate_group")


def without_group(metadata: dict) -> dict:
    stripped = copy.deepcopy(metadata)
    stripped.get("user", {}).get("clip", {}).pop("duplicate_group", None)
    return stripped


@pytest.fixture
def duplicates(platform, project):
    """14 items: a group of three (its earliest-created item has the largest id), a pair, a copy at
    cosine 0.9 (no duplicate), ten distinct items, one item without a vector; every item carries user
    metadata, and one distinct item a duplicate_group left by an earlier run."""
    rng = np.random.default_rng(7)
    base = unit(rng.standard_normal((10, DIM)))
    vectors = list(base) + [near(base[0], 0.99, rng), near(base[0], 0.97, rng), near(base[1], 0.96, rng),
                            near(base[2], 0.90, rng), None]
    created = [f"2024-01-01T00:00:{i:02d}.000Z" for i in range(len(vectors))]
    created[11] = "2023-06-01T00:00:00.000Z"           # the 0.97 copy of item 0 is the oldest of its group
    metadata = [{"user": {"camera": f"cam-{i}", "clip": {"note": "keep me"}}} for i in range(len(vectors))]
    metadata[5]["user"]["clip"]["duplicate_group"] = "stale-from-an-earlier-run"
    dataset = platform.add_dataset(project["id"], "photos")
    ids = seed(platform, dataset, vectors, created=created, metadata=metadata)
    model = make_model(platform, dataset)
    add_vectors(platform, feature_set_of(platform, model, project), ids, vectors)
    return dataset, model, ids


def test_find_duplicates_groups_and_marks_every_member_and_nothing_else(platform, duplicates):
    dataset, model, ids = duplicates
    before = {i: copy.deepcopy(platform.items[i]["metadata"]) for i in ids}
    adapter = ClipAdapter(model_entity=model)
    result = adapter.find_duplicates(dataset=dl.datasets.get(dataset_id=dataset["id"]), filters=None,
                                     threshold=0.95)

    assert result == {"groups": [[ids[11], ids[0], ids[10]], [ids[1], ids[12]]], "missing": [ids[14]],
                      "threshold": 0.95}
    kept = {ids[0]: ids[11], ids[10]: ids[11], ids[11]: ids[11], ids[1]: ids[1], ids[12]: ids[1]}
    for item_id in ids:
        assert group_field(platform, item_id) == kept.get(item_id), item_id  # the stale one is gone (None)
        assert without_group(platform.items[item_id]["metadata"]) == without_group(before[item_id])
    patched = [r for r in platform.requests if r.startswith("PATCH /items/")]
    assert sorted(patched) == sorted(f"PATCH /items/{i}" for i in list(kept) + [ids[5]])  # only what changed
    assert "POST /features/sets" not in platform.requests  # no feature set created


def test_a_second_run_after_deleting_a_duplicate_updates_the_metadata(platform, duplicates):
    dataset, model, ids = duplicates
    adapter = ClipAdapter(model_entity=model)
    adapter.find_duplicates(dataset=dl.datasets.get(dataset_id=dataset["id"]), filters=None, threshold=None)
    for deleted in (ids[12], ids[0]):  # the pair's copy, and one of the three; their vectors stay behind
        del platform.items[deleted]
    platform.requests.clear()

    result = adapter.find_duplicates(dataset=dl.datasets.get(dataset_id=dataset["id"]), filters=None,
                                     threshold=None)
    assert result["groups"] == [[ids[11], ids[10]]] and result["threshold"] == 0.95
    assert group_field(platform, ids[1]) is None                 # alone now: no longer a duplicate
    assert group_field(platform, ids[11]) == group_field(platform, ids[10]) == ids[11]
    assert sorted(r for r in platform.requests if r.startswith("PATCH")) == [f"PATCH /items/{ids[1]}"]


def test_find_duplicates_only_looks_at_the_selected_items(platform, duplicates):
    dataset, model, ids = duplicates
    platform.items[ids[12]]["dir"] = "/elsewhere"
    platform.items[ids[12]]["filename"] = "/elsewhere/012.png"
    result = ClipAdapter(model_entity=model).find_duplicates(
        dataset=dl.datasets.get(dataset_id=dataset["id"]), filters={"filter": {"dir": "/photos"}}, threshold=0.95)
    assert result["groups"] == [[ids[11], ids[0], ids[10]]]
    assert group_field(platform, ids[12]) is None and group_field(platform, ids[1]) is None


@pytest.fixture
def clustered(platform, project):
    """Five clusters of 50 items and three of 3 (spread so each cluster is far from the others)."""
    sizes = [50] * 5 + [3] * 3
    vectors, labels = clusters(sizes, seed=11)
    dataset = platform.add_dataset(project["id"], "clusters")
    names = [f"/c{label}/{i:03d}.png" for i, label in enumerate(labels)]
    ids = seed(platform, dataset, list(vectors), names=names)
    model = make_model(platform, dataset)
    add_vectors(platform, feature_set_of(platform, model, project), ids, vectors)
    return dataset, model, dict(zip(ids, labels.tolist()))


def test_sample_diverse_covers_every_cluster_small_ones_included(platform, clustered):
    dataset, model, label_of = clustered
    adapter = ClipAdapter(model_entity=model)
    items, result = adapter.sample_diverse(dataset=dl.datasets.get(dataset_id=dataset["id"]), n=8, filters=None,
                                           exclude=None)
    assert sorted(label_of[i] for i in result["items"]) == list(range(8))
    assert [item.id for item in items] == result["items"] and all(isinstance(i, dl.Item) for i in items)
    assert 0 < result["radius"] < 0.1

    again = adapter.sample_diverse(dataset=dl.datasets.get(dataset_id=dataset["id"]), n=8, filters=None,
                                   exclude=None)[1]
    assert again == result  # deterministic: a pipeline can send it to a labelling task
    assert not [r for r in platform.requests if r.startswith(("PATCH /items", "DELETE"))]


def test_sample_diverse_keeps_away_from_excluded_items(platform, clustered):
    dataset, model, label_of = clustered
    labelled = {"filter": {"$or": [{"dir": "/c0"}, {"dir": "/c5"}]}}
    _, result = ClipAdapter(model_entity=model).sample_diverse(
        dataset=dl.datasets.get(dataset_id=dataset["id"]), n=6, filters=None, exclude=labelled)
    assert sorted(label_of[i] for i in result["items"]) == [1, 2, 3, 4, 6, 7]


# ---- bad input: one line, nothing changed ---------------------------------------------------------
def assert_one_line_and_nothing_changed(platform, error, match: str, before: dict) -> None:
    message = str(error.value)
    assert "\n" not in message and message.startswith("CLIP adapter:") and match in message, message
    assert {i: item["metadata"] for i, item in platform.items.items()} == before
    assert not [r for r in platform.requests if r.startswith(("PATCH /items", "DELETE"))]
    assert "POST /features/sets" not in platform.requests and "POST /features/vectors" not in platform.requests


def test_a_threshold_outside_0_1_is_refused(platform, duplicates):
    dataset, model, _ = duplicates
    before = copy.deepcopy({i: item["metadata"] for i, item in platform.items.items()})
    adapter = ClipAdapter(model_entity=model)
    for threshold in (0, -0.1, 1.5, float("nan"), "high"):
        with pytest.raises(ClipAdapterFailure) as error:
            adapter.find_duplicates(dataset=dl.datasets.get(dataset_id=dataset["id"]), filters=None,
                                    threshold=threshold)
        assert_one_line_and_nothing_changed(platform, error, "(0, 1]", before)


def test_a_model_without_a_feature_set_is_told_to_embed_first(platform, project):
    dataset = platform.add_dataset(project["id"], "never-embedded")
    seed(platform, dataset, [None, None], metadata=[{"user": {"a": 1}}, None])
    model = make_model(platform, dataset)
    before = copy.deepcopy({i: item["metadata"] for i, item in platform.items.items()})
    adapter = ClipAdapter(model_entity=model)
    for call in (lambda: adapter.find_duplicates(dataset=dl.datasets.get(dataset_id=dataset["id"]), filters=None,
                                                 threshold=None),
                 lambda: adapter.sample_diverse(dataset=dl.datasets.get(dataset_id=dataset["id"]), n=1,
                                                filters=None, exclude=None)):
        with pytest.raises(ClipAdapterFailure) as error:
            call()
        assert_one_line_and_nothing_changed(platform, error, "has no feature set: embed the dataset first", before)
    assert platform.feature_sets == {}


def test_a_bad_sample_size_is_refused(platform, clustered):
    dataset, model, _ = clustered
    before = copy.deepcopy({i: item["metadata"] for i, item in platform.items.items()})
    adapter = ClipAdapter(model_entity=model)
    for n, match in ((260, "n=260 is larger than the 259 selected items that have a vector"), (0, "at least 1"),
                     (2.5, "whole number"), (None, "n (how many items to pick) is required")):
        with pytest.raises(ClipAdapterFailure) as error:
            adapter.sample_diverse(dataset=dl.datasets.get(dataset_id=dataset["id"]), n=n, filters=None,
                                   exclude=None)
        assert_one_line_and_nothing_changed(platform, error, match, before)
