"""Real dtlpy entities for tests. Only the Dataloop server is faked, at the network:

- `platform_model`: a model created on the fake platform (tests/fake_dataloop) and fetched with
  `dl.models.get`; its `update()`, metrics and artifacts go over HTTP to the fake.
- `file_item`: a real dl.Item whose binary lives at a file:// URL, so `item.download()` really runs
  without any server.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import dtlpy as dl

from fake_dataloop import PlatformState


def platform_model(platform: PlatformState, configuration: dict, labels: Optional[list[str]] = None,
                   input_type: str = "image", output_type: str = "embedding", **fields) -> dl.Model:
    """A model on `platform` (in its first project, made if there is none), as dtlpy fetches it.

    Its name is unique in the session: load_from_model downloads into $DATALOOP_PATH/models/<name>,
    which outlives a test (and the adapter would load whatever an earlier model left there).
    `fields` go to `PlatformState.add_model` (dataset_id, subsets, service_ids, ...).

    The engine is torch unless the configuration says otherwise: these tests compare the adapter's
    vectors and metrics with the library's torch ones, and `auto` picks its engine by timing this
    machine (int8 vectors also move slightly with their batch). Engines: tests/test_engines.py, and
    test_platform_contract's default-engine test.
    """
    configuration = {"engine": "torch", **configuration}
    project = next(iter(platform.projects.values()), None) or platform.add_project()
    name = fields.pop("name", f"clip-test-{platform.new_id()[-8:]}")
    record = platform.add_model(project["id"], name, configuration, labels=labels, input_type=input_type,
                                output_type=output_type, **fields)
    return dl.models.get(model_id=record["id"])


def file_item(item_id: str, path: Path, mimetype: str, *, prompt: bool = False,
              description: Optional[str] = None) -> dl.Item:
    system = {"mimetype": mimetype, "shebang": {"linkInfo": {"type": "url", "ref": Path(path).resolve().as_uri()}}}
    if prompt:
        system["shebang"]["dltype"] = "prompt"
    if description is not None:
        system["description"] = description
    return dl.Item.from_json({"id": item_id, "name": os.path.basename(path), "filename": "/" + os.path.basename(path),
                              "type": "file", "datasetId": "dataset-1", "metadata": {"system": system}},
                             client_api=dl.client_api, dataset=None, project=None)


def prompt_json(text: str, image_url: Optional[str] = None) -> str:
    parts = [{"mimetype": "application/text", "value": text}]
    if image_url:
        parts.insert(0, {"mimetype": "image/*", "value": image_url})
    parts.append({"mimetype": "metadata", "value": {"role": "user"}})
    return json.dumps({"shebang": "dataloop", "metadata": {"dltype": "prompt"}, "prompts": {"1": parts}})


MANIFEST_PATH = Path(__file__).resolve().parents[1] / "dataloop.json"


def manifest_runner(module_name: str = "clip-module"):
    """What a deployed model service does with an execution of one of its functions, as far as dtlpy and
    the manifest show it: a fresh `ClipAdapter(model_entity=model)` (the module's init input), then the
    function with its declared inputs by name (a `Dataset` input arrives as `{"dataset_id"}` and is
    fetched; the rest as given). The outputs are stored by their declared names, `Item[]` as
    `[{"item_id"}]`: how the agent really writes several outputs into `execution.output` cannot be seen
    offline (docs/platform-tests.md)."""
    from adapters.clip_adapter import ClipAdapter

    manifest = json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
    (module,) = [m for m in manifest["components"]["modules"] if m["name"] == module_name]
    functions = {f["name"]: f for f in module["functions"]}

    def run(execution: dict):
        declared = functions[execution["functionName"]]
        adapter = ClipAdapter(model_entity=dl.models.get(model_id=execution["modelId"]))
        given = execution["input"]
        kwargs = {}
        for spec in declared["input"]:
            if spec["name"] not in given:
                continue
            value = given[spec["name"]]
            kwargs[spec["name"]] = dl.datasets.get(dataset_id=value["dataset_id"]) if spec["type"] == "Dataset" else value
        returned = getattr(adapter, execution["functionName"])(**kwargs)
        returned = returned if isinstance(returned, tuple) else (returned,)
        output = {}
        for spec, value in zip(declared["output"], returned):
            output[spec["name"]] = [{"item_id": item.id} for item in value] if spec["type"] == "Item[]" else value
        return output

    return run
