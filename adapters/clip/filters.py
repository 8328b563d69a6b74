"""Metadata filters (the SQL half of search filters) and the typing of metadata values they compare.

`Condition` is one `key OP value` on an item's metadata JSON; store.py turns a list of them into
a WHERE clause, search.py parses them from `--where`. Numbers written as text are typed here so
that `year>=2020` compares numerically whatever the stored type.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import sqlite3
from dataclasses import dataclass
from typing import Any, Optional

from .errors import InputError

_WHERE = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(!=|>=|<=|=|>|<|~)\s*(.*?)\s*$")
_SQL_OPS = {"=": "=", "!=": "!=", ">=": ">=", "<=": "<=", ">": ">", "<": "<", "~": "GLOB"}
# Text that is a number and nothing else: "2019", "-3.5", "1e6"; not "007" (an id keeps its zeros), "NaN", "1,5".
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
NUMBER_SQL_FUNCTION = "clip_number"
PERIOD_SQL_FUNCTION = "clip_period"
FOLD_SQL_FUNCTION = "clip_fold"  # SQLite's lower() folds ASCII only: "ÉCLAIR" would stay
# A period as people write one on a date field: 2021, 2021-06, 2021-06-15.
_PERIOD = re.compile(r"\d{4}(?:-\d{2}(?:-\d{2})?)?")
# A stored date: ISO 8601, as photos.py writes `taken` ("2021-06-15T10:20:30").
_STORED_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ][\d:.]+)?(?:Z|[+-]\d{2}:?\d{2})?")


def typed_value(value: Any) -> Any:
    """Numbers written as text (a CSV column, a JSON string, `--meta year=2019`) become numbers."""
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            if not any(c in text for c in ".eE"):
                return int(text)
            number = float(text)
            return number if math.isfinite(number) else value
        return value
    if isinstance(value, dict):
        return {key: typed_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed_value(item) for item in value]
    return value


def typed_metadata(metadata: Optional[dict[str, Any]]) -> dict[str, Any]:
    return typed_value(dict(metadata or {}))


def _sql_number(value: Any) -> Optional[float]:
    """SQL `clip_number(x)`: x as a number when it is one (or text that is one), else NULL.

    Stores written before metadata was typed hold CSV numbers as text; SQLite orders any text
    above any number, so `year>=2020` compared them wrongly. Comparing through this function
    makes the comparison numeric whenever both sides are numbers, whatever the stored type.
    """
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        typed = typed_value(value)
        return typed if isinstance(typed, (int, float)) else None
    return None


def _sql_period(value: Any, length: int) -> Optional[str]:
    """SQL `clip_period(x, n)`: the first n characters of a stored ISO date (n=4: its year, 7: its
    month), else NULL. So `taken>=2021` compares the year taken with 2021, not a date with a number."""
    if isinstance(value, str) and _STORED_DATE.fullmatch(value.strip()):
        return value.strip()[:length]
    return None


def register_sql_functions(conn: sqlite3.Connection) -> None:
    conn.create_function(NUMBER_SQL_FUNCTION, 1, _sql_number, deterministic=True)
    conn.create_function(PERIOD_SQL_FUNCTION, 2, _sql_period, deterministic=True)
    conn.create_function(FOLD_SQL_FUNCTION, 1, lambda v: v.casefold() if isinstance(v, str) else v,
                         deterministic=True)


@dataclass(frozen=True)
class Condition:
    """`key OP value` on an item's metadata JSON; `~` is a glob (`camera~canon*`), case-insensitive.

    A number (`year>=2020`, `year="2019"`) compares numerically with numbers stored as numbers or
    as text; any other value compares as text. On a date (`taken`, ISO 8601) a bare year or
    year-month means that period: `taken=2021-06` is any day of June 2021, `taken<2016` before 2016,
    `taken>=2021` from 2021 on.
    """

    key: str
    op: str
    value: Any

    @classmethod
    def parse(cls, text: str) -> "Condition":
        match = _WHERE.match(text)
        if not match:
            raise InputError(f"cannot read the condition {text!r}; write KEY=VALUE, KEY!=VALUE, KEY>N, KEY<=N "
                             f"or KEY~GLOB (nested keys with dots: exif.camera=Canon)")
        key, op, raw = match.groups()
        value: Any = raw
        if op != "~":
            with contextlib.suppress(ValueError):
                value = json.loads(raw)
            value = typed_value(value)
        if isinstance(value, (dict, list)):
            value = raw
        return cls(key, op, value)

    @property
    def json_path(self) -> str:
        return "$" + "".join(f'."{part}"' for part in self.key.split("."))

    @property
    def period(self) -> Optional[str]:
        """The value as a period of dates ('2021', '2021-06', '2021-06-15'), when it reads as one."""
        if self.op == "~" or isinstance(self.value, bool):
            return None
        text = str(self.value) if isinstance(self.value, (int, str)) else ""
        return text if _PERIOD.fullmatch(text) else None

    def sql(self) -> tuple[str, list[Any]]:
        json_path = self.json_path
        if self.value is None:
            return f"json_extract(metadata, ?) IS {'NOT ' if self.op == '!=' else ''}NULL", [json_path]
        value = int(self.value) if isinstance(self.value, bool) else self.value
        if self.op == "~":  # globs read as people write them: camera~canon* finds "Canon EOS 5D"
            return (f"{FOLD_SQL_FUNCTION}(json_extract(metadata, ?)) GLOB {FOLD_SQL_FUNCTION}(?)",
                    [json_path, str(value)])
        if isinstance(value, (int, float)):
            clause, params = f"{NUMBER_SQL_FUNCTION}(json_extract(metadata, ?)) {_SQL_OPS[self.op]} ?", [json_path, value]
        else:
            clause, params = f"json_extract(metadata, ?) {_SQL_OPS[self.op]} ?", [json_path, value]
        period = self.period
        if period is None:
            return clause, params
        # a stored date compares by its period; any other stored value as before
        return (f"COALESCE({PERIOD_SQL_FUNCTION}(json_extract(metadata, ?), {len(period)}) {_SQL_OPS[self.op]} ?, "
                f"{clause})", [json_path, period, *params])
