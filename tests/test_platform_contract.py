"""The platform contract: dtlpy's own model-service flows, unmodified, with the real ClipAdapter on
the `tiny` model, against the fake Dataloop platform (tests/fake_dataloop, docs/platform-tests.md).

Only the network is fake. Each test asserts what the flow left on the platform (the fake's state):
artifacts, feature vectors, annotations, model status and metrics, not return values only.
"""
from __future__ import annotations

import io
import json
import zipfile

import dtlpy as dl
import numpy as np
import pytest
import torch

from adapters.clip.embed import Embedder
from adapters.clip.models import load_model
from adapters.clip_adapter import ClipAdapter
from conftest import pattern_image
from dataloop_fakes import platform_model

CONFIG = {"model_name": "tiny", "device": "cpu", "batch_size": 4, "num_workers": 0}


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    pattern_image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def project(platform):
    return platform.add_project("clip-contract")


@pytest.fixture
def images(platform, project):
    """A dataset of four images and one text item (CLIP embeds both), plus a video it cannot embed."""
    dataset = platform.add_dataset(project["id"], "photos")
    items = [platform.add_item(dataset["id"], f"/photos/p{i}.png", png_bytes(i), "image/png") for i in range(4)]
    items.append(platform.add_item(dataset["id"], "/notes/caption.txt", b"a red square", "text/plain"))
    items.append(platform.add_item(dataset["id"], "/clips/c.mp4", b"\x00" * 32, "video/mp4"))
    return dataset, items


def make_model(platform, dataset=None, configuration=None, **fields) -> dl.Model:
    return platform_model(platform, {**CONFIG, **(configuration or {})},
                          dataset_id=dataset["id"] if dataset else None, **fields)


# dtlpy splits a dataset into executions from 1.115 (`_execute_dataset_operation`); before, the
# dataset functions embed/predict every item in place.
FANS_OUT = hasattr(dl.BaseModelAdapter, "_execute_dataset_operation")


def assert_fanned_out(platform, function_name: str) -> None:
    executions = list(platform.executions.values())
    if not FANS_OUT:
        assert executions == []
        return
    assert len(executions) >= 3 and {e["functionName"] for e in executions} == {function_name}
    assert all(e["latestStatus"]["status"] == "success" for e in executions)


def replica_runner(platform):
    """What a deployed service does with an execution: a fresh adapter built from the model (the
    agent's `ClipAdapter(model_entity=model)`, i.e. load_from_model), then the function on its inputs."""
    def run(execution: dict) -> None:
        model = dl.models.get(model_id=execution["modelId"])
        adapter = ClipAdapter(model_entity=model)
        inputs = execution["input"]
        if "dataset" in inputs:
            dataset = dl.datasets.get(dataset_id=inputs["dataset"]["dataset_id"])
            getattr(adapter, execution["functionName"])(dataset=dataset, filters=inputs["filters"])
        else:
            items = [dl.items.get(item_id=i["item_id"]) for i in inputs["items"]]
            getattr(adapter, execution["functionName"])(items=items)
    return run


def reference_vectors(items, state, folder) -> dict[str, np.ndarray]:
    """The library's own embeddings of the items' bytes, read from files as the CLI would."""
    embedder = Embedder(load_model("tiny", device="cpu"), num_workers=0)
    result = {}
    for item in items:
        data = state.binaries[item["id"]]
        mimetype = item["metadata"]["system"]["mimetype"]
        if mimetype.startswith("image/"):
            path = folder / item["name"]
            path.write_bytes(data)
            result[item["id"]] = embedder.embed_images([path]).vectors[0]
        elif mimetype.startswith("text/"):
            result[item["id"]] = embedder.embed_texts([data.decode()]).vectors[0]
    return result


# ---- load_from_model / save_to_model ---------------------------------------------------------------
def test_save_to_model_uploads_artifacts_that_load_back_into_a_new_adapter(platform, images):
    model = make_model(platform)
    adapter = ClipAdapter(model_entity=model)  # load_from_model: no artifacts yet, the named architecture
    with torch.no_grad():
        for parameter in adapter.clip.model.parameters():
            parameter.mul_(1.01)  # stands in for fine-tuning
    adapter.clip.forget_fingerprint()
    adapter.save_to_model()

    stored = platform.models[model.id]
    files = platform.artifact_files(model.id)
    assert {"model.safetensors", "clip_config.json"} <= set(files)
    assert len(stored["artifacts"]) == len(files)
    assert stored["configuration"]["embeddings_size"] == adapter.clip.dim  # load wrote the real size back

    fresh = ClipAdapter(model_entity=dl.models.get(model_id=model.id))  # downloads and loads the artifacts
    assert fresh.clip.fingerprint == adapter.clip.fingerprint
    items = [dl.items.get(item_id=i["id"]) for i in images[1][:3]]
    np.testing.assert_allclose(fresh.embed(items), adapter.embed(items), atol=1e-6)


