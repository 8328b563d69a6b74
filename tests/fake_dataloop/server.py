"""A small stateful fake of the Dataloop gate (REST API), served over real HTTP on 127.0.0.1.

dtlpy talks to it exactly as to the platform (requests and aiohttp, its own retries, uploads and
downloads); only the server is fake. Each route is one method here, listed in ROUTES; a request
that matches none is answered 400 "not implemented by the fake platform", logged with its method
and path, and recorded in `state.unimplemented` (the fixture fails the test on it), so a gap
shows up as a clear failure, never as silently wrong data. docs/platform-tests.md lists the routes.
"""
from __future__ import annotations

import contextlib
import copy
import email.parser
import email.policy
import io
import json
import logging
import re
import threading
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, Optional
from urllib.parse import parse_qs, unquote, urlsplit

from . import dql
from .state import PlatformState, now_iso

log = logging.getLogger("fake_dataloop")
API_PREFIX = "/api/v1"


class Reply:
    """What a route answers: JSON (dict/list) or raw bytes, with a status."""

    def __init__(self, body: Any = None, status: int = 200, content_type: Optional[str] = None):
        self.status = status
        if isinstance(body, (bytes, bytearray)):
            self.data, self.content_type = bytes(body), content_type or "application/octet-stream"
        else:
            self.data, self.content_type = json.dumps(body).encode(), "application/json"


def deep_merge(target: dict, change: dict) -> None:
    """Apply a partial document (what dtlpy's `item.update()` sends) onto `target`, key by key."""
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            deep_merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def dataloop_shebang(path: str, data: bytes) -> Optional[dict]:
    """The gate reads a JSON file's `"shebang": "dataloop"` (a prompt item: `metadata.dltype` 'prompt')
    into the item's `metadata.system.shebang`."""
    if not path.lower().endswith(".json"):
        return None
    try:
        document = json.loads(data)
    except ValueError:
        return None
    if not isinstance(document, dict) or document.get("shebang") != "dataloop":
        return None
    dltype = (document.get("metadata") or {}).get("dltype")
    return {"dltype": dltype} if dltype else None


def error(status: int, message: str) -> Reply:
    return Reply({"status": status, "message": message, "error": message}, status=status)


class Request:
    def __init__(self, method: str, path: str, query: dict, headers, body: bytes, match: re.Match):
        self.method, self.path, self.query, self.headers, self.body, self.match = \
            method, path, query, headers, body, match

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def arg(self, name: str, default: Optional[str] = None) -> Optional[str]:
        return self.query.get(name, [default])[0]

    def form(self) -> dict[str, Any]:
        """multipart/form-data fields: str for text fields, (filename, bytes) for files."""
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + self.body)
        fields: dict[str, Any] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            filename = part.get_filename()
            fields[name] = (filename, payload) if filename is not None else payload.decode()
        return fields


Route = tuple[str, re.Pattern, Callable[["FakeGate", Request], Reply]]
ROUTES: list[tuple[str, str, str]] = []  # (method, path regex, handler name); filled by @route


def route(method: str, pattern: str):
    def register(handler):
        ROUTES.append((method, pattern, handler.__name__))
        return handler
    return register


ID = r"([0-9a-zA-Z_-]+)"


