"""The part of Dataloop's query language (DQL) the platform flows use, evaluated on JSON documents.

A filter is a JSON object: every key must match. Keys are `$and`/`$or` (lists of filters) or
dotted field paths (`metadata.system.model.name`) whose value is either a plain value (equality;
a list field matches when it contains the value; a string with `*` is a wildcard on the fields
the docs use wildcards on, GLOB_FIELDS) or an operator object: `$eq $ne $in $nin $exists $gt $gte
$lt $lte`. The operators are MongoDB's (dtlpy's FiltersOperations names them one to one), so they
behave as MongoDB's do where Dataloop's docs say nothing more: `$exists: true` matches a field
that holds null, and sort orders numbers as numbers. docs/platform-tests.md cites the source of each.

Anything else (another operator, a wildcard on another field, a query key the fake does not
read) raises UnsupportedQuery: the route answers 400 and the test fails, never an empty page.
"""
from __future__ import annotations

import numbers
import re
from typing import Any, Iterable

MISSING = object()
# Fields on which a string value with `*` is a wildcard. filename, dir: dtlpy's Filters (recursive
# `/**`, SingleFilter.__add_recursive) and its docs ('/fighting/**', '/winter/is/coming/*');
# mimetype: Dataloop's DQL docs ("mimetype" set to "video*") and clip-smart-search ("image/*").
GLOB_FIELDS = frozenset({"filename", "dir", "metadata.system.mimetype"})
OPERATORS = frozenset({"$eq", "$ne", "$in", "$nin", "$exists", "$gt", "$gte", "$lt", "$lte"})
# The keys of a query dtlpy's Filters.prepare writes that the fake reads (resource: by the route).
QUERY_KEYS = frozenset({"filter", "sort", "page", "pageSize", "resource", "join", "context"})


class UnsupportedQuery(ValueError):
    """A DQL construct this fake does not evaluate; reported to the client as a 400, and logged."""


def field_value(document: dict, path: str) -> Any:
    value: Any = document
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def glob_regex(pattern: str) -> re.Pattern:
    """Dataloop path wildcards: `**` matches anything, `/` included; `*` anything but `/`.

    dtlpy writes `/dir/**` when it means "recursively" (SingleFilter.__add_recursive) and its docs
    say so ("'/fighting/**' # Get files from directory (recursive)"); `/dir/*` is the directory's own
    files ("'/winter/is/coming/*'")."""
    parts = re.split(r"(\*\*|\*)", pattern)
    regex = "".join(".*" if p == "**" else "[^/]*" if p == "*" else re.escape(p) for p in parts)
    return re.compile(regex)


def glob_matches(value: Any, pattern: str) -> bool:
    return isinstance(value, str) and glob_regex(pattern).fullmatch(value) is not None


def _equals(value: Any, expected: Any) -> bool:
    if isinstance(value, list) and not isinstance(expected, list):
        return expected in value
    return value == expected


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _compare(value: Any, operand: Any, op: str) -> bool:
    """MongoDB's comparison: only values of the same kind compare (numbers with numbers, strings
    with strings); anything else (null, missing, another type) does not match."""
    if not ((_is_number(value) and _is_number(operand)) or (isinstance(value, str) and isinstance(operand, str))):
        return False
    return {"$gt": value > operand, "$gte": value >= operand, "$lt": value < operand, "$lte": value <= operand}[op]


def _operator_matches(key: str, value: Any, op: str, operand: Any) -> bool:
    if op == "$eq":
        return _value_matches(key, value, operand)
    if op == "$ne":
        return not _value_matches(key, value, operand)
    if op == "$in":
        return any(_value_matches(key, value, o) for o in _operand_list(op, operand))
    if op == "$nin":
        return not any(_value_matches(key, value, o) for o in _operand_list(op, operand))
    if op == "$exists":  # MongoDB: true matches a field that is there, null included
        return (value is not MISSING) == bool(operand)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        return _compare(value, operand, op)
    raise UnsupportedQuery(f"DQL operator {op!r} (on {key!r}) is not implemented by the fake platform")


def _operand_list(op: str, operand: Any) -> list:
    if not isinstance(operand, list):
        raise UnsupportedQuery(f"DQL {op} needs a list, got {operand!r}")
    return operand


