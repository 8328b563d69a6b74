"""Dataloop's own CLIP tutorial (dtlpy-documentation notebooks/notebooks/clip_tutorial.md), end to end on
the fake platform, with this repository's dataloop.json published as the app: its names (dpk
`clip-model-pretrained`, model `openai-clip`), its configuration (`early_stopping`), `output_type =
"text"`, and its steps: install, configure and clone the base model, train, deploy, embed datasets.

Each step is the tutorial's own dtlpy call, run unmodified; the fake runs the executions those calls
start (train_model, embed_dataset) with the real ClipAdapter, as the model's service would. Only two
things differ from the notebook: the architecture is `tiny` (no weights can be downloaded here), and
2 epochs instead of 10 and the torch engine (test time); the dataset stands for "Mars Surface Images with Captions": images
whose description is the caption, split into ML subsets.
"""
from __future__ import annotations

import json
import random
import string
from pathlib import Path

import dtlpy as dl
import numpy as np
import pytest

from adapters.clip_adapter import ClipAdapter
from test_platform_contract import WORDS, png_bytes, replica_runner

ROOT = Path(__file__).resolve().parents[1]


def service_runner(platform):
    """The deployed app's services: train_model on a fresh adapter (the agent builds it from the model),
    embed_dataset / embed_items as in the contract tests."""
    dataset_functions = replica_runner(platform)

    def run(execution: dict) -> None:
        if execution["functionName"] == "train_model":
            model = dl.models.get(model_id=execution["modelId"])
            ClipAdapter().train_model(model)
        else:
            dataset_functions(execution)
    return run


@pytest.fixture
def captioned_dataset(platform):
    """The tutorial's dataset: images with a description each, split 80/20 into train/validation."""
    project = platform.add_project("tester-clip-tutorial")
    # "Since model training requires labels, we create a dummy label for the recipe" (the tutorial)
    dataset = platform.add_dataset(project["id"], "Mars Surface Images with Captions", labels=("free-text",))
    for i in range(15):
        subset = "train" if i < 12 else "validation"
        platform.add_item(dataset["id"], f"/items/{i:03d}.png", png_bytes(700 + i), "image/png",
                          description=f"mars surface {i}: {WORDS[i % 8]} {WORDS[(i // 8) % 8]} rocks",
                          metadata={"system": {"tags": {subset: True}}})
    platform.add_dpk(json.loads((ROOT / "dataloop.json").read_text()))  # this app, as published
    platform.execution_runner = service_runner(platform)
    return dl.projects.get(project_id=project["id"]), dl.datasets.get(dataset_id=dataset["id"])


def test_dataloops_clip_tutorial_installs_trains_deploys_and_embeds(platform, captioned_dataset):
    project, dataset = captioned_dataset

    # 4.1 Install CLIP Model Package (DPK)
    clip_model_dpk = dl.dpks.get(dpk_name="clip-model-pretrained")
    model_app = project.apps.install(app_name=clip_model_dpk.display_name, dpk=clip_model_dpk,
                                     custom_installation=clip_model_dpk.to_json())
    assert model_app.name == "OpenAI CLIP"

    # 4.2 Configure and Clone Pretrained CLIP Model
    base_model = project.models.get(model_name="openai-clip")
    train_filters = dl.Filters(field="metadata.system.tags.train", values=True)
    val_filters = dl.Filters(field="metadata.system.tags.validation", values=True)
    base_model.add_subset(subset_name="train", subset_filter=train_filters)
    base_model.add_subset(subset_name="validation", subset_filter=val_filters)
    base_model.configuration = {
        "model_name": "tiny",           # the tutorial: "ViT-B/32"
        "embeddings_size": 512,         # the tutorial's value for ViT-B/32: the adapter corrects it for tiny
        "num_epochs": 2,                # the tutorial: 10
        "batch_size": 64,
        "learning_rate": 5e-6,
        "early_stopping": True,         # the earlier adapter's key, as the tutorial writes it
        "early_stopping_epochs": 3,
        "weight_decay": 0.01,
        "engine": "torch",              # not the tutorial's: `auto` would export and time ONNX per trained
    }                                   # model (test time; test_platform_contract covers auto)
    base_model.output_type = "text"
    base_model.update(system_metadata=True)

    # 4.3 Train the Model
    finetuned_model_name = base_model.name + "-finetuned-" + "".join(
        random.choices(string.ascii_lowercase + string.digits, k=4))
    finetuned_model = base_model.clone(model_name=finetuned_model_name, dataset=dataset)
    execution = finetuned_model.train()

    # 4.4 Monitor Training Progress
    execution_status = dl.executions.get(execution_id=execution.id).get_latest_status().get("status")
    assert execution_status == dl.ExecutionStatus.SUCCESS, platform.executions[execution.id]["latestStatus"]
    finetuned_model = project.models.get(model_id=finetuned_model.id)
    assert finetuned_model.status == "trained" and finetuned_model.output_type == "text"
    files = platform.artifact_files(finetuned_model.id)
    report = json.loads(files["training_report.json"])
    assert report["data"]["train_pairs"] == 12 and report["data"]["validation_pairs"] == 3
    saved = json.loads(files["clip_config.json"])["config"]
    assert saved["early_stop"] is True and saved["early_stopping_epochs"] == 3  # the tutorial's keys, read
    assert saved["learning_rate"] == 5e-6 and saved["weight_decay"] == 0.01
    assert platform.models[base_model.id]["status"] == "pre-trained"  # the base model is left alone

    # 4.5 Deploy the Fine-Tuned Model
    service = finetuned_model.deploy()
    finetuned_model = project.models.get(model_id=finetuned_model.id)
    assert finetuned_model.status == dl.ModelStatus.DEPLOYED
    assert finetuned_model.metadata["system"]["deploy"]["services"] == [service.id]

    # 4.6 Embed Datasets using the Fine-Tuned Model
    dataset_to_embed = project.datasets.get(dataset_name="Mars Surface Images with Captions")
    embedding_execution = finetuned_model.embed_datasets(dataset_ids=[dataset_to_embed.id])
    assert embedding_execution.id and embedding_execution.status == "success"

    (feature_set,) = [f for f in platform.feature_sets.values() if f["modelId"] == finetuned_model.id]
    assert feature_set["name"] == finetuned_model.name
    vectors = platform.vectors_of(feature_set["id"])
    assert set(vectors) == {i["id"] for i in platform.dataset_items(dataset.id)}
    trained = ClipAdapter(model_entity=dl.models.get(model_id=finetuned_model.id))  # what the service loaded
    assert feature_set["size"] == trained.clip.dim != 512
    probe = dl.items.get(item_id=next(iter(vectors)))
    np.testing.assert_allclose(vectors[probe.id], trained.embed([probe])[0], atol=1e-5)
