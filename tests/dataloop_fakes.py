"""Real dtlpy entities built offline, for tests. Only the Dataloop server is faked, here:

- `offline_model`: a real dl.Model from JSON whose `update()` (a server call) is replaced.
- `file_item`: a real dl.Item whose binary lives at a file:// URL, so `item.download()` really runs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import dtlpy as dl


def offline_model(configuration: dict, labels: Optional[list[str]] = None, input_type: str = "image",
                  output_type: str = "embedding") -> dl.Model:
    model = dl.Model.from_json(
        _json={"id": "model-1", "name": "clip-test", "projectId": "project-1", "configuration": configuration,
               "inputType": input_type, "outputType": output_type, "labels": labels or [],
               "metadata": {"system": {"subsets": {}}}},
        client_api=dl.client_api, project=None, package=dl.Package())
    model.update = lambda *args, **kwargs: model  # the server call; everything else is real
    return model


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


def offline_feature_set(size: int) -> dl.FeatureSet:
    return dl.FeatureSet.from_json({"id": "fs", "name": "clip", "size": size}, client_api=dl.client_api)
