"""The adapter's fixes for issue 10, through dtlpy's own flows on the fake Dataloop platform
(tests/fake_dataloop, docs/platform-tests.md): training that survives a lost pod, evaluation of a
model without labels, the earlier adapter's models, prompt items made of an image only, and
utils/prepare_dataset.py end to end. tests/test_platform_contract.py covers the plain flows.

Only the network is fake; no dtlpy method is patched. Each test asserts what the flow left on the
platform (the fake's state).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import dtlpy as dl
import numpy as np
import pytest
import torch

from adapters.clip.models import load_model
from adapters.clip_adapter import ClipAdapter
from test_platform_contract import WORDS, caption_dataset, png_bytes

CONFIG = {"model_name": "tiny", "device": "cpu", "batch_size": 8, "num_workers": 0}


@pytest.fixture
def project(platform):
    return platform.add_project("clip-flows")


def make_model(platform, project, dataset=None, configuration=None, **kwargs) -> dl.Model:
    """A model on the platform (a name unique in the session: load_from_model downloads into
    $DATALOOP_PATH/models/<name>), trained on the dataset's train/validation ML subsets."""
    name = kwargs.pop("name", f"clip-tiny-{platform.new_id()[-8:]}")
    subsets = {s: platform.subset_filter(s) for s in ("train", "validation")} if dataset else None
    record = platform.add_model(project["id"], name, {**CONFIG, **(configuration or {})},
                                dataset_id=dataset["id"] if dataset else None, subsets=subsets, **kwargs)
    return dl.models.get(model_id=record["id"])


def new_pod(model: dl.Model, tmp_path: Path, name: str) -> None:
    """What a fresh pod starts from: no working folder of an earlier run ('tmp/<model id>' is relative
    to the working directory), no earlier download of the model's artifacts."""
    pod = tmp_path / name
    pod.mkdir()
    os.chdir(pod)
    shutil.rmtree(Path(os.environ["DATALOOP_PATH"]) / "models" / model.name, ignore_errors=True)


# ---- training survives a lost pod ------------------------------------------------------------------
class Evicted(Exception):
    """The pod goes away with an exception (a timeout, an error): dtlpy's train_model saves on failure."""


class EvictedAfterEpoch:
    """A dl.Progress as train_model's callback uses it; fails at the end of a given epoch (1-based)."""

    def __init__(self, epoch: int, how: type[BaseException]):
        self.message, self.how = f"finished epoch: {epoch - 1}/", how  # dtlpy's message counts from 0

    def update(self, progress=None, message=None, **kwargs):
        if message and message.startswith(self.message):
            raise self.how("pod evicted")


def resume_archive(files: dict[str, bytes]) -> dict:
    """What the model's training_resume.zip says: resumable, and the last finished epoch if it is."""
    with zipfile.ZipFile(io.BytesIO(files["training_resume.zip"])) as bundle:
        found = json.loads(bundle.read("resume.json"))
        if found["resumable"]:
            found["epoch"] = json.loads(bundle.read("last/state.json"))["epoch"]
    return found


RESUME_CONFIG = {"num_epochs": 3, "learning_rate": 1e-3, "warmup_ratio": 0.0, "early_stop": False}
_UNINTERRUPTED: dict[str, bytes] = {}


def uninterrupted_weights(platform, project, dataset, tmp_path) -> bytes:
    """What train_model uploads for RESUME_CONFIG on caption_dataset without interruption (run once)."""
    if "weights" not in _UNINTERRUPTED:
        whole = make_model(platform, project, dataset, RESUME_CONFIG)
        new_pod(whole, tmp_path, "pod-whole")
        ClipAdapter().train_model(whole)
        _UNINTERRUPTED["weights"] = platform.artifact_files(whole.id)["model.safetensors"]
    return _UNINTERRUPTED["weights"]


