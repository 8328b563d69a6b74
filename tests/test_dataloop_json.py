"""dataloop.json: parses as a real dtlpy DPK, declares the hooks, and each model's configuration is right."""
import copy
import inspect
import json
from pathlib import Path

import dtlpy as dl
import open_clip
import pytest
from dtlpy.ml.base_model_adapter import PREDICT_EMBED_DEFAULT_TIMEOUT

from adapters.clip.config import ClipConfig
from adapters.clip.models import OPENAI_MODELS, parse_model_spec
from adapters.clip_adapter import ClipAdapter

MANIFEST = json.loads((Path(__file__).parents[1] / "dataloop.json").read_text())


def test_parses_with_dtlpy():
    dpk = dl.Dpk.from_json(copy.deepcopy(MANIFEST), client_api=dl.client_api)  # it fills in defaults
    assert dpk.name == "clip-model-pretrained"
    assert len(dpk.components.models) == len(OPENAI_MODELS)


# The earlier CLIP app, dataloop-ai-apps/clip-model-adapter dataloop.json (1.0.7, read through the
# search tool): what marketplace apps and Dataloop's CLIP tutorial look up by name.
EARLIER_APP = {"name": "clip-model-pretrained", "displayName": "OpenAI CLIP", "module": "clip-module",
               "className": "ClipAdapter", "model": "openai-clip", "computeConfigs": {"clip-cpu", "clip-train"}}
EARLIER_FUNCTIONS = {  # name -> ([(input name, type)], [(output name, type)])
    "train_model": ([("model", "Model")], [("model", "Model")]),
    "embed_items": ([("items", "Item[]")], [("items", "Item[]"), ("json", "Json")]),
    "embed_dataset": ([("dataset", "Dataset"), ("filters", "Json")], []),
}


def test_it_is_the_next_version_of_the_earlier_clip_app():
    """clip-smart-search (features/extract_features.py) gets dpk `clip-model-pretrained`, the app by
    its displayName, and clones model `openai-clip` or the dpk's first model (moduleName
    `clip-module`, outputType `embedding`); `dl.models.create(dpk_model_name=...)` fails on a name
    the dpk does not have."""
    assert MANIFEST["name"] == EARLIER_APP["name"] and MANIFEST["displayName"] == EARLIER_APP["displayName"]
    assert [m["name"] for m in MANIFEST["components"]["modules"]] == [EARLIER_APP["module"]]
    assert MODULE["className"] == EARLIER_APP["className"]
    first = MANIFEST["components"]["models"][0]
    assert first["name"] == EARLIER_APP["model"] and first["configuration"]["model_name"] == "ViT-B/32"
    assert first["moduleName"] == EARLIER_APP["module"] and first["outputType"] == "embedding"
    assert EARLIER_APP["computeConfigs"] <= set(CONFIGS)
    names = [m["name"] for m in MANIFEST["components"]["models"]]
    assert len(set(names)) == len(names)
    assert all(name == "openai-clip" or name.startswith("openai-clip-") for name in names)


@pytest.mark.parametrize("name", sorted(EARLIER_FUNCTIONS))
def test_the_earlier_apps_functions_keep_their_inputs_and_outputs(name):
    inputs, outputs = EARLIER_FUNCTIONS[name]
    assert [(i["name"], i["type"]) for i in FUNCTIONS[name]["input"]] == inputs
    assert [(o["name"], o["type"]) for o in FUNCTIONS[name]["output"]] == outputs


MODULE = MANIFEST["components"]["modules"][0]
FUNCTIONS = {f["name"]: f for f in MODULE["functions"]}
CONFIGS = {c["name"]: c for c in MANIFEST["components"]["computeConfigs"]}
# Every flow dtlpy's BaseModelAdapter offers a model service (each carries dtlpy's own declaration).
MODEL_FLOWS = ["embed_items", "embed_dataset", "predict_items", "predict_dataset", "train_model", "evaluate_model"]
DATASET_LEVEL = ["embed_dataset", "predict_dataset"]  # the fan-out: a parent waits for its subsets
ITEM_LEVEL = ["embed_items", "predict_items"]         # what a query typed in the UI calls


def config_of(function: str) -> dict:
    return CONFIGS[FUNCTIONS[function].get("computeConfig", MODULE["computeConfig"])]


def test_module_points_at_the_adapter_with_model_entity_init_input():
    assert (Path(__file__).parents[1] / MODULE["entryPoint"]).is_file()
    assert MODULE["className"] == "ClipAdapter"
    assert MODULE["initInputs"] == [{"type": "Model", "name": "model_entity"}]
    assert sorted(FUNCTIONS) == sorted(MODEL_FLOWS)


