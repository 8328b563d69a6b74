"""Vector search in item queries: the join of items on their `feature_vectors`, with `$euclid`.

What it follows (docs/platform-tests.md cites each):
- dtlpy-documentation, tutorials/data_management/feature_vectors/chapter.md, "Finding Similar Items":
  `join: {on: {resource: "feature_vectors", local: "entityId", forigen: "id"}, filter: {value: {$euclid:
  {input, $euclidSort: {eu_dist: "ascending"}}}, featureSetId}}`, where `input` is a vector or a feature
  vector id, and `$euclidFilter: {<$eq | $lte | ...>: <distance>}` keeps the items within a distance;
  the query's `filter`, `page` and `pageSize` apply as in any items query.
- dataloop-ai-apps/clip-smart-search entire.js: the same join without `value` (the items that have a
  vector in the set: its count check) and with `datasetId` beside `featureSetId` in the join's filter.

Anything else in such a join (another `on`, another operator under `value`, another sort key or
direction, a `sort` beside `$euclidSort`) is answered "not implemented", never with a guess.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional

from . import dql

JOIN_ON = {"resource": "feature_vectors", "local": "entityId", "forigen": "id"}
DISTANCE_OPERATORS = ("$eq", "$ne", "$lt", "$lte", "$gt", "$gte")
EUCLID_KEYS = {"input", "$euclidSort", "$euclidFilter"}


def join_items(items: list[dict], join: dict, features: Iterable[dict], sort: Optional[dict]) -> list[dict]:
    """`items` (already filtered by the query's `filter`) that have a matching vector, in the order the
    query asks: by distance when `$euclidSort` says so, else by `sort`."""
    if join.get("on") != JOIN_ON:
        raise dql.UnsupportedQuery(f"feature_vectors join on {join.get('on')!r} (the documented one: {JOIN_ON})")
    condition = dict(join.get("filter") or {})
    euclid = _euclid_of(condition.pop("value", None))
    vectors = dql.select(features, condition)
    by_item: dict[str, list[dict]] = {}
    for feature in vectors:
        by_item.setdefault(feature["entityId"], []).append(feature)
    joined = [item for item in items if item["id"] in by_item]
    if euclid is None:
        return dql.sort_documents(joined, sort)
    query = _input_vector(euclid["input"], features)
    distances = {item["id"]: min(_distance(query, f["value"]) for f in by_item[item["id"]]) for item in joined}
    bounds = euclid.get("$euclidFilter") or {}
    joined = [item for item in joined if all(_within(distances[item["id"]], op, limit) for op, limit in bounds.items())]
    if "$euclidSort" not in euclid:
        return dql.sort_documents(joined, sort)
    if sort:
        raise dql.UnsupportedQuery("a query 'sort' together with $euclidSort")
    if euclid["$euclidSort"] != {"eu_dist": "ascending"}:
        raise dql.UnsupportedQuery(f"$euclidSort {euclid['$euclidSort']!r} (documented: {{eu_dist: ascending}})")
    return sorted(joined, key=lambda item: (distances[item["id"]], item["id"]))


def _euclid_of(value: Any) -> Optional[dict]:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"$euclid"}:
        raise dql.UnsupportedQuery(f"feature vector 'value' condition {value!r} (only $euclid is implemented)")
    euclid = value["$euclid"]
    if not isinstance(euclid, dict) or "input" not in euclid or set(euclid) - EUCLID_KEYS:
        raise dql.UnsupportedQuery(f"$euclid {euclid!r} (documented keys: {sorted(EUCLID_KEYS)}, input required)")
    for op in (euclid.get("$euclidFilter") or {}):
        if op not in DISTANCE_OPERATORS:
            raise dql.UnsupportedQuery(f"$euclidFilter operator {op!r}")
    return euclid


def _input_vector(given: Any, features: Iterable[dict]) -> list[float]:
    """A vector, or the id of a stored feature vector (what "Find Similar" sends)."""
    if isinstance(given, str):
        stored = next((f for f in features if f["id"] == given), None)
        if stored is None:
            raise KeyError(f"feature vector {given}")
        return list(stored["value"])
    if isinstance(given, list) and given and all(isinstance(x, (int, float)) for x in given):
        return [float(x) for x in given]
    raise dql.UnsupportedQuery(f"$euclid input of type {type(given).__name__} (a vector or a feature vector id)")


def _distance(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        raise dql.UnsupportedQuery(f"$euclid between a {len(a)}-d input and a {len(b)}-d stored vector")
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def _within(distance: float, op: str, limit: float) -> bool:
    return {"$eq": distance == limit, "$ne": distance != limit, "$lt": distance < limit,
            "$lte": distance <= limit, "$gt": distance > limit, "$gte": distance >= limit}[op]