class FakeGate:
    """The routes. `state` is the platform's content; handlers run in the server's threads."""

    def __init__(self, state: PlatformState):
        self.state = state
        self.routes: list[Route] = [(m, re.compile(p + r"$"), getattr(FakeGate, h)) for m, p, h in ROUTES]

    def handle(self, method: str, raw_path: str, headers, body: bytes) -> Reply:
        parts = urlsplit(raw_path)
        path = parts.path[len(API_PREFIX):] if parts.path.startswith(API_PREFIX) else parts.path
        query = parse_qs(parts.query)
        with self.state.lock:
            self.state.requests.append(f"{method} {path}")
        for route_method, pattern, handler in self.routes:
            match = pattern.match(path)
            if route_method == method and match:
                try:
                    return handler(self, Request(method, path, query, headers, body, match))
                except KeyError as exc:
                    return error(404, f"not found: {exc}")
                except dql.UnsupportedQuery as exc:
                    return self._unimplemented(method, path, str(exc))
        return self._unimplemented(method, path, "no such route")

    def _unimplemented(self, method: str, path: str, why: str) -> Reply:
        entry = f"{method} {path} ({why})"
        log.error("fake Dataloop: not implemented: %s", entry)
        with self.state.lock:
            self.state.unimplemented.append(entry)
        return error(400, f"not implemented by the fake platform: {entry}")

    def _document(self, collection: str, request: Request) -> Reply:
        """The document of `state.<collection>` with the id in the path (a KeyError answers 404)."""
        with self.state.lock:
            return Reply(getattr(self.state, collection)[request.match[1]])

    # ---- users, projects --------------------------------------------------------------------
    @route("GET", "/users/me")
    def get_me(self, request: Request) -> Reply:
        return Reply(self.state.user)

    @route("POST", "/sdk/check")
    def check_sdk(self, request: Request) -> Reply:
        """dtlpy's background version check (some releases): no advice."""
        return Reply({"level": "debug", "msg": "fake Dataloop platform: no SDK version advice"})

    @route("GET", f"/projects/{ID}")
    def get_project(self, request: Request) -> Reply:
        return self._document("projects", request)

    @route("GET", "/projects/([^/]+)/name")
    def get_projects_by_name(self, request: Request) -> Reply:
        """`dl.projects.get(project_name=...)`: every project of that name (dtlpy quotes the name in the path)."""
        name = unquote(request.match[1])
        with self.state.lock:
            return Reply([p for p in self.state.projects.values() if p["name"] == name])

    @route("GET", f"/packages/{ID}")
    def get_package(self, request: Request) -> Reply:
        return self._document("packages", request)

    @route("GET", f"/drivers/{ID}")
    def get_driver(self, request: Request) -> Reply:
        """Every dataset is on Dataloop's own storage (older uploaders ask for the driver's path)."""
        return Reply({"id": request.match[1], "name": request.match[1], "type": "dl", "integrationType": "dl",
                      "path": None, "metadata": {}, "creator": self.state.user["email"], "createdAt": now_iso(),
                      "allowExternalDelete": False, "allowExternalModification": False})

    # ---- datasets ----------------------------------------------------------------------------
    @route("GET", f"/datasets/{ID}")
    def get_dataset(self, request: Request) -> Reply:
        return self._document("datasets", request)

    @route("GET", f"/recipes/{ID}")
    def get_recipe(self, request: Request) -> Reply:
        """A dataset's recipe (dtlpy Recipes.get, for `dataset.labels`; `model.clone(dataset=...)` reads them)."""
        return self._document("recipes", request)

    @route("GET", f"/ontologies/{ID}")
    def get_ontology(self, request: Request) -> Reply:
        """A recipe's ontology: its labels as `roots` (dtlpy Ontologies.get, Ontology.from_json)."""
        return self._document("ontologies", request)

    @route("POST", "/datasets/query")
    def query_datasets(self, request: Request) -> Reply:
        """Datasets by DQL, within `?projects=` and `context.projects`. System datasets (a project's
        Binaries) only with `systemSpace: true`, which dtlpy sets to find Binaries (_get_binaries_dataset)."""
        query = request.json() or {}
        dql.check_query_keys(query, also=("systemSpace",))
        project_ids = set(request.query.get("projects", [])) | (self._context_projects(query) or set())
        system = bool(query.get("systemSpace"))
        with self.state.lock:
            return Reply(dql.run([d for d in self.state.datasets.values()
                                  if (not project_ids or project_ids & set(d["projects"]))
                                  and (system or d["metadata"]["system"].get("scope") != "system")], query))

    @route("POST", "/datasets")
    def create_dataset(self, request: Request) -> Reply:
        """`project.datasets.create(dataset_name=...)`: {name, projects, createDefaultRecipe}."""
        payload = request.json() or {}
        with self.state.lock:
            if any(d["name"] == payload["name"] and set(d["projects"]) & set(payload["projects"])
                   for d in self.state.datasets.values()):
                return error(400, f"dataset {payload['name']!r} already exists")
            return Reply(self.state.add_dataset(payload["projects"][0], payload["name"]))

    @route("POST", f"/datasets/{ID}/query")
    def query_dataset(self, request: Request) -> Reply:
        """Items or annotations of a dataset by DQL: list (paged), `delete: true` or `update`."""
        dataset_id, query = request.match[1], request.json() or {}
        resource = query.get("resource", "items")
        with self.state.lock:
            if resource == "annotations":
                found = self.state.query_annotations(dataset_id, query)
                if query.get("delete"):
                    self.state.delete_annotations([a["id"] for a in found])
                    return Reply({"deleted": len(found)})
            elif resource == "items":
                found = [self.state.item_document(i["id"]) for i in self.state.query_items(dataset_id, query)]
                if query.get("delete") or query.get("update"):
                    raise dql.UnsupportedQuery("bulk item delete/update")
            else:
                raise dql.UnsupportedQuery(f"query of resource {resource!r}")
            return Reply(dql.page_of(copy.deepcopy(found), query))

    @route("POST", f"/datasets/{ID}/items")
    def upload_item(self, request: Request) -> Reply:
        """dtlpy's uploader: multipart with `file`, `path` (remote path), `type`, `metadata`, `description`."""
        dataset_id, form = request.match[1], request.form()
        if "file" not in form:
            raise dql.UnsupportedQuery("item upload without a file part (links, bulk JSON)")
        filename, data = form["file"]
        path = form.get("path") or "/" + filename
        metadata = json.loads(form["metadata"]) if form.get("metadata") else {}
        mode = request.arg("mode", "skip")
        with self.state.lock:
            existing = next((i for i in self.state.items.values()
                             if i["datasetId"] == dataset_id and i["filename"] == "/" + path.lstrip("/")), None)
            if existing is not None and mode == "skip":
                return Reply(self.state.item_document(existing["id"]))
            if existing is not None:  # overwrite: same item, new binary and metadata
                self.state.binaries[existing["id"]] = data
                existing["metadata"]["system"]["size"] = len(data)
                self._merge_metadata(existing, metadata)
                if form.get("description") is not None:
                    existing["description"] = form["description"]
                return Reply(self.state.item_document(existing["id"]))
            system = metadata.pop("system", {})
            mimetype = system.get("mimetype")
            item = self.state.add_item(dataset_id, path, data, mimetype=mimetype, metadata=metadata,
                                       description=form.get("description"),
                                       shebang=system.pop("shebang", None) or dataloop_shebang(path, data))
            item["metadata"]["system"].update(system)
            return Reply(self.state.item_document(item["id"]))

    @staticmethod
    def _merge_metadata(item: dict, metadata: dict) -> None:
        for key, value in metadata.items():
            if isinstance(value, dict) and isinstance(item["metadata"].get(key), dict):
                item["metadata"][key].update(value)
            else:
                item["metadata"][key] = value

    @route("POST", f"/datasets/{ID}/export")
    def export_dataset(self, request: Request) -> Reply:
        """An export, finished at once: a command whose output item is the export file.

        exportType 'json': one JSON file, a list of exported items (dtlpy's `_export_recursive`).
        Otherwise (the classic export): a zip with one `<dir>/<name>.json` per item.
        Each exported item is the item JSON with `annotations` (filtered by `annotationsQuery`).
        """
        dataset_id, payload = request.match[1], request.json() or {}
        items_query = payload.get("itemsQuery") or {"filter": {"$and": [{"hidden": False}, {"type": "file"}]}}
        include = (payload.get("annotations") or {}).get("include", True)
        annotation_query = payload.get("annotationsQuery")
        with self.state.lock:
            documents = [self.state.export_document(i, annotation_query)
                         for i in self.state.query_items(dataset_id, items_query)]
            if not include:
                for document in documents:
                    document.pop("annotations")
            project_id = self.state.datasets[dataset_id]["projects"][0]
            binaries = self.state.binaries_dataset(project_id)
            command_id = self.state.new_id()
            if payload.get("exportType") == "json":
                data, name = json.dumps(documents).encode(), f"{command_id}.json"
            else:
                data, name = self._export_zip(documents, payload.get("exportVersion", "V1")), f"{command_id}.zip"
            output = self.state.add_item(binaries["id"], f"/.dataloop/exports/{name}", data, hidden=True)
            return Reply(self._command(command_id, "ExportDataset", {"outputItemId": output["id"]}))

    @staticmethod
    def _export_zip(documents: list[dict], export_version: str) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for document in documents:
                path = document["filename"].lstrip("/")
                stem = path if export_version == "V2" else path.rsplit(".", 1)[0]
                archive.writestr(stem + ".json", json.dumps(document))
        return buffer.getvalue()

    def _command(self, command_id: str, kind: str, spec: dict) -> dict:
        command = {"id": command_id, "url": f"{self.state.base_url}/commands/{command_id}", "status": "success",
                   "type": kind, "spec": spec, "progress": 100, "createdAt": now_iso(), "updatedAt": now_iso(),
                   "creator": self.state.user["email"], "error": None}
        self.state.commands[command_id] = command
        return command

    # ---- items -------------------------------------------------------------------------------
    @route("GET", f"/items/{ID}")
    def get_item(self, request: Request) -> Reply:
        with self.state.lock:
            return Reply(self.state.item_document(request.match[1]))

    @route("GET", f"/items/{ID}/stream")
    def stream_item(self, request: Request) -> Reply:
        with self.state.lock:
            item = self.state.items[request.match[1]]
            return Reply(self.state.binaries[item["id"]], content_type=item["metadata"]["system"]["mimetype"])

    @route("PATCH", f"/items/{ID}")
    def update_item(self, request: Request) -> Reply:
        with self.state.lock:
            item = self.state.items[request.match[1]]
            change = request.json() or {}
            if "metadata" in change:  # dtlpy sends a diff (DictDiffer): the gate merges it in
                deep_merge(item["metadata"], change["metadata"])
            for key in ("description", "name", "filename", "dir"):
                if key in change:
                    item[key] = copy.deepcopy(change[key])
            return Reply(self.state.item_document(item["id"]))

    # ---- annotations -------------------------------------------------------------------------
    @route("POST", f"/items/{ID}/annotations")
    def upload_annotations(self, request: Request) -> Reply:
        item_id, body = request.match[1], request.json()
        created = []
        with self.state.lock:
            for annotation in body if isinstance(body, list) else [body]:
                fields = {k: v for k, v in annotation.items()
                          if k not in ("type", "label", "coordinates", "metadata", "id", "itemId", "datasetId")}
                created.append(self.state.add_annotation(item_id, annotation["type"], annotation.get("label"),
                                                         annotation.get("coordinates"),
                                                         annotation.get("metadata"), **fields))
        return Reply(created)

    # ---- feature sets and vectors ------------------------------------------------------------
    @staticmethod
    def _context_projects(query: dict) -> Optional[set]:
        """`context: {projects: [...]}` (dtlpy's FeatureSets.list and Features.list set it): the query
        sees only those projects' documents. None when the query names no projects."""
        context = query.get("context") or {}
        unknown = set(context) - {"projects"}
        if unknown:
            raise dql.UnsupportedQuery(f"query context keys {sorted(unknown)}")
        return set(context["projects"]) if "projects" in context else None

    @route("POST", "/features/sets/query")
    def query_feature_sets(self, request: Request) -> Reply:
        query = request.json() or {}
        dql.check_query_keys(query)
        projects = self._context_projects(query)
        with self.state.lock:
            return Reply(dql.run([f for f in self.state.feature_sets.values()
                                  if projects is None or f["project"] in projects], query))

    @route("GET", f"/features/sets/{ID}")
    def get_feature_set(self, request: Request) -> Reply:
        """dtlpy's `feature_sets.get(feature_set_id=...)`."""
        return self._document("feature_sets", request)

    @route("POST", "/features/vectors/query")
    def query_feature_vectors(self, request: Request) -> Reply:
        """dtlpy's `Features.list` (`feature_set.features.list()`, `item.features.list()`): vectors by DQL
        (`featureSetId`, `entityId`, `datasetId`), within `context.projects`, sorted (dtlpy sorts by id), paged."""
        query = request.json() or {}
        dql.check_query_keys(query)
        if query.get("join"):
            raise dql.UnsupportedQuery("a join in a feature vectors query")
        projects = self._context_projects(query)
        with self.state.lock:
            found = [f for f in self.state.features.values() if projects is None or f["project"] in projects]
            return Reply(copy.deepcopy(dql.run(found, query)))

    @route("POST", "/features/sets")
    def create_feature_set(self, request: Request) -> Reply:
        payload = request.json()
        with self.state.lock:
            feature_set = self.state.add_feature_set(payload.get("project"), payload["name"], payload["size"],
                                                     payload.get("modelId"))
            feature_set.update({key: payload[key] for key in ("type", "entityType", "tags", "org") if key in payload})
            return Reply([feature_set])  # the gate answers a list

    @route("POST", "/features/vectors")
    def create_feature_vectors(self, request: Request) -> Reply:
        """A list of {entityId, value, featureSetId, project, datasetId}; one vector per item and set
        (a new one replaces the old, as re-embedding does on the platform). 400 on a wrong size."""
        body = request.json()
        created = []
        with self.state.lock:
            for entry in body if isinstance(body, list) else [body]:
                feature_set = self.state.feature_sets[entry["featureSetId"]]
                if len(entry["value"]) != feature_set["size"]:
                    return error(400, f"vector of size {len(entry['value'])} in feature set of size "
                                      f"{feature_set['size']}")
                for old in [f["id"] for f in self.state.features.values()
                            if f["featureSetId"] == entry["featureSetId"] and f["entityId"] == entry["entityId"]]:
                    del self.state.features[old]
                feature = self.state.add_feature(entry["featureSetId"], entry["entityId"], entry["value"])
                feature.update({key: entry[key] for key in ("project", "datasetId", "version", "parentId", "org")
                                if key in entry})
                created.append(feature)
        return Reply(created)

    # ---- models, metrics ---------------------------------------------------------------------
    @route("GET", f"/ml/models/{ID}")
    def get_model(self, request: Request) -> Reply:
        return self._document("models", request)

    @route("PATCH", f"/ml/models/{ID}")
    def update_model(self, request: Request) -> Reply:
        """model.update(): the fields a client may change; status changes are logged in statusLogs."""
        with self.state.lock:
            model = self.state.models[request.match[1]]
            change = request.json() or {}
            for key in ("name", "description", "configuration", "metadata", "labels", "tags", "status",
                        "artifacts", "inputType", "outputType", "datasetId"):
                if key in change:
                    if key == "status" and change[key] != model["status"]:
                        model["statusLogs"].append({"status": change[key], "createdAt": now_iso()})
                    model[key] = copy.deepcopy(change[key])
            model["updatedAt"] = now_iso()
            return Reply(model)

    @route("POST", "/ml/metrics/publish")
    def publish_metrics(self, request: Request) -> Reply:
        body = request.json()
        with self.state.lock:
            for sample in body if isinstance(body, list) else [body]:
                self.state.metrics.append(copy.deepcopy(sample))
        return Reply(body)

    @route("POST", f"/ml/models/{ID}/embed")
    def model_embed(self, request: Request) -> Reply:
        return self._model_execution(request, "embed")

    @route("POST", f"/ml/models/{ID}/predict")
    def model_predict(self, request: Request) -> Reply:
        return self._model_execution(request, "predict")

    @route("POST", f"/ml/models/{ID}/embed/datasets")
    def model_embed_datasets(self, request: Request) -> Reply:
        """`model.embed_datasets(dataset_ids)` (dtlpy Models.embed_datasets): {datasetIds, config: {serviceId},
        attachTrigger}; answered with a command, which dtlpy waits for. The fake runs one execution of the
        model service's `embed_dataset` per dataset (no filter: the whole dataset) before answering.
        attachTrigger (embed new items as they arrive) is not simulated: refused."""
        model_id, payload = request.match[1], request.json() or {}
        if payload.get("attachTrigger"):
            raise dql.UnsupportedQuery("embed_datasets with attachTrigger (a trigger on new items)")
        executions = [self._start_execution(model_id, payload, "embed_dataset",
                                            {"dataset": {"dataset_id": dataset_id}, "filters": None})
                      for dataset_id in payload["datasetIds"]]
        for execution in executions:
            self._run_execution(execution)
        with self.state.lock:
            failed = [e["id"] for e in executions if e["latestStatus"]["status"] != "success"]
            command = self._command(self.state.new_id(), "EmbedDatasets",
                                    {"executionIds": [e["id"] for e in executions]})
            if failed:
                command.update(status="failed", error=f"executions failed: {failed}")
            return Reply(command)

    def _model_execution(self, request: Request, operation: str) -> Reply:
        """`/ml/models/<id>/embed|predict`: an execution of the model's service; with a dataset, of its
        `<operation>_dataset` function on {dataset, filters}, else of `<operation>_items` on the items.

        The fake runs it before answering, through `state.execution_runner` (what the deployed
        service does with it); the answer is the finished execution.
        """
        model_id, payload = request.match[1], request.json()
        inputs = payload.get("input", {})
        if "datasetId" in inputs:
            function_name = f"{operation}_dataset"
            execution_input = {"dataset": {"dataset_id": inputs["datasetId"]},
                               "filters": {"filter": inputs.get("datasetQuery") or {}}}
        else:
            function_name = f"{operation}_items"
            execution_input = {"items": [{"item_id": i} for i in inputs.get("itemIds", [])]}
        execution = self._start_execution(model_id, payload, function_name, execution_input)
        self._run_execution(execution)
        with self.state.lock:
            return Reply(copy.deepcopy(execution))

    def _start_execution(self, model_id: str, payload: dict, function_name: str, execution_input: dict) -> dict:
        """A new execution of the model's service (created, not yet run)."""
        with self.state.lock:
            model = self.state.models[model_id]
            return self._new_execution(model["projectId"], payload.get("config", {}).get("serviceId"),
                                       function_name, execution_input, model_id, "clip-service")

    def _new_execution(self, project_id: str, service_id: Optional[str], function_name: str, inputs: dict,
                       model_id: Optional[str], service_name: str) -> dict:
        execution_id = self.state.new_id()
        execution = {"id": execution_id, "projectId": project_id, "serviceId": service_id,
                     "functionName": function_name, "input": inputs, "modelId": model_id, "createdAt": now_iso(),
                     "updatedAt": now_iso(), "creator": self.state.user["email"], "attempts": 1,
                     "latestStatus": {"status": "created", "percentComplete": 0, "timestamp": now_iso()},
                     "statusLog": [], "url": f"{self.state.base_url}/executions/{execution_id}",
                     "serviceName": service_name, "packageName": "clip", "packageId": None,
                     "output": None, "duration": None}
        self.state.executions[execution_id] = execution
        return execution

    def _run_execution(self, execution: dict) -> None:
        def set_status(status: str, percent: int, message: Optional[str] = None) -> None:
            with self.state.lock:
                execution["latestStatus"] = {"status": status, "percentComplete": percent,
                                             "timestamp": now_iso(), "message": message}
                execution["statusLog"].append(execution["latestStatus"])

        runner = self.state.execution_runner
        if runner is None:
            set_status("failed", 0, "no service is deployed for this model (FakeDataloop.on_execution)")
            return
        set_status("in-progress", 0)
        try:
            output = runner(copy.deepcopy(execution))
        except Exception as exc:  # noqa: BLE001 - an execution fails; the platform records why
            log.warning("fake Dataloop: execution %s failed: %s", execution["id"], traceback.format_exc())
            set_status("failed", 0, f"{type(exc).__name__}: {exc}")
        else:
            with self.state.lock:
                execution["output"] = copy.deepcopy(output)  # what the runner says the function returned
            set_status("success", 100)

    # ---- services ----------------------------------------------------------------------------
    @route("GET", f"/services/{ID}")
    def get_service(self, request: Request) -> Reply:
        with self.state.lock:
            return Reply(self.state.services[request.match[1]])

    @route("POST", f"/executions/{ID}")
    def execute_service(self, request: Request) -> Reply:
        """`service.execute(function_name=..., execution_input={...})`: an execution of one of the service's
        functions on the inputs by name; run before answering, like the model routes above."""
        service_id, payload = request.match[1], request.json() or {}
        with self.state.lock:
            service = self.state.services[service_id]
            execution = self._new_execution(payload.get("projectId") or service["projectId"], service_id,
                                            payload.get("functionName"), payload.get("input") or {},
                                            service["metadata"]["ml"].get("modelId"), service["name"])
        self._run_execution(execution)
        with self.state.lock:
            return Reply(copy.deepcopy(execution))

    # ---- the app registry, installed apps, model management ---------------------------------
    @route("POST", "/app-registry/query")
    def query_dpks(self, request: Request) -> Reply:
        """`dl.dpks.get(dpk_name=...)` (dtlpy Dpks.__get_by_name -> list): published apps by DQL."""
        query = request.json() or {}
        dql.check_query_keys(query)
        with self.state.lock:
            return Reply(copy.deepcopy(dql.run(self.state.dpks.values(), query)))

    @route("POST", "/apps")
    def install_app(self, request: Request) -> Reply:
        """`project.apps.install(dpk=..., custom_installation=...)`: an installed app, and in its project a
        model per `components.models` entry of the installation (the tutorial passes `dpk.to_json()`), made
        as the manifest says (name, configuration, input/output type, status). Answered installed (no
        install command to wait for). Not simulated: the app's own services, panels, triggers; the
        models refer to a package of the app's modules rather than to the app (`model.app`)."""
        payload = request.json() or {}
        with self.state.lock:
            dpk = next(d for d in self.state.dpks.values()
                       if d["name"] == payload["dpkName"] and d["version"] == payload["dpkVersion"])
            installation = payload.get("customInstallation") or dpk
            project_id = payload["projectId"]
            if any(a["name"] == payload["name"] and a["projectId"] == project_id for a in self.state.apps.values()):
                return error(400, f"app {payload['name']!r} is already installed in the project")
            package = self.state.add_package(project_id, name=dpk["name"])
            package["modules"] = copy.deepcopy(installation["components"].get("modules", []))
            for spec in installation["components"].get("models", []):
                model = self.state.add_model(project_id, spec["name"], spec.get("configuration", {}),
                                             labels=spec.get("labels"), input_type=spec.get("inputType", "image"),
                                             output_type=spec.get("outputType", "embedding"),
                                             status=spec.get("status", "created"), package_id=package["id"],
                                             metadata=spec.get("metadata"))
                model["moduleName"] = spec.get("moduleName", model["moduleName"])
            app_id = self.state.new_id()
            app = {"id": app_id, "name": payload["name"], "projectId": project_id, "dpkName": dpk["name"],
                   "dpkVersion": dpk["version"], "dpkId": dpk["id"], "status": "installed", "scope": "project",
                   "customInstallation": installation, "metadata": {}, "creator": self.state.user["email"],
                   "createdAt": now_iso(), "updatedAt": now_iso(), "url": f"{self.state.base_url}/apps/{app_id}"}
            self.state.apps[app_id] = app
            return Reply(copy.deepcopy(app))

    @route("POST", "/ml/models/query")
    def query_models(self, request: Request) -> Reply:
        """`project.models.get(model_name=...)`, `models.list`: models by DQL (dtlpy adds `projectId`)."""
        query = request.json() or {}
        dql.check_query_keys(query)
        with self.state.lock:
            return Reply(copy.deepcopy(dql.run(self.state.models.values(), query)))

    @route("POST", f"/ml/models/{ID}/clone")
    def clone_model(self, request: Request) -> Reply:
        """`model.clone(model_name, dataset)` (dtlpy Models.clone): a new model from the given fields
        (configuration, types, project, dataset, labels, subsets); answered ready ('created'), so dtlpy's
        wait_for_model_ready returns at once. Cloning a model that has artifacts is not simulated: refused."""
        source_id, payload = request.match[1], request.json() or {}
        with self.state.lock:
            source = self.state.models[source_id]
            if source["artifacts"]:
                raise dql.UnsupportedQuery("cloning a model that has artifacts (the platform copies them)")
            if any(m["name"] == payload["name"] and m["projectId"] == payload["projectId"]
                   for m in self.state.models.values()):
                return error(400, f"model {payload['name']!r} already exists in the project")
            metadata = copy.deepcopy(payload.get("metadata") or {})
            model = self.state.add_model(payload["projectId"], payload["name"], payload.get("configuration", {}),
                                         dataset_id=payload.get("datasetId"), labels=payload.get("labels"),
                                         input_type=payload.get("inputType", source["inputType"]),
                                         output_type=payload.get("outputType", source["outputType"]),
                                         subsets=metadata.get("system", {}).get("subsets"),
                                         status=payload.get("status", "created"), package_id=source["packageId"],
                                         metadata=metadata)
            model["moduleName"] = source["moduleName"]
            return Reply(copy.deepcopy(model))

    @route("POST", f"/ml/models/{ID}/train")
    def model_train(self, request: Request) -> Reply:
        """`model.train()`: an execution of the model service's `train_model` on the model, run before
        answering (the agent's side: a fresh adapter's train_model, see contract tests' runner)."""
        model_id, payload = request.match[1], request.json() or {}
        execution = self._start_execution(model_id, payload, "train_model", {"model": {"model_id": model_id}})
        self._run_execution(execution)
        with self.state.lock:
            return Reply(copy.deepcopy(execution))

    @route("POST", f"/ml/models/{ID}/evaluate")
    def model_evaluate(self, request: Request) -> Reply:
        """`model.evaluate(dataset_id, filters)` (dtlpy Models.evaluate: {input: {datasetId, datasetQuery}}): an
        execution of the model service's `evaluate_model` on {model, dataset, filters}, run before answering."""
        model_id, payload = request.match[1], request.json() or {}
        given = payload.get("input") or {}
        execution = self._start_execution(model_id, payload, "evaluate_model",
                                          {"model": {"model_id": model_id},
                                           "dataset": {"dataset_id": given["datasetId"]},
                                           "filters": given.get("datasetQuery")})
        self._run_execution(execution)
        with self.state.lock:
            return Reply(copy.deepcopy(execution))

    @route("POST", f"/ml/models/{ID}/deploy")
    def model_deploy(self, request: Request) -> Reply:
        """`model.deploy()`: a model service (`PlatformState.add_service`); the model lists it
        (`metadata.system.deploy.services`, which `models.embed/predict/embed_datasets` read) and is
        'deployed' at once. Not simulated: replicas, autoscaling, the service's own start
        (load_from_model runs per execution in the runner), `serviceConfig`."""
        model_id = request.match[1]
        with self.state.lock:
            model = self.state.models[model_id]
            if model["status"] != "deployed":
                model["statusLogs"].append({"status": "deployed", "createdAt": now_iso()})
            service = self.state.add_service(model_id, module_name=model["moduleName"])
            return Reply(copy.deepcopy(service))

    # ---- executions, commands ----------------------------------------------------------------
    @route("GET", f"/commands/{ID}")
    def get_command(self, request: Request) -> Reply:
        """A command (exports, embed_datasets): the fake's are finished when they are answered."""
        return self._document("commands", request)

    @route("GET", f"/executions/{ID}")
    def get_execution(self, request: Request) -> Reply:
        return self._document("executions", request)

    @route("POST", "/query/faas")
    def query_faas(self, request: Request) -> Reply:
        query = request.json() or {}
        dql.check_query_keys(query)
        if query.get("resource") != "executions":
            raise dql.UnsupportedQuery(f"FaaS query of resource {query.get('resource')!r}")
        with self.state.lock:
            return Reply(copy.deepcopy(dql.run(self.state.executions.values(), query)))