@pytest.mark.parametrize("death", ["exception", "killed outright"])
def test_train_model_that_died_mid_training_is_resumed_by_the_next_train_model(platform, project, tmp_path, death):
    """exception: dtlpy's train_model uploads output_path (our `save`) when train raises; killed outright
    (SystemExit stands for SIGKILL: dtlpy's `except Exception` never runs): only the resume state uploaded
    at each epoch's end (resume_upload_minutes) is there. Either way the next train_model of the model,
    on a new pod, continues from epoch 2 to the weights an uninterrupted run ends with, and the model
    has one metric point per epoch in all."""
    dataset = caption_dataset(platform, project)
    uninterrupted = uninterrupted_weights(platform, project, dataset, tmp_path)
    upload_minutes = 0 if death == "exception" else 1e-9  # killed outright: after every epoch
    model = make_model(platform, project, dataset, {**RESUME_CONFIG, "resume_upload_minutes": upload_minutes})
    new_pod(model, tmp_path, "pod-1")
    how = Evicted if death == "exception" else SystemExit
    with pytest.raises(how):
        ClipAdapter().train_model(model, progress=EvictedAfterEpoch(2, how))
    files = platform.artifact_files(model.id)  # what dtlpy lists (`<model folder>/*`) and load_from_model gets
    assert "model.safetensors" not in files  # the model keeps its starting weights (here: the named model)
    assert resume_archive(files) == {"resumable": True, "epoch": 2}
    assert [x for x, _ in platform.metric_points(model.id, "loss", "train")] == [1, 2]
    platform.models[model.id]["status"] = "failed"  # what the platform does with a failed execution

    new_pod(model, tmp_path, "pod-2")
    ClipAdapter().train_model(dl.models.get(model_id=model.id))  # dtlpy: "will attempt to resume"
    assert platform.models[model.id]["status"] == "trained"
    assert [x for x, _ in platform.metric_points(model.id, "loss", "train")] == [1, 2, 3]
    files = platform.artifact_files(model.id)
    assert files["model.safetensors"] == uninterrupted  # bit for bit what the uninterrupted run uploaded
    assert resume_archive(files) == {"resumable": False}
    assert json.loads(files["training_report.json"])["training"]["epochs_run"] == 3
    if death == "exception":
        return
    # Trained again later, the stale resume state in its artifacts is not taken up: a whole new run.
    new_pod(model, tmp_path, "pod-3")
    ClipAdapter().train_model(dl.models.get(model_id=model.id))
    assert [x for x, _ in platform.metric_points(model.id, "loss", "train")] == [1, 2, 3, 1, 2, 3]


# ---- evaluate_model ----------------------------------------------------------------------------------
EVAL_FIGURES = ("t2i_r1", "i2t_r1", "mean_recall")


def evaluation(platform, model, dataset, key: str) -> list:
    return [y for _, y in platform.metric_points(model.id, f"evaluation: {key}", dataset["name"])]


def test_evaluate_model_without_labels_predicts_nothing_and_plots_retrieval_metrics(platform, project, caplog):
    """evaluate_model predicts over the dataset first (overwrite_annotations defaults to true): a model
    without labels (every model in dataloop.json) must come through it, then be evaluated."""
    dataset = caption_dataset(platform, project, n_train=0, n_val=8)
    model = make_model(platform, project)
    annotations_before = len(platform.annotations)
    caplog.clear()
    with caplog.at_level("WARNING", logger="ModelAdapter"):  # dtlpy's adapter logger (the demo quietens it)
        ClipAdapter().evaluate_model(model, dl.datasets.get(dataset_id=dataset["id"]))

    assert len(platform.annotations) == annotations_before  # nothing predicted
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "no labels" in r.getMessage()]
    assert len(warned) == 1
    for key in EVAL_FIGURES:
        (value,) = evaluation(platform, model, dataset, key)
        assert 0.0 <= value <= 1.0
    assert evaluation(platform, model, dataset, "zero_shot_accuracy") == []  # no labels in the data


def test_evaluate_model_with_labels_never_scores_the_classes_it_just_predicted(platform, project):
    """With labels, the predict step writes zero-shot classes on the images; evaluation must not read
    them back as ground truth (zero-shot accuracy would be 100% by construction)."""
    dataset = platform.add_dataset(project["id"], "described-images")
    for i in range(6):
        platform.add_item(dataset["id"], f"/img/{i}.png", png_bytes(200 + i), "image/png",
                          description=f"picture {i}: {WORDS[i]}")
    model = make_model(platform, project, labels=["red", "green", "blue"], output_type="class")
    ClipAdapter().evaluate_model(model, dl.datasets.get(dataset_id=dataset["id"]))

    predicted = [a for a in platform.annotations.values() if a["type"] == "class"]
    assert len(predicted) == 6 and all(a["metadata"]["system"]["model"]["name"] == model.name for a in predicted)
    assert len(evaluation(platform, model, dataset, "mean_recall")) == 1
    assert evaluation(platform, model, dataset, "zero_shot_accuracy") == []


