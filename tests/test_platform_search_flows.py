"""`search_dataset` on fresh fake platforms (tests/fake_dataloop; docs/platform-tests.md): a model with
no feature set or no vector of the dataset, a feature set of another size, the SDK's `service.execute`
on the model's service, a failed execution's message, and the same order and scores as the local
command line. tests/test_platform_search.py has the read-only cases on one shared dataset; a model
fine-tuned by `train_model` searching better with its own text tower: tests/test_platform_flows.py.

Only the network is fake: dtlpy's repositories, Filters and BaseModelAdapter flows run unmodified.
"""
from __future__ import annotations

import dtlpy as dl
import numpy as np
import pytest

from adapters.clip_adapter import ClipAdapter
from dataloop_fakes import manifest_runner, platform_model
from test_platform_contract import CONFIG
from test_platform_search import (QUERY, assert_same_ranking, embedded, numpy_ranking, one_line_failure,
                                  photo_dataset, results)


@pytest.fixture
def project(platform):
    return platform.add_project("clip-search-flows")


def test_a_model_without_a_feature_set_or_vectors_says_to_embed_the_dataset_first(platform, project):
    dataset = photo_dataset(platform, project, n=2)
    adapter = ClipAdapter(model_entity=platform_model(platform, CONFIG, dataset_id=dataset.id))
    message = one_line_failure(lambda: adapter.search_dataset(dataset, QUERY))
    assert "has no feature set yet: embed the dataset first: model.embed_datasets(dataset_ids=[" in message
    assert dataset.id in message and not platform.feature_sets  # asking did not create one

    other = photo_dataset(platform, project, n=2)
    adapter.embed_dataset(other)  # a feature set now, but with no vector of `dataset`
    message = one_line_failure(lambda: adapter.search_dataset(dataset, QUERY))
    assert f"has no vector of dataset {dataset.name!r}: embed the dataset first" in message


def test_a_feature_set_of_another_size_is_refused(platform, project):
    dataset = photo_dataset(platform, project, n=2)
    adapter = ClipAdapter(model_entity=platform_model(platform, CONFIG, dataset_id=dataset.id))
    model = adapter.model_entity
    model.project.feature_sets.create(name=model.name, size=adapter.clip.dim + 1, set_type=model.name,
                                      entity_type=dl.FeatureEntityType.ITEM, model_id=model.id)
    message = one_line_failure(lambda: adapter.search_dataset(dataset, QUERY))
    assert f"holds {adapter.clip.dim + 1}-d vectors but model {model.name!r} makes {adapter.clip.dim}-d ones" in message


# ---- the three ways to call it: the SDK on a deployed model (the panel: tests/js) ---------------------
def test_the_sdk_runs_search_dataset_on_the_models_deployed_service(platform, project):
    """README: `service.execute(function_name="search_dataset", execution_input={...})` on the model's
    service; the fake runs the execution with the function dataloop.json declares (dataloop_fakes)."""
    dataset = photo_dataset(platform, project, n=6)
    adapter = embedded(platform, dataset)
    service_record = platform.add_service(adapter.model_entity.id)
    platform.execution_runner = manifest_runner()

    model = dl.models.get(model_id=adapter.model_entity.id)
    service = dl.services.get(service_id=model.metadata["system"]["deploy"]["services"][0])
    execution = service.execute(function_name="search_dataset", project_id=model.project_id,
                                execution_input={"dataset": {"dataset_id": dataset.id}, "text": QUERY, "k": 4,
                                                 "filters": {"filter": {"dir": "/a"}}})
    execution.wait()
    execution = dl.executions.get(execution_id=execution.id)

    assert execution.latest_status["status"] == "success", execution.latest_status
    assert (execution.service_id, execution.function_name) == (service_record["id"], "search_dataset")
    in_a = {i["id"] for i in platform.dataset_items(dataset.id) if i["dir"] == "/a"}
    expected = numpy_ranking(platform, adapter, QUERY, in_a)[:4]
    assert_same_ranking(results(execution.output["json"]), expected)
    assert execution.output["items"] == [{"item_id": i} for i, _ in expected]


def test_a_failed_search_execution_carries_the_one_line_message(platform, project):
    dataset = photo_dataset(platform, project, n=2)
    model = platform_model(platform, CONFIG, dataset_id=dataset.id)  # never embedded
    service = dl.services.get(service_id=platform.add_service(model.id)["id"])
    platform.execution_runner = manifest_runner()
    execution = service.execute(function_name="search_dataset", project_id=model.project_id,
                                execution_input={"dataset": {"dataset_id": dataset.id}, "text": QUERY})
    status = dl.executions.get(execution_id=execution.id).latest_status
    assert status["status"] == "failed"
    assert status["message"].startswith("ClipAdapterFailure: CLIP adapter: model ")
    assert "embed the dataset first" in status["message"]


# ---- local parity ---------------------------------------------------------------------------------
def test_the_local_command_line_and_the_platform_give_the_same_order_and_scores(platform, project, tmp_path,
                                                                                   capsys):
    """The same images, the same model: `python -m adapters.clip index` + `search --json` locally, and
    `search_dataset` on the platform (both through vector_query's query embedding and cosine)."""
    import json

    from adapters.clip.cli import main as cli
    from test_platform_contract import png_bytes

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(8):
        (folder / f"p{i}.png").write_bytes(png_bytes(40 + i))
    dataset = platform.add_dataset(project["id"], "same-photos")
    for path in sorted(folder.iterdir()):
        platform.add_item(dataset["id"], f"/{path.name}", path.read_bytes(), "image/png")
    dataset = dl.datasets.get(dataset_id=dataset["id"])
    adapter = embedded(platform, dataset)

    store = str(tmp_path / "store")
    assert cli(["index", str(folder), "--store", store, "--model", "tiny", "--engine", "torch", "--device", "cpu"]) == 0
    capsys.readouterr()
    for text in (QUERY, "green + round - striped"):
        assert cli(["search", text, "--store", store, "-k", "8", "--json", "--engine", "torch", "--device", "cpu"]) == 0
        local = [(hit["path"].rsplit("/", 1)[-1], hit["score"]) for hit in json.loads(capsys.readouterr().out)]
        _, output = adapter.search_dataset(dataset, text, k=8)
        remote = [(r["name"], r["score"]) for r in output["results"]]
        assert [name for name, _ in remote] == [name for name, _ in local]
        np.testing.assert_allclose([s for _, s in remote], [s for _, s in local], atol=1e-5)