@dataclass
class Network:
    """A network between dtlpy and the fake (benchmarks; none in tests): each request waits
    `latency_s`, plus its request and reply bodies at `bytes_per_s` (per request, like one stream)."""

    latency_s: float = 0.0
    bytes_per_s: Optional[float] = None
    in_flight: int = 0          # requests being answered now
    most_in_flight: int = 0     # the most at once since it was last set to 0 (how parallel the client is)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def delay(self, nbytes: int) -> float:
        return self.latency_s + (nbytes / self.bytes_per_s if self.bytes_per_s else 0.0)

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1


class _Handler(BaseHTTPRequestHandler):
    gate: FakeGate  # set on the subclass made per server
    network: Network  # likewise
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        log.debug("fake Dataloop: " + format, *args)

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        with self.network.answering():
            self._answer()

    def _answer(self) -> None:
        body = self._body()
        try:
            reply = self.gate.handle(self.command, self.path, self.headers, body)
        except Exception:  # noqa: BLE001 - a bug in the fake: answer 500 with the traceback
            log.exception("fake Dataloop: error in %s %s", self.command, self.path)
            reply = error(500, "fake platform error:\n" + traceback.format_exc())
        wait = self.network.delay(len(body) + len(reply.data))
        if wait > 0:
            time.sleep(wait)
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.data)))
        self.send_header("x-request-id", "fake")
        self.end_headers()
        self.wfile.write(reply.data)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve


class FakeDataloopServer:
    """The HTTP server in a daemon thread. `url` is dtlpy's environment (`http://127.0.0.1:<port>/api/v1`)."""

    def __init__(self, latency_s: float = 0.0, bytes_per_s: Optional[float] = None):
        self.state = PlatformState()
        self.network = Network(latency_s, bytes_per_s)  # change its fields to change the network live
        handler = type("Handler", (_Handler,), {"gate": FakeGate(self.state), "network": self.network})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{API_PREFIX}"
        self.state.base_url = self.url
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fake-dataloop", daemon=True)

    def start(self) -> "FakeDataloopServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def reset(self) -> PlatformState:
        """A fresh, empty platform on the same address (the gate's handlers read `state` live)."""
        fresh = PlatformState(self.url)
        gate = self.httpd.RequestHandlerClass.gate
        gate.state = fresh
        self.state = fresh
        return fresh