# ---- the earlier adapter's models ------------------------------------------------------------------
EARLIER_ADAPTER_CONFIGURATION = {  # what the earlier Dataloop CLIP adapter's models carry
    "model_name": "tiny", "batch_size": 128, "num_epochs": 100, "early_stopping": True, "early_stopping_epochs": 5,
    "betas": [0.9, 0.98], "episilon": 1e-6, "learning_rate": 5e-8, "weight_decay": 0.001,
    "weights_filename": "clip_weights.pt", "a_key_a_later_platform_adds": True, "device": "cpu",
}


def test_a_model_trained_by_the_earlier_adapter_loads_and_embeds(platform, project, tmp_path, caplog):
    """Its configuration (weights_filename, early_stopping, episilon, and any key the app does not know)
    never stops a deploy; its weights file, named by weights_filename, is what loads."""
    dataset = platform.add_dataset(project["id"], "photos")
    item = platform.add_item(dataset["id"], "/photos/p.png", png_bytes(7), "image/png")
    trained = load_model("tiny", device="cpu")
    with torch.no_grad():
        for parameter in trained.model.parameters():
            parameter.mul_(1.01)  # stands in for the earlier adapter's fine-tuning
    trained.forget_fingerprint()
    weights = tmp_path / "earlier" / "clip_weights.pt"
    weights.parent.mkdir()
    torch.save({"model_state_dict": trained.model.state_dict(), "epoch": 12}, weights)
    record = platform.add_model(project["id"], f"clip-earlier-{platform.new_id()[-8:]}",
                                EARLIER_ADAPTER_CONFIGURATION, dataset_id=dataset["id"], status="trained")
    dl.models.get(model_id=record["id"]).artifacts.upload(filepath=str(weights))  # as that adapter saved it

    caplog.clear()
    with caplog.at_level("WARNING", logger="ModelAdapter"):
        adapter = ClipAdapter(model_entity=dl.models.get(model_id=record["id"]))  # the service's load_from_model
    assert adapter.clip.fingerprint == trained.fingerprint
    assert adapter.settings.early_stop is True and adapter.settings.weights_filename == "clip_weights.pt"
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "'a_key_a_later_platform_adds'" in warned and "'episilon'" in warned
    _, vectors = adapter.embed_items([dl.items.get(item_id=item["id"])])
    (feature_set,) = platform.feature_sets.values()
    assert len(platform.vectors_of(feature_set["id"])[item["id"]]) == adapter.clip.dim == len(vectors[0])


# ---- prompt items ----------------------------------------------------------------------------------
def test_a_prompt_item_without_text_embeds_as_the_image_it_points_to(platform, project):
    """What utils/prepare_dataset.py makes: the prompt is an image (another item, by its stream URL)."""
    images = platform.add_dataset(project["id"], "images")
    prompts = platform.add_dataset(project["id"], "prompts")
    image = platform.add_item(images["id"], "/img/a.png", png_bytes(3), "image/png")
    prompt = platform.add_prompt_item(prompts["id"], "/prompts/a.json", image["id"], "a caption", subset="train")
    model = make_model(platform, project)
    adapter = ClipAdapter(model_entity=model)
    _, vectors = adapter.embed_items([dl.items.get(item_id=i["id"]) for i in (prompt, image)],
                                     upload_features=True)
    assert len(vectors) == 2 and len(vectors[0]) == adapter.clip.dim
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    (feature_set,) = platform.feature_sets.values()
    assert set(platform.vectors_of(feature_set["id"])) == {prompt["id"], image["id"]}


