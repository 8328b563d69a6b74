"""What the fake platform holds: plain JSON documents (as the gate returns them) and item binaries.

Tests seed it directly (`add_project`, `add_dataset`, `add_item`, `add_annotation`, `add_model`)
and read it back to assert what a flow left on the "platform". Every mutation runs under one lock:
dtlpy calls the server from many threads at once.
"""
from __future__ import annotations

import copy
import datetime
import itertools
import json
import mimetypes
import threading
from typing import Any, Callable, Optional

from . import dql, vectors

# Ids are 24 hex digits, like the platform's ObjectIds, and increase with creation: dtlpy splits
# datasets by id ranges (Filters._get_split_filters), so they must sort and bisect like the real ones.
# They keep increasing across resets, so no two tests in a session share an id (or a name built from one).
_ID_BASE = 0x65F000000000000000000000
_NEXT_ID = itertools.count(1)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class PlatformState:
    def __init__(self, base_url: str = "http://127.0.0.1/api/v1"):
        self.base_url = base_url
        self.lock = threading.RLock()
        self.projects: dict[str, dict] = {}
        self.datasets: dict[str, dict] = {}
        self.items: dict[str, dict] = {}
        self.binaries: dict[str, bytes] = {}
        self.annotations: dict[str, dict] = {}
        self.feature_sets: dict[str, dict] = {}
        self.features: dict[str, dict] = {}
        self.models: dict[str, dict] = {}
        self.metrics: list[dict] = []
        self.executions: dict[str, dict] = {}
        self.commands: dict[str, dict] = {}
        self.packages: dict[str, dict] = {}
        self.services: dict[str, dict] = {}    # deployed model services
        self.dpks: dict[str, dict] = {}        # published apps (app registry)
        self.apps: dict[str, dict] = {}        # installed apps
        self.recipes: dict[str, dict] = {}
        self.ontologies: dict[str, dict] = {}
        self.requests: list[str] = []          # "METHOD /path" of every request, in order
        self.unimplemented: list[str] = []     # requests the fake has no route for
        # What a deployed model service does with an execution (see FakeDataloop.on_execution).
        self.execution_runner: Optional[Callable[[dict], Any]] = None
        self.user = {"id": "tester@example.com", "email": "tester@example.com", "username": "tester"}

    def new_id(self) -> str:
        return f"{_ID_BASE + next(_NEXT_ID):024x}"

    # ---- seeding (what exists on the platform before a flow runs) ---------------------------
    def add_project(self, name: str = "clip-project") -> dict:
        with self.lock:
            project_id = self.new_id()
            project = {"id": project_id, "name": name, "createdAt": now_iso(), "creator": self.user["email"],
                       "role": "owner", "account": "account-1", "isBlocked": False, "org": {"id": "org-1"},
                       "url": f"{self.base_url}/projects/{project_id}"}
            self.projects[project_id] = project
            self.add_dataset(project_id, "Binaries", system=True)  # where artifacts live
            return project

    def add_dataset(self, project_id: str, name: str, system: bool = False, labels: tuple = ()) -> dict:
        """A dataset with its default recipe and ontology (holding `labels`), as the platform creates one."""
        with self.lock:
            recipe = self._add_recipe(project_id, labels)
            dataset_id = self.new_id()
            dataset = {"id": dataset_id, "name": name, "projects": [project_id], "createdAt": now_iso(),
                       "creator": self.user["email"], "driver": "dataloop-driver", "itemsCount": 0,
                       "annotated": 0, "readableType": "dataset", "accessLevel": "owner", "export": {},
                       "metadata": {"system": {"recipes": [recipe["id"]], **({"scope": "system"} if system else {})}},
                       "url": f"{self.base_url}/datasets/{dataset_id}",
                       "items_url": f"{self.base_url}/datasets/{dataset_id}/items",
                       "expirationOptions": None, "indexDriver": "v2", "enableSyncWithCloned": False}
            self.datasets[dataset_id] = dataset
            return dataset

    def _add_recipe(self, project_id: str, labels: tuple) -> dict:
        ontology_id, recipe_id = self.new_id(), self.new_id()
        self.ontologies[ontology_id] = {
            "id": ontology_id, "creator": self.user["email"], "url": f"{self.base_url}/ontologies/{ontology_id}",
            "roots": [{"tag": label, "displayLabel": label, "color": "#1f77b4", "attributes": [], "children": []}
                      for label in labels], "metadata": {"system": {"projectIds": [project_id]}}}
        self.recipes[recipe_id] = {"id": recipe_id, "title": "default recipe", "projectIds": [project_id],
                                   "ontologyIds": [ontology_id], "creator": self.user["email"],
                                   "url": f"{self.base_url}/recipes/{recipe_id}", "metadata": {"system": {}}}
        return self.recipes[recipe_id]

    def add_item(self, dataset_id: str, filename: str, data: bytes, mimetype: Optional[str] = None,
                 metadata: Optional[dict] = None, description: Optional[str] = None,
                 shebang: Optional[dict] = None, hidden: bool = False, item_id: Optional[str] = None) -> dict:
        """An item with its binary; `filename` is the remote path ('/dir/name.png'). `item_id`: a
        given id (e.g. one an export written elsewhere refers to) instead of a new one."""
        with self.lock:
            filename = "/" + filename.lstrip("/")
            directory, _, name = filename.rpartition("/")
            item_id = item_id or self.new_id()
            mimetype = mimetype or mimetypes.guess_type(name)[0] or "application/octet-stream"
            system = {"originalname": name, "size": len(data), "encoding": "7bit", "mimetype": mimetype,
                      "refs": [], "isBinary": not mimetype.startswith("text/")}
            if shebang is not None:
                system["shebang"] = shebang
            if description is not None:
                system["description"] = description
            user_metadata = copy.deepcopy(metadata or {})
            system.update(user_metadata.pop("system", {}))
            item = {"id": item_id, "datasetId": dataset_id, "projectId": self.datasets[dataset_id]["projects"][0],
                    "createdAt": now_iso(), "creator": self.user["email"],
                    "dir": directory or "/", "filename": filename, "name": name, "type": "file",
                    "hidden": hidden, "metadata": {"system": system, **user_metadata},
                    "annotated": False, "annotationsCount": 0, "description": description,
                    "url": f"{self.base_url}/items/{item_id}",
                    "stream": f"{self.base_url}/items/{item_id}/stream",
                    "thumbnail": f"{self.base_url}/items/{item_id}/thumbnail"}
            self.items[item_id] = item
            self.binaries[item_id] = data
            self.datasets[dataset_id]["itemsCount"] += 1
            return item

    def add_annotation(self, item_id: str, type: str, label: str, coordinates: Any = None,
                       metadata: Optional[dict] = None, **fields) -> dict:
        with self.lock:
            item = self.items[item_id]
            annotation_id = self.new_id()
            annotation = {"id": annotation_id, "itemId": item_id, "datasetId": item["datasetId"],
                          "type": type, "label": label, "coordinates": coordinates, "attributes": [],
                          "metadata": copy.deepcopy(metadata or {}), "creator": self.user["email"],
                          "createdAt": now_iso(), "updatedAt": now_iso(), "updatedBy": self.user["email"],
                          "url": f"{self.base_url}/annotations/{annotation_id}",
                          "item": f"{self.base_url}/items/{item_id}", "dataset": None, "hash": None,
                          "source": "ui", **fields}
            annotation["metadata"].setdefault("system", {})
            self.annotations[annotation_id] = annotation
            self._recount(item_id)
            return annotation

    def add_prompt_item(self, dataset_id: str, filename: str, image_item_id: str, caption: Optional[str] = None,
                        subset: Optional[str] = None) -> dict:
        """A prompt item as the platform stores one: a JSON file whose prompt is an image (by its stream
        URL) and, if given, the caption as a `free-text` text annotation with `promptId` '1'.
        `subset` sets the ML-subset tag (`metadata.system.tags.<subset>: true`)."""
        prompt = {"shebang": "dataloop", "metadata": {"dltype": "prompt"},
                  "prompts": {"1": [{"mimetype": "image/*", "value": self.items[image_item_id]["stream"]},
                                    {"mimetype": "metadata", "value": {"role": "user"}}]}}
        metadata = {"system": {"tags": {subset: True}}} if subset else None
        item = self.add_item(dataset_id, filename, json.dumps(prompt).encode(), "application/json",
                             metadata=metadata, shebang={"dltype": "prompt"})
        if caption is not None:
            self.add_annotation(item["id"], "text", "free-text", caption, {"system": {"promptId": "1"}})
        return item

    def add_package(self, project_id: str, name: str = "clip-model-pretrained") -> dict:
        """The model's package (the app's code); older dtlpy fetches it whenever a model is set on an adapter."""
        with self.lock:
            package_id = self.new_id()
            package = {"id": package_id, "name": name, "projectId": project_id, "type": "ml", "version": "1.0.0",
                       "creator": self.user["email"], "createdAt": now_iso(), "updatedAt": now_iso(),
                       "codebase": {"type": "git", "gitUrl": "https://example.invalid/clip.git", "gitTag": "0.0.0"},
                       "modules": [{"name": "clip-module", "entryPoint": "adapters/clip_adapter.py",
                                    "className": "ClipAdapter", "functions": []}],
                       "requirements": [], "metadata": {}, "url": f"{self.base_url}/packages/{package_id}"}
            self.packages[package_id] = package
            return package

    def add_dpk(self, manifest: dict) -> dict:
        """A published app (what `dlp app publish` leaves in the app registry): its manifest, with an id."""
        with self.lock:
            dpk_id = self.new_id()
            dpk = {**copy.deepcopy(manifest), "id": dpk_id, "creator": self.user["email"], "createdAt": now_iso(),
                   "updatedAt": now_iso(), "url": f"{self.base_url}/app-registry/{dpk_id}"}
            self.dpks[dpk_id] = dpk
            return dpk

    def add_model(self, project_id: str, name: str, configuration: dict, dataset_id: Optional[str] = None,
                  labels: Optional[list] = None, input_type: str = "image", output_type: str = "embedding",
                  subsets: Optional[dict] = None, status: str = "created", service_ids: tuple = (),
                  metadata: Optional[dict] = None, package_id: Optional[str] = None) -> dict:
        """A model as the platform holds one (a new package for it unless `package_id` is given)."""
        with self.lock:
            package_id = package_id or self.add_package(project_id)["id"]
            model_id = self.new_id()
            system = {"subsets": subsets or {}, **((metadata or {}).get("system", {}))}
            if service_ids:
                system["deploy"] = {"services": list(service_ids)}
            model = {"id": model_id, "name": name, "projectId": project_id, "datasetId": dataset_id,
                     "packageId": package_id, "artifacts": [], "configuration": copy.deepcopy(configuration),
                     "metadata": {**(metadata or {}), "system": system}, "status": status,
                     "inputType": input_type, "outputType": output_type, "labels": list(labels or []),
                     "tags": [], "description": None, "scope": "project", "version": "1.0.0",
                     "context": {"project": project_id, "creator": self.user["email"]},
                     "createdAt": now_iso(), "updatedAt": now_iso(), "moduleName": "clip-module",
                     "url": f"{self.base_url}/ml/models/{model_id}", "statusLogs": []}
            self.models[model_id] = model
            return model

    def add_service(self, model_id: str, name: Optional[str] = None, module_name: str = "clip-module") -> dict:
        """A deployed model's service (what `model.deploy()` makes): listed in the model's
        `metadata.system.deploy.services`, its `metadata.ml.modelId` the model's."""
        with self.lock:
            model = self.models[model_id]
            service_id = self.new_id()
            service = {"id": service_id, "name": name or f"model-{model['name']}", "projectId": model["projectId"],
                       "packageId": model["packageId"], "moduleName": module_name, "version": "1.0.0",
                       "packageRevision": "1.0.0", "initParams": {"model_entity": model_id}, "runtime": {},
                       "metadata": {"ml": {"modelId": model_id, "modelOperation": "deploy"}}, "active": True,
                       "creator": self.user["email"], "createdAt": now_iso(), "updatedAt": now_iso(),
                       "url": f"{self.base_url}/services/{service_id}"}
            self.services[service_id] = service
            model["metadata"]["system"].setdefault("deploy", {}).setdefault("services", []).append(service_id)
            model["status"] = "deployed"
            return service

    def add_feature_set(self, project_id: str, name: str, size: int, model_id: Optional[str] = None) -> dict:
        """A feature set as `/features/sets` creates one (what an earlier embedding left, for instance)."""
        with self.lock:
            feature_set_id = self.new_id()
            feature_set = {"id": feature_set_id, "name": name, "size": size, "type": name, "entityType": "item",
                           "project": project_id, "modelId": model_id, "tags": [], "org": None,
                           "createdAt": now_iso(), "updatedAt": now_iso(), "creator": self.user["email"],
                           "url": f"{self.base_url}/features/sets/{feature_set_id}"}
            self.feature_sets[feature_set_id] = feature_set
            return feature_set

    def add_feature(self, feature_set_id: str, item_id: str, value: list[float]) -> dict:
        """A feature vector of an item, as `/features/vectors` stores one."""
        with self.lock:
            feature_set, item = self.feature_sets[feature_set_id], self.items[item_id]
            feature_id = self.new_id()
            feature = {"id": feature_id, "entityId": item_id, "value": list(value), "featureSetId": feature_set_id,
                       "project": feature_set["project"], "datasetId": item["datasetId"], "createdAt": now_iso(),
                       "creator": self.user["email"], "version": None, "parentId": None, "org": None,
                       "url": f"{self.base_url}/features/vectors/{feature_id}"}
            self.features[feature_id] = feature
            return feature

    @staticmethod
    def subset_filter(subset: str) -> dict:
        """The item query of an ML subset, as the platform writes it in `model.metadata.system.subsets`."""
        return {"filter": {"$and": [{"hidden": False}, {"type": "file"}, {f"metadata.system.tags.{subset}": True}]},
                "page": 0, "pageSize": 1000, "resource": "items"}

    # ---- reading back ---------------------------------------------------------------------
    def item_annotations(self, item_id: str) -> list[dict]:
        with self.lock:
            return [copy.deepcopy(a) for a in self.annotations.values() if a["itemId"] == item_id]

    def vectors_of(self, feature_set_id: str) -> dict[str, list[float]]:
        """{item id: vector} of one feature set."""
        with self.lock:
            return {f["entityId"]: list(f["value"]) for f in self.features.values()
                    if f["featureSetId"] == feature_set_id}

    def metric_points(self, model_id: str, figure: str, legend: str) -> list[tuple]:
        """(x, y) of one plot of a model's metrics (dl.PlotSample: {figure, legend, data: {x, y}}), in order sent."""
        with self.lock:
            return [(m["data"]["x"], m["data"]["y"]) for m in self.metrics
                    if m.get("modelId") == model_id and m["figure"] == figure and m["legend"] == legend]

    def dataset_items(self, dataset_id: str) -> list[dict]:
        with self.lock:
            return [copy.deepcopy(i) for i in self.items.values() if i["datasetId"] == dataset_id]

    def binaries_dataset(self, project_id: str) -> dict:
        return next(d for d in self.datasets.values() if d["projects"] == [project_id] and d["name"] == "Binaries")

    def artifact_files(self, model_id: str) -> dict[str, bytes]:
        """{path under the model's artifact folder: bytes} of the items the model lists as artifacts."""
        with self.lock:
            model = self.models[model_id]
            prefix = f"/artifacts/models/{model['name']}/"
            result = {}
            for artifact in model.get("artifacts", []):
                item = self.items.get(artifact.get("itemId", artifact.get("id")))
                if item is not None:
                    result[item["filename"][len(prefix):] if item["filename"].startswith(prefix)
                           else item["filename"]] = self.binaries[item["id"]]
            return result

    # ---- helpers for the routes -------------------------------------------------------------
    def item_document(self, item_id: str) -> dict:
        """An item as the gate returns it (annotation counts up to date)."""
        return copy.deepcopy(self.items[item_id])

    def _recount(self, item_id: str) -> None:
        count = sum(1 for a in self.annotations.values() if a["itemId"] == item_id)
        self.items[item_id]["annotationsCount"] = count
        self.items[item_id]["annotated"] = count > 0

    def query_items(self, dataset_id: str, query: dict) -> list[dict]:
        dql.check_query_keys(query, also=("delete", "update"))  # the route refuses those two itself
        items = [i for i in self.items.values() if i["datasetId"] == dataset_id]
        selected = dql.select(items, query.get("filter"))
        if query.get("join"):
            return self.join_items(selected, query["join"], query.get("sort"))
        return dql.sort_documents(selected, query.get("sort"))

    # ---- joins: items that have a document of another resource matching the join's filter ------
    # One function per `join.on.resource`, each checking the `on` it is documented with (dtlpy's
    # Filters.add_join writes the annotations one; clip-smart-search's panel the feature_vectors one).
    # A join on anything else is refused, never ignored.
    def join_items(self, items: list[dict], join: dict, sort: Optional[dict]) -> list[dict]:
        """`items` joined as `join.on.resource` says, in the query's order (a join may order them itself:
        vector search orders by distance)."""
        on = join.get("on") or {}
        resource = on.get("resource")
        joiner = ITEM_JOINS.get(resource)
        if joiner is None:
            raise dql.UnsupportedQuery(f"a join on resource {resource!r} (the fake joins items with "
                                       f"{sorted(ITEM_JOINS)})")
        expected_on = JOIN_KEYS[resource]
        if (on.get("local"), on.get("forigen")) != expected_on:
            raise dql.UnsupportedQuery(f"a join on {resource} with local/forigen {on.get('local')!r}/"
                                       f"{on.get('forigen')!r}: the documented one is {expected_on}")
        return joiner(self, items, join, sort)

    def join_annotations(self, items: list[dict], join: dict, sort: Optional[dict]) -> list[dict]:
        """Items with at least one annotation matching the join filter."""
        joined = {a["itemId"] for a in dql.select(self.annotations.values(), join.get("filter") or {})}
        return dql.sort_documents([i for i in items if i["id"] in joined], sort)

    def join_feature_vectors(self, items: list[dict], join: dict, sort: Optional[dict]) -> list[dict]:
        """Items with a feature vector matching the join filter (`featureSetId`, `datasetId`, ...), and
        vector search (`value: {$euclid: ...}`, ordered by distance): tests/fake_dataloop/vectors.py."""
        return vectors.join_items(items, join, self.features.values(), sort)

    def query_annotations(self, dataset_id: str, query: dict) -> list[dict]:
        dql.check_query_keys(query, also=("delete",))
        if query.get("join"):
            raise dql.UnsupportedQuery("a join in an annotations query")
        annotations = [a for a in self.annotations.values() if a["datasetId"] == dataset_id]
        return dql.sort_documents(dql.select(annotations, query.get("filter")),
                                  query.get("sort") or {"createdAt": "ascending"})

    def delete_annotations(self, annotation_ids: list[str]) -> None:
        for annotation_id in annotation_ids:
            annotation = self.annotations.pop(annotation_id)
            self._recount(annotation["itemId"])

    def export_document(self, item: dict, annotation_query: Optional[dict]) -> dict:
        """One exported item: the item JSON with its annotations (filtered by annotationsQuery)."""
        document = copy.deepcopy(item)
        annotations = [a for a in self.annotations.values() if a["itemId"] == item["id"]]
        if annotation_query is not None:
            annotations = dql.select(annotations, annotation_query.get("filter"))
        document["annotations"] = [copy.deepcopy(a) for a in sorted(annotations, key=lambda a: a["id"])]
        document["annotationsCount"] = len(document["annotations"])
        return document


# join.on.resource -> how items are joined with it, and the (local, forigen) keys it is written with.
ITEM_JOINS = {"annotations": PlatformState.join_annotations, "feature_vectors": PlatformState.join_feature_vectors}
JOIN_KEYS = {"annotations": ("itemId", "id"), "feature_vectors": ("entityId", "id")}