# ---- embed_items / embed_dataset -------------------------------------------------------------------
def assert_vectors_match_reference(platform, feature_set_id, items, expected_ids, folder):
    vectors = platform.vectors_of(feature_set_id)
    assert set(vectors) == expected_ids
    reference = reference_vectors([i for i in items if i["id"] in expected_ids], platform, folder)
    for item_id, vector in vectors.items():
        np.testing.assert_allclose(vector, reference[item_id], atol=1e-5)


def test_embed_items_puts_vectors_of_the_models_size_on_the_right_items(platform, images, tmp_path):
    dataset, items = images
    model = make_model(platform, dataset)
    adapter = ClipAdapter(model_entity=model)
    adapter.embed_items([dl.items.get(item_id=i["id"]) for i in items])

    (feature_set,) = platform.feature_sets.values()
    assert feature_set["size"] == adapter.clip.dim and feature_set["modelId"] == model.id
    embeddable = {i["id"] for i in items if not i["filename"].endswith(".mp4")}
    assert_vectors_match_reference(platform, feature_set["id"], items, embeddable, tmp_path)



def test_embed_items_with_the_default_engine_agrees_with_torch(platform, images, tmp_path):
    """A deployed model's configuration names no engine: `auto` (ONNX Runtime fp32 or int8 when it
    is faster here, else torch) must put vectors within the agreement it promises on the platform."""
    dataset, items = images
    model = make_model(platform, dataset, configuration={"engine": "auto"})
    adapter = ClipAdapter(model_entity=model)
    assert adapter.settings.engine == "auto"
    adapter.embed_items([dl.items.get(item_id=i["id"]) for i in items])

    (feature_set,) = platform.feature_sets.values()
    vectors = platform.vectors_of(feature_set["id"])
    assert set(vectors) == {i["id"] for i in items if not i["filename"].endswith(".mp4")}
    reference = reference_vectors(items, platform, tmp_path)
    for item_id, vector in vectors.items():
        assert len(vector) == feature_set["size"] == adapter.clip.dim
        assert float(np.dot(vector, reference[item_id])) >= 0.999

def test_embed_dataset_fans_out_into_executions_that_cover_every_item_once(platform, images, tmp_path):
    """dtlpy splits the dataset into id ranges of at most `predict_embed_subset_limit` items, one
    execution each (models.embed), and waits for them; the fake runs each on a fresh replica."""
    dataset, items = images
    model = make_model(platform, dataset, configuration={"predict_embed_subset_limit": 2},
                       service_ids=("service-1",))
    platform.execution_runner = replica_runner(platform)
    adapter = ClipAdapter(model_entity=model)
    adapter.embed_dataset(dl.datasets.get(dataset_id=dataset["id"]))

    assert_fanned_out(platform, "embed_dataset")
    (feature_set,) = platform.feature_sets.values()
    assert feature_set["size"] == adapter.clip.dim
    embeddable = {i["id"] for i in items if not i["filename"].endswith(".mp4")}
    assert_vectors_match_reference(platform, feature_set["id"], items, embeddable, tmp_path)


def test_embed_dataset_small_enough_runs_in_place(platform, images):
    dataset, items = images
    model = make_model(platform, dataset)
    ClipAdapter(model_entity=model).embed_dataset(dl.datasets.get(dataset_id=dataset["id"]),
                                                  filters={"filter": {"dir": "/photos"}})
    assert platform.executions == {}
    (feature_set,) = platform.feature_sets.values()
    assert set(platform.vectors_of(feature_set["id"])) == {i["id"] for i in items[:4]}


# ---- predict_items / predict_dataset ---------------------------------------------------------------
LABELS = ["red square", "green circle", "blue sky"]


def assert_model_predictions(platform, model, item_ids, others):
    for item_id in item_ids:
        (annotation,) = platform.item_annotations(item_id)
        assert annotation["type"] == "class" and annotation["label"] in LABELS
        assert annotation["metadata"]["system"]["model"]["name"] == model.name
        assert annotation["metadata"]["system"]["model"]["model_id"] == model.id
        assert 0 < annotation["metadata"]["user"]["model"]["confidence"] <= 1
    for item_id in others:
        assert platform.item_annotations(item_id) == []