# ---- utils/prepare_dataset.py ----------------------------------------------------------------------
def test_prepare_dataset_makes_prompt_items_that_train_model_trains_on(platform, project):
    """Images in (folders are classes, ML subsets tagged); prompt items out, as the platform stores them:
    the image by its stream URL in the prompt JSON, the caption a free-text annotation of prompt '1', the
    subset kept. Then a model trains on them through train_model."""
    from utils.prepare_dataset import convert_dataset

    images = platform.add_dataset(project["id"], "shapes")
    sources = {}
    for i in range(12):
        folder = ("red_square", "green_circle", "blue_triangle")[i % 3]
        subset = "validation" if i >= 9 else "train"
        description = "a hand-written caption" if i == 0 else None
        item = platform.add_item(images["id"], f"/{folder}/{i:02d}.png", png_bytes(300 + i), "image/png",
                                 metadata={"system": {"tags": {subset: True}}}, description=description)
        sources[item["id"]] = (folder, subset, description)
    platform.add_item(images["id"], "/notes/readme.txt", b"not an image", "text/plain")

    target, problems = convert_dataset(dl.datasets.get(dataset_id=images["id"]), workers=4)
    assert [p.reason for p in problems] == ["not an image item"]
    prompts = platform.dataset_items(target.id)
    assert len(prompts) == 12
    for prompt in prompts:
        source_id = prompt["metadata"]["user"]["source_item_id"]
        folder, subset, description = sources[source_id]
        assert prompt["filename"] == f"/{folder}/{platform.items[source_id]['name'][:-4]}.json"
        assert prompt["metadata"]["system"]["shebang"]["dltype"] == "prompt"
        assert prompt["metadata"]["system"]["tags"][subset] is True
        assert prompt["metadata"]["user"]["label"] == folder
        document = json.loads(platform.binaries[prompt["id"]])
        assert document["prompts"]["1"][0]["value"] == platform.items[source_id]["stream"]
        (caption,) = platform.item_annotations(prompt["id"])
        assert caption["type"] == "text" and caption["label"] == "free-text"
        assert caption["metadata"]["system"]["promptId"] == "1"
        assert caption["coordinates"] == (description or f"a photo of a {folder.replace('_', ' ')}")

    model = make_model(platform, project, {"id": target.id},
                       {"num_epochs": 1, "learning_rate": 1e-3, "warmup_ratio": 0.0})
    ClipAdapter().train_model(model)
    report = json.loads(platform.artifact_files(model.id)["training_report.json"])
    assert report["data"]["train_pairs"] == 9 and report["data"]["validation_pairs"] == 3


# ---- the demo data through train_model then evaluate_model -----------------------------------------
def shapes_dataset(platform, project):
    """adapters/demo.py's shapes (a coloured shape in one corner, captioned) as the platform holds them:
    images in one dataset (under /shapes/<subset>/), captioned prompt items pointing at them in another,
    tagged train/validation. Returns the prompts' dataset, the images' and the validation (caption, image id)."""
    from adapters import demo

    images = platform.add_dataset(project["id"], "shape-images")
    prompts = platform.add_dataset(project["id"], "shape-prompts")
    rng = np.random.default_rng(1)
    validation = []
    for number, spec in enumerate(demo.scene_specs(seed=0)):
        buffer = io.BytesIO()
        demo.draw_shape(spec["colour"], spec["shape"], spec["corner"], rng).save(buffer, format="PNG")
        image = platform.add_item(images["id"], f"/shapes/{spec['subset']}/{number:04d}.png", buffer.getvalue(),
                                  "image/png")
        platform.add_prompt_item(prompts["id"], f"/shapes/{number:04d}.json", image["id"], spec["caption"],
                                 subset=spec["subset"])
        if spec["subset"] == "validation":
            validation.append((spec["caption"], image["id"]))
    return prompts, images, validation


