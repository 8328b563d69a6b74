"""The fake platform follows Dataloop's documented behaviour (docs/platform-tests.md cites each point),
asked through dtlpy's own repositories where dtlpy has a call for it, else as the public app asks.

Each test is a behaviour the fake once got wrong or did not serve: `*` vs `**`, joins by resource,
wildcards, `$exists` on null, numeric sort, `context.projects`, `projectId`, the feature-vector
listing, `embed_datasets`; and a query form it does not implement must fail, never answer an empty page.
"""
from __future__ import annotations

import dtlpy as dl
import pytest
import requests

from fake_dataloop import offline_token


@pytest.fixture
def project(platform):
    return platform.add_project("fake-checks")


@pytest.fixture
def tree(platform, project):
    """Items at three depths, one of them a text item, with a user number to sort on."""
    dataset = platform.add_dataset(project["id"], "tree")
    paths = ["/a/top.png", "/a/b/mid.png", "/a/b/c/deep.png", "/a/note.txt", "/z.png"]
    for number, path in zip((10, 2, 33, 4, 1), paths):
        platform.add_item(dataset["id"], path, b"x", metadata={"user": {"n": number}})
    return dl.datasets.get(dataset_id=dataset["id"])


def names(pages) -> list[str]:
    return sorted(item.filename for item in pages.all())


def test_a_star_stops_at_slash_and_a_double_star_is_recursive(tree):
    """dtlpy's docs: '/winter/is/coming/*' is a folder's files, '/fighting/**' the folder recursively."""
    assert names(tree.items.list(filters=dl.Filters(field="filename", values="/a/*"))) == [
        "/a/note.txt", "/a/top.png"]
    assert names(tree.items.list(filters=dl.Filters(field="filename", values="/a/**"))) == [
        "/a/b/c/deep.png", "/a/b/mid.png", "/a/note.txt", "/a/top.png"]
    assert names(tree.items.list(filters=dl.Filters(field="dir", values="/a/b*"))) == ["/a/b/mid.png"]
    # dtlpy itself adds '/**' to a folder given as a filename (Filters recursive, SingleFilter.__add_recursive)
    assert names(tree.items.list(filters=dl.Filters(field="filename", values="/a/b"))) == [
        "/a/b/c/deep.png", "/a/b/mid.png"]


def test_mimetype_takes_a_wildcard(tree):
    filters = dl.Filters(field="metadata.system.mimetype", values="image/*")
    assert len(names(tree.items.list(filters=filters))) == 4


def test_exists_true_matches_a_field_that_holds_null(platform, project):
    dataset = platform.add_dataset(project["id"], "nulls")
    platform.add_item(dataset["id"], "/with-null.png", b"x", metadata={"user": {"tag": None}})
    platform.add_item(dataset["id"], "/without.png", b"x")
    dataset = dl.datasets.get(dataset_id=dataset["id"])
    exists = dl.Filters(field="metadata.user.tag", values=True, operator=dl.FiltersOperations.EXISTS)
    assert names(dataset.items.list(filters=exists)) == ["/with-null.png"]
    missing = dl.Filters(field="metadata.user.tag", values=False, operator=dl.FiltersOperations.EXISTS)
    assert names(dataset.items.list(filters=missing)) == ["/without.png"]


def test_sort_compares_numbers_as_numbers(tree):
    filters = dl.Filters(field="metadata.system.mimetype", values="image/*")
    filters.sort_by(field="metadata.user.n", value=dl.FiltersOrderByDirection.DESCENDING)
    page = tree.items.list(filters=filters).items
    assert [item.metadata["user"]["n"] for item in page] == [33, 10, 2, 1]


def test_items_carry_their_project(tree, project):
    item = tree.items.list().items[0]
    assert item.project_id == project["id"] and item.project.id == project["id"]


def seed_vectors(platform, project, dataset_id, name="vectors"):
    feature_set = {"id": platform.new_id(), "name": name, "size": 2, "project": project["id"], "type": "x",
                   "entityType": "item", "modelId": None, "tags": [], "url": "", "createdAt": "", "creator": ""}
    platform.feature_sets[feature_set["id"]] = feature_set
    items = [i for i in platform.items.values() if i["datasetId"] == dataset_id]
    for number, item in enumerate(items[:3]):
        feature_id = platform.new_id()
        platform.features[feature_id] = {"id": feature_id, "entityId": item["id"], "value": [float(number), 1.0],
                                         "featureSetId": feature_set["id"], "project": project["id"],
                                         "datasetId": dataset_id, "createdAt": "", "creator": ""}
    return feature_set, items[:3]


