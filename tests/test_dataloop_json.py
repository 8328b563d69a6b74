"""dataloop.json: parses as a real dtlpy DPK, declares the hooks, and each model's configuration is right."""
import json
from pathlib import Path

import dtlpy as dl
import open_clip
import pytest

from adapters.clip.config import ClipConfig
from adapters.clip.models import OPENAI_MODELS, parse_model_spec

MANIFEST = json.loads((Path(__file__).parents[1] / "dataloop.json").read_text())


def test_parses_with_dtlpy():
    dpk = dl.Dpk.from_json(MANIFEST, client_api=dl.client_api)
    assert dpk.name == "clip-model-adapter"
    assert len(dpk.components.models) == len(OPENAI_MODELS)


def test_module_points_at_the_adapter_with_model_entity_init_input():
    module = MANIFEST["components"]["modules"][0]
    assert (Path(__file__).parents[1] / module["entryPoint"]).is_file()
    assert module["className"] == "ClipAdapter"
    assert module["initInputs"] == [{"type": "Model", "name": "model_entity"}]
    names = {f["name"] for f in module["functions"]}
    assert {"train_model", "embed_items", "embed_dataset", "predict_items", "evaluate_model"} <= names


def test_compute_configs_cpu_for_embedding_gpu_for_training_with_autoscaling():
    configs = {c["name"]: c for c in MANIFEST["components"]["computeConfigs"]}
    module = MANIFEST["components"]["modules"][0]
    assert "gpu" not in configs[module["computeConfig"]]["runtime"]["podType"]
    train = next(f for f in module["functions"] if f["name"] == "train_model")
    assert "gpu" in configs[train["computeConfig"]]["runtime"]["podType"]
    for config in configs.values():
        assert config["runtime"]["autoscaler"]["type"] == "rabbitmq"


def test_default_model_is_vit_b32_first():
    assert MANIFEST["components"]["models"][0]["configuration"]["model_name"] == "ViT-B/32"


@pytest.mark.parametrize("model", MANIFEST["components"]["models"], ids=lambda m: m["name"])
def test_each_model_configuration_validates_and_has_the_real_embeddings_size(model):
    config = ClipConfig.from_dict(model["configuration"])
    arch = parse_model_spec(config.model_name).arch
    assert config.embeddings_size == open_clip.get_model_config(arch)["embed_dim"]
    assert model["outputType"] == "embedding" and model["moduleName"] == "clip-module"