def test_a_model_fine_tuned_by_train_model_beats_its_start_in_evaluate_model(platform, project):
    """The demo's story on the platform: evaluate_model on the validation subset, train_model, evaluate_model
    again; the model's metric plots hold the starting point, then a better one."""
    from adapters import demo

    dataset, images, validation_pairs = shapes_dataset(platform, project)
    configuration = {**demo.DEMO_CONFIG, "num_epochs": 12, "early_stop": False, "num_workers": 0}
    model = make_model(platform, project, dataset, configuration)
    validation = platform.subset_filter("validation")
    dl_dataset = dl.datasets.get(dataset_id=dataset["id"])
    ClipAdapter().evaluate_model(model, dl_dataset, filters=validation)
    ClipAdapter().train_model(dl.models.get(model_id=model.id))
    ClipAdapter().evaluate_model(dl.models.get(model_id=model.id), dl_dataset, filters=validation)

    start, tuned = evaluation(platform, model, dataset, "mean_recall")
    assert tuned > start + 0.1, (start, tuned)
    (start_r1, tuned_r1) = evaluation(platform, model, dataset, "t2i_r1")
    assert tuned_r1 > start_r1
    report = json.loads(platform.artifact_files(model.id)["training_report.json"])
    assert report["data"]["validation_pairs"] == 48

    # ... and where users search (issue 13): search_dataset, what the dataset browser's panel runs, over
    # the validation images with each validation caption: the fine-tuned model finds the captioned image
    # first more often than the model it started from, searching with its own text tower.
    tuned = ClipAdapter(model_entity=dl.models.get(model_id=model.id))
    start = ClipAdapter(model_entity=make_model(platform, project, dataset, configuration))  # never trained
    shapes = dl.datasets.get(dataset_id=images["id"])
    only_validation = {"filter": {"dir": "/shapes/validation"}}
    recall, first = {}, {}
    for name, adapter in (("start", start), ("tuned", tuned)):
        adapter.embed_dataset(shapes, filters=only_validation)
        outputs = [adapter.search_dataset(shapes, caption, k=1, filters=only_validation)[1]
                   for caption, _ in validation_pairs]
        recall[name] = np.mean([o["results"][0]["id"] == image for o, (_, image) in zip(outputs, validation_pairs)])
        first[name] = outputs[0]
    print(f"search_dataset text->image Recall@1 on the validation shapes: start {recall['start']:.1%}, "
          f"fine-tuned {recall['tuned']:.1%} (evaluate_model: {start_r1:.1%} -> {tuned_r1:.1%})")
    assert recall["tuned"] > recall["start"], recall
    assert recall["tuned"] == pytest.approx(tuned_r1, abs=0.05)  # the platform's search agrees with evaluate_model
    query = {n: np.asarray(first[n]["query"]["join"]["filter"]["value"]["$euclid"]["input"]) for n in first}
    assert float(query["tuned"] @ query["start"]) < 0.99  # its own (fine-tuned) text tower, not the starting one
    np.testing.assert_allclose(query["tuned"], tuned.embedder.embed_texts([validation_pairs[0][0]]).vectors[0],
                               atol=1e-5)


# ---- a feature set of the earlier adapter's (unnormalised) vectors ---------------------------------
def test_embedding_into_a_feature_set_of_the_earlier_adapter_re_embeds_its_old_vectors(platform, project, caplog):
    """The earlier adapter uploaded raw features into the feature set named after the model; updated in
    place, this one adds unit vectors to it. A look at the set before embedding finds the old ones:
    embed_items says once what that means; embed_dataset embeds every item with an old vector again (in
    any dataset), so the set holds no mixture a euclidean search would rank by norm."""
    photos = platform.add_dataset(project["id"], "photos")
    elsewhere = platform.add_dataset(project["id"], "elsewhere")
    items = [platform.add_item(photos["id"], f"/p{i}.png", png_bytes(400 + i), "image/png") for i in range(4)]
    items.append(platform.add_item(photos["id"], "/note.txt", b"a green circle", "text/plain"))
    other = platform.add_item(elsewhere["id"], "/o.png", png_bytes(410), "image/png")
    model = make_model(platform, project)
    dim = load_model("tiny", device="cpu").dim
    earlier = platform.add_feature_set(project["id"], model.name, dim, model_id=model.id)
    rng = np.random.default_rng(0)
    for item in [*items[:3], items[4], other]:  # what the earlier adapter left: raw features, norm ~ 8
        platform.add_feature(earlier["id"], item["id"], (rng.normal(size=dim) * 0.35).tolist())

    def norms() -> dict[str, float]:
        return {k: float(np.linalg.norm(v)) for k, v in platform.vectors_of(earlier["id"]).items()}

    warned = lambda: [r for r in caplog.records if "not unit length" in r.getMessage()]  # noqa: E731
    with caplog.at_level("WARNING", logger="ModelAdapter"):
        adapter = ClipAdapter(model_entity=dl.models.get(model_id=model.id))
        for item in items[3:5]:  # two calls, one look: said once
            adapter.embed_items([dl.items.get(item_id=item["id"])])
        assert len(warned()) == 1 and "embed_dataset" in warned()[0].getMessage()
        assert list(platform.feature_sets) == [earlier["id"]]  # the same set: found by the model's id
        assert sum(abs(n - 1) > 1e-3 for n in norms().values()) == 4  # embed_items re-embeds nothing else

        ClipAdapter(model_entity=dl.models.get(model_id=model.id)).embed_dataset(
            dl.datasets.get(dataset_id=photos["id"]))
    assert len(warned()) == 2
    assert set(norms()) == {i["id"] for i in [*items, other]}
    assert all(abs(n - 1) < 1e-4 for n in norms().values()), norms()  # the other dataset's item included
    assert "POST /features/vectors/query" in platform.requests