def _value_matches(key: str, value: Any, expected: Any) -> bool:
    """Equality (null also matches a missing field, as in MongoDB), or a wildcard where the docs use
    one (GLOB_FIELDS); a `*` elsewhere is refused."""
    if expected is None:
        return value is MISSING or value is None
    if isinstance(expected, str) and "*" in expected:
        if key not in GLOB_FIELDS:
            raise UnsupportedQuery(f"a wildcard in {key!r} ({expected!r}): the fake follows wildcards only on "
                                   f"{sorted(GLOB_FIELDS)}, where Dataloop documents them")
        return glob_matches(value, expected)
    return value is not MISSING and _equals(value, expected)


def is_operator_object(expected: Any) -> bool:
    return isinstance(expected, dict) and bool(expected) and all(k.startswith("$") for k in expected)


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
            if is_operator_object(expected):
                if not all(_operator_matches(key, value, op, operand) for op, operand in expected.items()):
                    return False
            elif not _value_matches(key, value, expected):
                return False
    return True


def check_filter(query: Any) -> None:
    """Refuse what `matches` would refuse, before any document is looked at: a query the fake cannot
    evaluate must fail even where there is nothing to match it against (an empty page would hide it)."""
    if query is None or query == {}:
        return
    if not isinstance(query, dict):
        raise UnsupportedQuery(f"DQL filter must be an object, got {query!r}")
    for key, expected in query.items():
        if key in ("$and", "$or"):
            if not isinstance(expected, list):
                raise UnsupportedQuery(f"DQL {key} needs a list, got {expected!r}")
            for part in expected:
                check_filter(part)
        elif key.startswith("$"):
            raise UnsupportedQuery(f"DQL key {key!r} is not implemented by the fake platform")
        elif is_operator_object(expected):
            for op, operand in expected.items():
                if op not in OPERATORS:
                    raise UnsupportedQuery(f"DQL operator {op!r} (on {key!r}) is not implemented by the fake platform")
                for value in (operand if op in ("$in", "$nin") else [operand]):
                    _check_value(key, value)
        else:
            _check_value(key, expected)


def _check_value(key: str, expected: Any) -> None:
    if isinstance(expected, str) and "*" in expected and key not in GLOB_FIELDS:
        _value_matches(key, MISSING, expected)  # raises, with the message


def select(documents: Iterable[dict], query: Any) -> list[dict]:
    """The documents a DQL filter matches (checked first, see check_filter)."""
    check_filter(query)
    return [d for d in documents if matches(d, query)]


def sort_documents(documents: Iterable[dict], sort: dict | None) -> list[dict]:
    """`sort: {"field": "ascending"|"descending"}` (several keys: the first is the primary)."""
    result = list(documents)
    if not isinstance(sort or {}, dict):
        raise UnsupportedQuery(f"DQL sort must be an object, got {sort!r}")
    for key, direction in reversed(list((sort or {"id": "ascending"}).items())):
        if str(direction).lower() not in ("ascending", "descending", "asc", "desc", "1", "-1"):
            raise UnsupportedQuery(f"DQL sort direction {direction!r} for {key!r}")
        descending = str(direction).lower() in ("descending", "desc", "-1")
        result.sort(key=lambda d: sort_key(field_value(d, key)), reverse=descending)
    return result


def sort_key(value: Any) -> tuple:
    """MongoDB's order across types: missing and null, then numbers (as numbers), then strings,
    objects, lists, booleans."""
    if value is MISSING or value is None:
        return (0, 0)
    if _is_number(value):
        return (1, value)
    if isinstance(value, str):
        return (2, value)
    if isinstance(value, dict):
        return (3, repr(sorted(value.items())))
    if isinstance(value, list):
        return (4, repr(value))
    if isinstance(value, bool):
        return (5, value)
    raise UnsupportedQuery(f"cannot sort on a value of type {type(value).__name__}")


def check_query_keys(query: dict, also: Iterable[str] = ()) -> None:
    """Refuse a query key the fake would otherwise ignore (an update, a reference query, ...)."""
    unknown = set(query) - QUERY_KEYS - set(also)
    if unknown:
        raise UnsupportedQuery(f"DQL query keys {sorted(unknown)} are not implemented by the fake platform")


def run(documents: Iterable[dict], query: dict, presorted: bool = False) -> dict:
    """A DQL query (`filter`, `sort`, `page`, `pageSize`) on documents: the gate's paged answer."""
    found = select(documents, query.get("filter"))
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


__all__ = ["matches", "run", "page_of", "sort_documents", "sort_key", "page", "field_value", "glob_matches",
           "glob_regex", "check_query_keys", "check_filter", "select", "is_operator_object", "UnsupportedQuery", "GLOB_FIELDS", "OPERATORS"]
