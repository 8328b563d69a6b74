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
from adapters.clip_adapter import DTLPY_KEYS, ClipAdapter

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
OWN_FUNCTIONS = ["search_dataset", "find_duplicates", "sample_diverse"]  # this app's, beyond dtlpy's model flows


def config_of(function: str) -> dict:
    return CONFIGS[FUNCTIONS[function].get("computeConfig", MODULE["computeConfig"])]


def test_module_points_at_the_adapter_with_model_entity_init_input():
    assert (Path(__file__).parents[1] / MODULE["entryPoint"]).is_file()
    assert MODULE["className"] == "ClipAdapter"
    assert MODULE["initInputs"] == [{"type": "Model", "name": "model_entity"}]
    assert sorted(FUNCTIONS) == sorted(MODEL_FLOWS + OWN_FUNCTIONS)


# The app's own functions (issue 15): name -> ([(input, type)], [(output, type)]); the platform passes
# the inputs by name to ClipAdapter's method of the same name.
APP_FUNCTIONS = {
    "find_duplicates": ([("dataset", "Dataset"), ("filters", "Json"), ("threshold", "Float")], [("json", "Json")]),
    "sample_diverse": ([("dataset", "Dataset"), ("n", "Integer"), ("filters", "Json"), ("exclude", "Json")],
                       [("items", "Item[]"), ("json", "Json")]),
}


@pytest.mark.parametrize("name", sorted(APP_FUNCTIONS))
def test_the_apps_own_functions_take_their_inputs_by_the_adapters_parameter_names(name):
    inputs, outputs = APP_FUNCTIONS[name]
    ours = FUNCTIONS[name]
    assert [(i["name"], i["type"]) for i in ours["input"]] == inputs
    assert [(o["name"], o["type"]) for o in ours["output"]] == outputs
    parameters = inspect.signature(getattr(ClipAdapter, name)).parameters
    assert [i for i, _ in inputs] == [p for p in parameters if p != "self"]
    assert ours["displayName"] and ours["description"]


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


def test_search_dataset_is_declared_with_the_adapters_parameters_on_the_interactive_config():
    """Issue 13: the dataset browser's panel runs it while a user waits, like embed_items."""
    declared = FUNCTIONS["search_dataset"]
    assert [(i["name"], i["type"]) for i in declared["input"]] == [
        ("dataset", "Dataset"), ("text", "String"), ("k", "Integer"), ("filters", "Json")]
    assert [(o["name"], o["type"]) for o in declared["output"]] == [("items", "Item[]"), ("json", "Json")]
    parameters = list(inspect.signature(ClipAdapter.search_dataset).parameters)[1:]
    assert parameters == [i["name"] for i in declared["input"]]
    assert config_of("search_dataset") == config_of("embed_items")
    assert declared["displayName"] and declared["description"]


# ---- compute configs by call length (docs/platform.md) ------------------------------------
INTERACTIVE, DATASET, TRAINING = "interactive", "dataset", "training"
# Every function the manifest declares, by how long a call may take. A function missing here fails
# test_every_function_has_a_call_length: add it with its class (its config is then checked).
CALL_LENGTH = {
    "embed_items": INTERACTIVE, "predict_items": INTERACTIVE, "search_dataset": INTERACTIVE,
    "embed_dataset": DATASET, "predict_dataset": DATASET, "find_duplicates": DATASET, "sample_diverse": DATASET,
    "train_model": TRAINING, "evaluate_model": TRAINING,
}
# Seconds per item of one execution slot on a regular-m replica with all 10 slots busy: 4 vCPUs at
# the lighter-load rate of docs/platform.md (bench/embed_bench.py: 12.1 img/s on 2 cores) shared by
# 10 executions. A subset must finish within the interactive timeout with this margin.
SECONDS_PER_ITEM_PER_SLOT, SUBSET_MARGIN = 10 / (2 * 12.1), 4


def test_every_function_has_a_call_length():
    assert set(FUNCTIONS) <= set(CALL_LENGTH), f"add {sorted(set(FUNCTIONS) - set(CALL_LENGTH))} to CALL_LENGTH"


def dataset_waits() -> list[int]:
    """How long dtlpy's _execute_dataset_operation waits for a dataset's subsets (default and per model)."""
    return [PREDICT_EMBED_DEFAULT_TIMEOUT] + [m["configuration"].get("predict_embed_timeout", 0)
                                              for m in MANIFEST["components"]["models"]]


def check_interactive(config: dict) -> None:
    """A few items: minutes at most (the earlier app: executionTimeout 60 s, drainTime 10 s; measured
    here, bench/interactive_bench.py: 16 photos in 13 s on the loaded 2-core machine), a drain that
    does not hold a pod for long, a killed call run again (embedding is idempotent), 10 slots."""
    assert 60 <= config["executionTimeout"] <= 15 * 60
    assert config["drainTime"] <= 60
    assert config.get("onReset") == "rerun"
    assert config["runtime"]["concurrency"] >= 10  # clip-smart-search's embed_items service; test_concurrency.py
    assert "gpu" not in config["runtime"]["podType"]


def check_dataset(config: dict) -> None:
    """A dataset parent waits for its subsets (24 h by default), then needs its own time; it holds
    one slot of several while it waits."""
    assert config["executionTimeout"] >= max(dataset_waits()) + 3600
    assert config["runtime"]["concurrency"] >= 2
    assert config["runtime"]["autoscaler"]["maxReplicas"] >= 2
    assert "gpu" not in config["runtime"]["podType"]


def check_training(config: dict) -> None:
    """evaluate_model predicts over the whole dataset in its own execution before scoring it."""
    assert "gpu" in config["runtime"]["podType"]
    assert config["executionTimeout"] >= PREDICT_EMBED_DEFAULT_TIMEOUT
    assert config["runtime"].get("preemptible") is False


CHECKS = {INTERACTIVE: check_interactive, DATASET: check_dataset, TRAINING: check_training}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_each_function_runs_on_a_config_for_its_call_length(name):
    CHECKS[CALL_LENGTH[name]](config_of(name))


def test_no_config_serves_two_call_lengths():
    """An interactive call never queues behind a dataset job or a training on the same config."""
    classes: dict[str, set] = {}
    for name in FUNCTIONS:
        classes.setdefault(config_of(name)["name"], set()).add(CALL_LENGTH[name])
    assert all(len(found) == 1 for found in classes.values()), classes


def test_the_model_service_is_the_interactive_config_and_a_subset_fits_its_timeout():
    """`model.embed(item_ids=...)` (clip-smart-search) and the subsets of a dataset fan-out are both
    posted to the model's first deployed service (dtlpy repositories/models.py: `config.serviceId =
    metadata.system.deploy.services[0]`), the module's config. So the module's config is the
    interactive one, and every model splits a dataset into subsets small enough for its timeout."""
    module_config = CONFIGS[MODULE["computeConfig"]]
    check_interactive(module_config)
    for model in MANIFEST["components"]["models"]:
        subset = model["configuration"]["predict_embed_subset_limit"]
        assert subset * SECONDS_PER_ITEM_PER_SLOT * SUBSET_MARGIN <= module_config["executionTimeout"], model["name"]


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
    config = ClipConfig.from_dict({k: v for k, v in model["configuration"].items() if k not in DTLPY_KEYS})
    arch = parse_model_spec(config.model_name).arch
    assert config.embeddings_size == open_clip.get_model_config(arch)["embed_dim"]
    assert model["outputType"] == "embedding" and model["moduleName"] == "clip-module"