@pytest.mark.parametrize("name", MODEL_FLOWS)
def test_each_function_takes_the_inputs_dtlpy_declares_for_it(name):
    """The platform passes inputs by name to dtlpy's method; dtlpy's decorator says which."""
    declared = getattr(dl.BaseModelAdapter, name).__dtlpy__
    ours = FUNCTIONS[name]
    assert [(i["name"], i["type"]) for i in ours["input"]] == [(i["name"], i["type"]) for i in declared["input"]]
    assert set(i["name"] for i in ours["input"]) <= set(inspect.signature(getattr(ClipAdapter, name)).parameters)
    # Outputs as the marketplace apps write them: dtlpy's, except embed_items' vectors port, which
    # the earlier CLIP app and the DINOv2 app both call `json` (Json), where dtlpy says `features` (Json[]).
    outputs = [(o["name"], o["type"]) for o in ours["output"]]
    expected = [(o["name"], o["type"]) for o in declared["output"]]
    if name == "embed_items":
        expected = [("items", "Item[]"), ("json", "Json")]
    assert outputs == expected
    assert ours["displayName"] and ours["description"]


def test_a_dataset_parent_outlives_dtlpys_wait_for_its_subsets_without_holding_the_only_slot():
    """dtlpy's _execute_dataset_operation splits a dataset into executions of
    predict_embed_subset_limit items and waits for them up to predict_embed_timeout (24 h).
    The parent runs on the dataset functions' config; dtlpy posts the subset executions to the
    model's first deployed service (the module's config), so that one must outlive the wait too."""
    waits = [PREDICT_EMBED_DEFAULT_TIMEOUT] + [m["configuration"].get("predict_embed_timeout", 0)
                                               for m in MANIFEST["components"]["models"]]
    may_run_a_parent = {config_of(name)["name"] for name in DATASET_LEVEL} | {MODULE["computeConfig"]}
    for name in may_run_a_parent:
        config = CONFIGS[name]
        assert config["executionTimeout"] >= max(waits) + 3600, name  # the wait, plus the parent's own subset
        assert config["runtime"]["concurrency"] >= 2, name  # a waiting parent leaves room for its subsets
        assert config["runtime"]["autoscaler"]["maxReplicas"] >= 2, name
        assert "gpu" not in config["runtime"]["podType"], name


def test_interactive_calls_do_not_queue_behind_a_dataset_job():
    dataset_configs = {config_of(name)["name"] for name in DATASET_LEVEL}
    for name in ITEM_LEVEL:
        config = config_of(name)
        assert config["name"] not in dataset_configs, name
        assert config["runtime"]["concurrency"] >= 10, name  # as the earlier CLIP app's search service
        assert "gpu" not in config["runtime"]["podType"], name


def test_training_and_evaluation_run_on_a_gpu_for_a_day_or_more():
    for name in ("train_model", "evaluate_model"):
        config = config_of(name)
        assert "gpu" in config["runtime"]["podType"], name
        # evaluate_model predicts over the whole dataset in its own execution before scoring it.
        assert config["executionTimeout"] >= PREDICT_EMBED_DEFAULT_TIMEOUT, name
        assert config["runtime"].get("preemptible") is False, name


def test_every_compute_config_autoscales_from_zero_on_the_queue():
    used = {config_of(name)["name"] for name in MODEL_FLOWS}
    assert used == set(CONFIGS)  # none declared for nothing
    for config in CONFIGS.values():
        assert config["runtime"]["autoscaler"]["type"] == "rabbitmq"
        assert config["runtime"]["autoscaler"]["minReplicas"] == 0


def test_marketplace_attributes_written_as_the_marketplace_apps_write_them():
    assert MANIFEST["scope"] == "public"
    attributes = MANIFEST["attributes"]
    assert attributes["Category"] == "Model" and attributes["Hub"] == "Dataloop"
    assert attributes["Provider"] == "Open AI" and attributes["Deployed By"] == "Dataloop"
    assert attributes["License"] == "MIT"
    assert set(attributes["Media Type"]) == {"Image", "Text", "Multi Modal"}


def test_default_model_is_vit_b32_first():
    assert MANIFEST["components"]["models"][0]["configuration"]["model_name"] == "ViT-B/32"


@pytest.mark.parametrize("model", MANIFEST["components"]["models"], ids=lambda m: m["name"])
def test_each_model_configuration_validates_and_has_the_real_embeddings_size(model):
    config = ClipConfig.from_dict(model["configuration"])
    arch = parse_model_spec(config.model_name).arch
    assert config.embeddings_size == open_clip.get_model_config(arch)["embed_dim"]
    assert model["outputType"] == "embedding" and model["moduleName"] == "clip-module"