def test_predict_items_puts_model_annotations_on_each_image(platform, images):
    dataset, items = images
    model = make_model(platform, dataset, labels=LABELS, output_type="class")
    adapter = ClipAdapter(model_entity=model)
    adapter.predict_items([dl.items.get(item_id=i["id"]) for i in items])
    assert_model_predictions(platform, model, [i["id"] for i in items[:4]], [i["id"] for i in items[4:]])

    adapter.predict_items([dl.items.get(item_id=i["id"]) for i in items[:2]])  # again: replaced, not added
    assert_model_predictions(platform, model, [i["id"] for i in items[:4]], [i["id"] for i in items[4:]])


def test_predict_dataset_fans_out_and_labels_every_image(platform, images):
    dataset, items = images
    model = make_model(platform, dataset, labels=LABELS, output_type="class",
                       configuration={"predict_embed_subset_limit": 2}, service_ids=("service-1",))
    platform.execution_runner = replica_runner(platform)
    ClipAdapter(model_entity=model).predict_dataset(dl.datasets.get(dataset_id=dataset["id"]))
    assert_fanned_out(platform, "predict_dataset")
    assert_model_predictions(platform, model, [i["id"] for i in items[:4]], [i["id"] for i in items[4:]])


# ---- train_model -----------------------------------------------------------------------------------
WORDS = ("red", "green", "blue", "round", "square", "large", "small", "striped")


def caption_dataset(platform, project, n_train=16, n_val=6):
    """Images in one dataset; prompt items pointing at them, captioned, tagged train/validation, in another."""
    images = platform.add_dataset(project["id"], "caption-images")
    prompts = platform.add_dataset(project["id"], "caption-prompts")
    for i in range(n_train + n_val):
        image = platform.add_item(images["id"], f"/img/{i:03d}.png", png_bytes(100 + i), "image/png")
        caption = f"picture {i}: {WORDS[i % 8]} {WORDS[(i // 8) % 8]}"
        platform.add_prompt_item(prompts["id"], f"/prompts/{i:03d}.json", image["id"], caption,
                                 subset="train" if i < n_train else "validation")
    return prompts


def test_train_model_prepares_trains_uploads_and_reports(platform, project):
    """dtlpy's train_model: status -> load_from_model -> prepare_data (export download) ->
    convert_from_dtlpy (prompt images) -> train -> save_to_model -> status 'trained'."""
    dataset = caption_dataset(platform, project)
    model = make_model(platform, dataset, configuration={
        "batch_size": 8, "num_epochs": 2, "learning_rate": 1e-3, "warmup_ratio": 0.0},
        subsets={"train": platform.subset_filter("train"), "validation": platform.subset_filter("validation")})
    progress = []

    class Progress:  # what the agent passes train_model
        def update(self, **kwargs):
            progress.append(kwargs)

    adapter = ClipAdapter()
    adapter.train_model(model, progress=Progress())

    stored = platform.models[model.id]
    assert stored["status"] == "trained"
    assert [log["status"] for log in stored["statusLogs"]] == ["training", "trained"]
    assert [p["progress"] for p in progress if "progress" in p][:2] == [50, 100]  # per epoch, from our callback
    files = platform.artifact_files(model.id)  # what dtlpy lists: `<model folder>/*`, no subfolders
    assert {"model.safetensors", "clip_config.json", "training_report.json", "training_report.md",
            "training_curves.png", "training_metrics.jsonl", "training_resume.zip"} <= set(files)
    assert not [f for f in files if "/" in f]
    assert not [i for i in platform.items.values() if f"/{model.name}/training/" in i["filename"]]  # none unlisted
    with zipfile.ZipFile(io.BytesIO(files["training_resume.zip"])) as bundle:  # finished: no duplicate weights
        assert bundle.namelist() == ["resume.json"] and json.loads(bundle.read("resume.json"))["resumable"] is False
    report = json.loads(files["training_report.json"])
    assert report["data"]["train_pairs"] == 16 and report["data"]["validation_pairs"] == 6
    assert report["training"]["best_epoch"] >= 1
    assert sorted({(m["figure"], m["legend"]) for m in platform.metrics if m["modelId"] == model.id}) == [
        ("loss", "train"), ("loss", "validation"), ("mean recall", "validation"),
        ("recall@1", "image->text"), ("recall@1", "text->image")]
    assert [x for x, _ in platform.metric_points(model.id, "loss", "train")] == [1, 2]  # one point per epoch
    assert [x for x, _ in platform.metric_points(model.id, "mean recall", "validation")] == [1, 2]

    trained = ClipAdapter(model_entity=dl.models.get(model_id=model.id))
    assert trained.clip.fingerprint == adapter.clip.fingerprint != load_model("tiny", device="cpu").fingerprint
    probe = [dl.items.get(item_id=i["id"]) for i in platform.items.values() if i["filename"] == "/img/000.png"]
    np.testing.assert_allclose(trained.embed(probe), adapter.embed(probe), atol=1e-6)
