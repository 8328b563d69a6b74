"""The curation jobs on a local store: near-duplicate groups and diverse samples of its items.

The same library functions the platform functions use (duplicates.py, sampling.py), over the
store's vector matrix; results are JSON documents shaped like the platform's, with paths where the
platform has item ids, and contact sheets to look at them.

Locally "earliest created" is the file's modification time (what the store records; a copy made
later has a later one), ties broken by the smallest store id.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .duplicates import DEFAULT_THRESHOLD, find_duplicate_groups
from .errors import InputError
from .filters import Condition
from .sampling import diverse_sample
from .store import Store

MAX_SHEET_GROUPS = 60            # rows of a duplicates contact sheet (the JSON has every group)
MAX_SHEET_MEMBERS = 8            # images per row; a larger group says how many more it has


@dataclass
class Selection:
    """The live rows of a store that pass the filters, in matrix order, with their item ids."""
    rows: np.ndarray
    ids: np.ndarray
    vectors: np.ndarray

    @classmethod
    def of(cls, store: Store, subsets: Sequence[str] = (), where: Sequence[str | Condition] = (),
           path_glob: Optional[str] = None) -> "Selection":
        snapshot = store.snapshot()
        live = snapshot.live.copy()
        if subsets or where or path_glob:
            conditions = [c if isinstance(c, Condition) else Condition.parse(c) for c in where]
            allowed = np.zeros(snapshot.rows, dtype=bool)
            matched = store.rows_matching(subsets=list(subsets), where=conditions, path_glob=path_glob)
            allowed[matched[matched < snapshot.rows]] = True
            live &= allowed
        rows = np.flatnonzero(live)
        return cls(rows, snapshot.ids[rows], snapshot.vectors[rows] if len(rows) < snapshot.rows else snapshot.vectors)


@dataclass
class DuplicatesReport:
    groups: list[list[dict[str, Any]]]   # per group: {"id", "path", "cosine" (to the kept item)}, kept first
    missing: list[str]                   # files the store could not embed (no vector)
    threshold: float
    method: str
    items: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """Like the platform function's output: paths where the platform has item ids."""
        return {"groups": [[m["path"] for m in group] for group in self.groups], "missing": self.missing,
                "threshold": self.threshold}


@dataclass
class SampleReport:
    picks: list[dict[str, Any]]          # {"id", "path"} in pick order
    radius: float
    items: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"items": [p["path"] for p in self.picks], "radius": round(self.radius, 6)}


def _paths_and_times(store: Store, ids: np.ndarray) -> tuple[dict[int, str], dict[int, int]]:
    paths, times = {}, {}
    for record in store.items(ids.tolist()).values():
        paths[record.id], times[record.id] = record.path, record.mtime_ns
    return paths, times


def creation_order(store: Store, ids: np.ndarray) -> np.ndarray:
    """Rank of each id by (file modification time, id): the kept item of a group is the lowest."""
    times = dict(store.conn.execute("SELECT id, mtime_ns FROM items").fetchall())
    when = np.array([times.get(int(i), np.iinfo(np.int64).max) for i in ids], dtype=np.int64)
    ranked = np.lexsort((ids, when))
    order = np.empty(len(ids), dtype=np.int64)
    order[ranked] = np.arange(len(ids))
    return order


def store_duplicates(store: Store, threshold: float = DEFAULT_THRESHOLD, selection: Optional[Selection] = None,
                     *, progress: bool = False) -> DuplicatesReport:
    selection = selection or Selection.of(store)
    found = find_duplicate_groups(selection.vectors, threshold, creation_order(store, selection.ids),
                                  progress=progress)
    members = np.concatenate(found.groups) if found.groups else np.zeros(0, np.int64)
    paths, _ = _paths_and_times(store, selection.ids[members])
    groups = []
    for group in found.groups:
        kept = np.asarray(selection.vectors[group[0]], dtype=np.float64)
        kept /= np.linalg.norm(kept)
        entries = []
        for row in group:
            vector = np.asarray(selection.vectors[row], dtype=np.float64)
            item_id = int(selection.ids[row])
            entries.append({"id": item_id, "path": paths.get(item_id, f"<item {item_id}>"),
                            "cosine": round(float(vector @ kept / np.linalg.norm(vector)), 4)})
        groups.append(entries)
    missing = sorted(store.failures_in(everything=True))
    return DuplicatesReport(groups, missing, found.threshold, found.method, len(selection.ids), found.seconds)


def store_sample(store: Store, n: int, selection: Optional[Selection] = None, *,
                 exclude: Optional[Selection] = None, progress: bool = False) -> SampleReport:
    selection = selection or Selection.of(store)
    notes = []
    candidates = np.arange(len(selection.ids))
    excluded_vectors = None
    if exclude is not None and len(exclude.ids):
        keep = ~np.isin(selection.ids, exclude.ids)
        candidates = np.flatnonzero(keep)
        excluded_vectors = np.asarray(exclude.vectors)
        notes.append(f"kept away from {len(exclude.ids)} excluded items")
    if len(candidates) == 0:
        raise InputError("no items to sample from" + (" (every selected item is excluded)" if exclude else ""))
    vectors = selection.vectors if len(candidates) == len(selection.ids) else selection.vectors[candidates]
    sample = diverse_sample(vectors, n, exclude=excluded_vectors, progress=progress)
    ids = selection.ids[candidates[sample.picks]]
    paths, _ = _paths_and_times(store, ids)
    picks = [{"id": int(i), "path": paths.get(int(i), f"<item {int(i)}>")} for i in ids]
    return SampleReport(picks, sample.radius, len(candidates), sample.seconds, notes)


# ---- contact sheets --------------------------------------------------------------------------
def duplicates_sheet(report: DuplicatesReport, out: str | Path) -> Path:
    """One row per group (the first MAX_SHEET_GROUPS): the kept image first, each other with its cosine."""
    from .sheets import contact_sheet, distinct_names

    shown = report.groups[:MAX_SHEET_GROUPS]
    names = distinct_names([m["path"] for group in shown for m in group])
    rows, position = [], 0
    for number, group in enumerate(shown, 1):
        tiles = []
        for index, member in enumerate(group):
            name = names[position + index]
            if index < MAX_SHEET_MEMBERS:
                label = "kept" if index == 0 else f"cosine {member['cosine']:.3f}"
                tiles.append((member["path"], f"{label}\n{name}", True if index == 0 else None))
        position += len(group)
        more = f"\n(+{len(group) - MAX_SHEET_MEMBERS} more)" if len(group) > MAX_SHEET_MEMBERS else ""
        rows.append((f"group {number}: {len(group)} items{more}", tiles))
    title = (f"{len(report.groups)} near-duplicate groups (cosine >= {report.threshold}) among {report.items} items"
             + (f"; the first {MAX_SHEET_GROUPS} shown" if len(report.groups) > MAX_SHEET_GROUPS else ""))
    return contact_sheet(rows, out, title=title, title_width=180)


def sample_sheet(report: SampleReport, out: str | Path) -> Path:
    from .sheets import distinct_names, grid_sheet

    names = distinct_names([p["path"] for p in report.picks])
    tiles = [(p["path"], f"#{i}\n{name}") for i, (p, name) in enumerate(zip(report.picks, names), 1)]
    return grid_sheet(tiles, out, title=f"{len(report.picks)} of {report.items}, radius {report.radius:.3f}")