def test_feature_sets_are_listed_within_their_project(platform, project, tree):
    other = platform.add_project("another")
    mine, _ = seed_vectors(platform, project, tree.id, name="clip")
    seed_vectors(platform, other, tree.id, name="clip")
    listed = dl.projects.get(project_id=project["id"]).feature_sets.list()
    assert [f.id for f in listed.all()] == [mine["id"]]


def test_feature_vectors_are_listed_by_feature_set_in_pages(platform, project, tree):
    """What dtlpy's `feature_set.features.list()` calls (clip-smart-search reads its vectors so)."""
    feature_set, items = seed_vectors(platform, project, tree.id)
    listed = dl.feature_sets.get(feature_set_id=feature_set["id"]).features.list()
    assert sorted(f.entity_id for f in listed.all()) == sorted(i["id"] for i in items)
    filters = dl.Filters(resource=dl.FiltersResource.FEATURE, page_size=2)
    filters.add(field="featureSetId", values=feature_set["id"])
    pages = dl.feature_sets.get(feature_set_id=feature_set["id"]).features.list(filters=filters)
    assert pages.total_pages_count == 2 and len(list(pages.all())) == 3
    assert "POST /features/vectors/query" in platform.requests


def gate_query(platform, dataset_id: str, query: dict) -> requests.Response:
    return requests.post(f"{platform.base_url}/datasets/{dataset_id}/query", json=query,
                         headers={"Authorization": f"Bearer {offline_token()}"}, timeout=30)


def test_a_feature_vectors_join_matches_items_with_vectors_not_annotations(platform, project, tree):
    """clip-smart-search's count of items with vectors (its panel's query, verbatim in shape)."""
    feature_set, with_vectors = seed_vectors(platform, project, tree.id)
    annotated = next(i for i in platform.items.values() if i["datasetId"] == tree.id and i not in with_vectors)
    platform.add_annotation(annotated["id"], "class", "cat", metadata={"featureSetId": feature_set["id"]})
    query = {"filter": {"$and": [{"$or": [{"metadata.system.mimetype": "image/*"},
                                          {"metadata.system.mimetype": "text/*"}]},
                                 {"hidden": False}, {"type": "file"}]},
             "resource": "items", "page": 0, "pageSize": 0,
             "join": {"on": {"resource": "feature_vectors", "local": "entityId", "forigen": "id"},
                      "filter": {"featureSetId": feature_set["id"]}}}
    answer = gate_query(platform, tree.id, query)
    assert answer.status_code == 200 and answer.json()["totalItemsCount"] == 3
    annotation_join = dl.Filters()
    annotation_join.add_join(field="label", values="cat")
    assert names(tree.items.list(filters=annotation_join)) == [annotated["filename"]]


@pytest.mark.parametrize("query", [
    {"filter": {"name": "*.png"}},                                                     # a wildcard off the documented fields
    {"filter": {"metadata.user.n": {"$regex": "1"}}},                                  # an operator the fake lacks
    {"filter": {}, "join": {"on": {"resource": "tasks", "local": "x", "forigen": "id"}, "filter": {}}},
    {"filter": {}, "join": {"on": {"resource": "feature_vectors", "local": "itemId", "forigen": "id"},
                            "filter": {}}},                                            # not the documented keys
    {"filter": {}, "references": {"operation": "x"}},                                  # a query key it would ignore
    {"filter": {}, "join": {"on": {"resource": "feature_vectors", "local": "entityId", "forigen": "id"},
                            "filter": {"value": {"$euclid": {"input": [0, 1], "$euclidSort": {"eu_dist": "descending"}}}}}},
])
def test_a_query_the_fake_does_not_implement_fails_loudly(platform, tree, query):
    answer = gate_query(platform, tree.id, {"resource": "items", **query})
    assert answer.status_code == 400 and "not implemented by the fake platform" in answer.json()["message"]
    assert len(platform.unimplemented) == 1
    platform.unimplemented.clear()  # expected here; the fixture fails any other test on it


def test_embed_datasets_runs_the_services_embed_dataset_per_dataset(platform, project, tree):
    """`model.embed_datasets` (what the README and Dataloop's CLIP tutorial call): a command dtlpy waits
    for; the fake runs the model service's embed_dataset once per dataset (a test-supplied runner here;
    the tutorial's contract test runs the real adapter)."""
    second = platform.add_dataset(project["id"], "second")
    record = platform.add_model(project["id"], f"m-{platform.new_id()[-6:]}", {}, service_ids=("service-1",))
    ran = []
    platform.execution_runner = lambda execution: ran.append(
        (execution["functionName"], execution["input"]["dataset"]["dataset_id"], execution["input"]["filters"]))
    command = dl.models.get(model_id=record["id"]).embed_datasets(dataset_ids=[tree.id, second["id"]])
    assert command.status == "success"
    assert ran == [("embed_dataset", tree.id, None), ("embed_dataset", second["id"], None)]
