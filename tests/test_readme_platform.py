"""Issue 17 (8): the README's SDK steps for a Dataloop user, as printed there, against the fake platform.

The code block of the README's "On Dataloop" section runs unmodified (read from README.md): install from
the app registry, deploy, embed a dataset, fine-tune a clone on a prompt-item dataset's train and
validation subsets (made by utils/prepare_dataset.py, as the README says), evaluate both models, deploy
and embed with the fine-tuned one. Only the server is fake (tests/fake_dataloop); dtlpy runs unmodified
and the fake runs each execution with the real ClipAdapter, as the model's service would. The one change:
the published app's models load `tiny` (no weights can be downloaded here) on the torch engine.
"""
from __future__ import annotations

import json
import re

import dtlpy as dl
import pytest

from adapters.clip_adapter import ClipAdapter
from conftest import ROOT
from test_platform_contract import WORDS, png_bytes, replica_runner

SECTION = "## On Dataloop: install, deploy, embed, search, fine-tune, evaluate"


def readme_sdk_code() -> str:
    section = (ROOT / "README.md").read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


def service_runner(platform):
    """The app's model service: train_model and evaluate_model on a fresh adapter (the agent builds it
    from the model), the dataset functions as in the contract tests."""
    dataset_functions = replica_runner(platform)

    def run(execution: dict) -> None:
        model = dl.models.get(model_id=execution["modelId"])
        if execution["functionName"] == "train_model":
            ClipAdapter().train_model(model)
        elif execution["functionName"] == "evaluate_model":
            inputs = execution["input"]
            ClipAdapter().evaluate_model(model, dl.datasets.get(dataset_id=inputs["dataset"]["dataset_id"]),
                                         filters=inputs["filters"])
        else:
            dataset_functions(execution)
    return run


@pytest.fixture
def users_project(platform):
    """'My Project' with an image dataset 'My images' (captions in descriptions, no ML subsets), and the app
    published (this repository's dataloop.json, its models on `tiny`)."""
    project = platform.add_project("My Project")
    images = platform.add_dataset(project["id"], "My images")
    for i in range(10):
        platform.add_item(images["id"], f"/trip/{i:02d}.png", png_bytes(900 + i), "image/png",
                          description=f"a {WORDS[i % 8]} {WORDS[(i + 3) % 8]} photo")
    manifest = json.loads((ROOT / "dataloop.json").read_text())
    for model in manifest["components"]["models"]:
        model["configuration"].update({"model_name": "tiny", "engine": "torch", "batch_size": 8})
    platform.add_dpk(manifest)
    platform.execution_runner = service_runner(platform)
    return project, images


def test_the_readmes_dataloop_steps_run_as_printed(platform, users_project):
    from utils.prepare_dataset import main as prepare_dataset

    project, images = users_project
    assert prepare_dataset(["--project", "My Project", "--dataset", "My images", "--val", "0.2"]) == 0
    exec(compile(readme_sdk_code(), "README.md", "exec"), {})  # noqa: S102 - the README's own lines

    models = {m["name"]: m for m in platform.models.values()}
    tuned = models["my-clip"]
    assert tuned["status"] in ("deployed", "trained")
    finished = [e for e in platform.executions.values() if e["latestStatus"]["status"] == "success"]
    assert {(e["functionName"], platform.models[e["modelId"]]["name"]) for e in finished} >= {
        ("train_model", "my-clip"), ("evaluate_model", "my-clip"), ("evaluate_model", "openai-clip")}
    report = json.loads(platform.artifact_files(tuned["id"])["training_report.json"])
    assert report["data"]["train_pairs"] == 8 and report["data"]["validation_pairs"] == 2
    embedded = {f["name"]: set(platform.vectors_of(f["id"])) for f in platform.feature_sets.values()}
    image_ids = {i["id"] for i in platform.dataset_items(images["id"])}
    assert embedded["openai-clip"] == image_ids and embedded["my-clip"] == image_ids
