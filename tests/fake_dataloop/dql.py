"""The part of Dataloop's query language (DQL) the platform flows use, evaluated on JSON documents.

A filter is a JSON object: every key must match. Keys are `$and`/`$or` (lists of filters) or
dotted field paths (`metadata.system.model.name`) whose value is either a plain value (equality;
a list field matches when it contains the value; a string with `*` is a glob on `filename`/`dir`)
or an operator object: `$eq $ne $in $nin $exists $gt $gte $lt $lte $glob`.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

MISSING = object()
GLOB_FIELDS = ("filename", "dir")


class UnsupportedQuery(ValueError):
    """A DQL construct this fake does not evaluate; reported to the client as a 400, and logged."""


def field_value(document: dict, path: str) -> Any:
    value: Any = document
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def glob_matches(value: Any, pattern: str) -> bool:
    """Dataloop globs on paths: `*` (and `**`) match any characters, `/` included."""
    if not isinstance(value, str):
        return False
    regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(regex, value) is not None


def _equals(value: Any, expected: Any) -> bool:
    if isinstance(value, list) and not isinstance(expected, list):
        return expected in value
    return value == expected


def _compare(value: Any, operand: Any, op: str) -> bool:
    if value is MISSING or value is None:
        return False
    try:
        return {"$gt": value > operand, "$gte": value >= operand,
                "$lt": value < operand, "$lte": value <= operand}[op]
    except TypeError:
        return False


def _operator_matches(value: Any, op: str, operand: Any) -> bool:
    if op == "$eq":
        return value is not MISSING and _equals(value, operand)
    if op == "$ne":
        return value is MISSING or not _equals(value, operand)
    if op == "$in":
        return value is not MISSING and any(_equals(value, o) for o in operand)
    if op == "$nin":
        return value is MISSING or not any(_equals(value, o) for o in operand)
    if op == "$exists":
        return (value is not MISSING and value is not None) == bool(operand)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        return _compare(value, operand, op)
    if op == "$glob":
        return glob_matches(value, operand)
    raise UnsupportedQuery(f"DQL operator {op!r} is not implemented by the fake platform")


def matches(document: dict, query: Any) -> bool:
    if query is None or query == {}:
        return True
    if not isinstance(query, dict):
        raise UnsupportedQuery(f"DQL filter must be an object, got {query!r}")
    for key, expected in query.items():
        if key == "$and":
            if not all(matches(document, q) for q in expected):
                return False
        elif key == "$or":
            if expected and not any(matches(document, q) for q in expected):
                return False
        elif key.startswith("$"):
            raise UnsupportedQuery(f"DQL key {key!r} is not implemented by the fake platform")
        else:
            value = field_value(document, key)
            if isinstance(expected, dict) and expected and all(k.startswith("$") for k in expected):
                if not all(_operator_matches(value, op, operand) for op, operand in expected.items()):
                    return False
            elif isinstance(expected, str) and "*" in expected and key.split(".")[-1] in GLOB_FIELDS:
                if not glob_matches(value, expected):
                    return False
            elif not (value is not MISSING and _equals(value, expected)):
                return False
    return True


def sort_documents(documents: Iterable[dict], sort: dict | None) -> list[dict]:
    """`sort: {"field": "ascending"|"descending"}` (several keys: the first is the primary)."""
    result = list(documents)
    for key, direction in reversed(list((sort or {"id": "ascending"}).items())):
        descending = str(direction).lower() in ("descending", "desc", "-1")
        result.sort(key=lambda d: _sort_key(field_value(d, key)), reverse=descending)
    return result


def _sort_key(value: Any):
    return (value is MISSING or value is None, "" if value is MISSING or value is None else str(value))


def run(documents: Iterable[dict], query: dict, presorted: bool = False) -> dict:
    """A DQL query (`filter`, `sort`, `page`, `pageSize`) on documents: the gate's paged answer."""
    found = [d for d in documents if matches(d, query.get("filter"))]
    return page_of(found if presorted else sort_documents(found, query.get("sort")), query)


def page_of(documents: list[dict], query: dict) -> dict:
    """The page a query asks for (default: the first 1000)."""
    return page(documents, int(query.get("page", 0)), int(query.get("pageSize", 1000)))


def page(documents: list[dict], page_number: int, page_size: int) -> dict:
    """Dataloop's paged answer. pageSize 0 means: the count only."""
    total = len(documents)
    if page_size <= 0:
        return {"items": [], "totalItemsCount": total, "totalPagesCount": 0 if total == 0 else 1,
                "hasNextPage": False}
    start = page_number * page_size
    pages = (total + page_size - 1) // page_size
    return {"items": documents[start:start + page_size], "totalItemsCount": total, "totalPagesCount": pages,
            "hasNextPage": start + page_size < total}


__all__ = ["matches", "run", "page_of", "sort_documents", "page", "field_value", "glob_matches", "UnsupportedQuery"]
