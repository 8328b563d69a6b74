"""`check`: prove a store's matrix matches its database, and repair what can be repaired.

SQLite is the truth; everything else in a store folder is derived from it (the matrix files, the
ANN index) or points at it (CURRENT). So a check asks, in order:

1. Does CURRENT name a readable data folder? If not, repair points it at the newest one that is.
2. Is the database itself intact (`PRAGMA integrity_check`) and consistent (rows, generations)?
   A damaged database cannot be repaired from anything else: the check says how to rebuild.
3. Do the matrix files hold, row for row, the vectors and ids in the database (and their
   recorded checksums)? If not, repair rewrites them from the database.
4. Is the ANN index (large stores) there, and does its file match its checksum? If not, or if the
   matrix it was built from was just repaired, repair rebuilds it from the matrix.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError
from .files import write_text_atomic
from .ann import ANN_STATE, ann_problem, ann_state, rebuild_ann
from .store import (CURRENT, DB_FILE, Store, _data_dirs, _is_store_db, _read_current,
                    settle_layout, sqlite_errors, writer_lock)

log = logging.getLogger(__name__)


@dataclass
class CheckReport:
    store: str
    problems: list[str] = field(default_factory=list)   # what was wrong (found before any repair)
    repaired: list[str] = field(default_factory=list)   # what repair fixed
    notes: list[str] = field(default_factory=list)
    items: int = 0

    @property
    def unrepaired(self) -> int:
        return len(self.problems) - len(self.repaired)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": not self.problems}


def check_store(root: str | os.PathLike, *, repair: bool = False) -> CheckReport:
    """Check (and with `repair`, fix) the store in `root`. Without `repair` nothing is written."""
    root = Path(root).expanduser().absolute()
    report = CheckReport(str(root))
    if not root.is_dir():
        raise StoreError(f"no store in {root}")
    with sqlite_errors(root):
        return _check(root, report, repair)


def _check(root: Path, report: CheckReport, repair: bool) -> CheckReport:
    if not repair:
        _check_layout(root, report, repair=False)
        if not report.problems:
            with Store.open(root, readonly=True) as store:
                _check_database(store, report)
                _check_vectors(store, report, repair=False)
                _check_matrix(store, report, repair=False)
                _check_ann(store, report, repair=False, matrix_rebuilt=False)
        return report
    with writer_lock(root):
        _check_layout(root, report, repair=True)
        if len(report.repaired) < len(report.problems):
            return report
        report.notes += settle_layout(root)
        with Store.open(root) as store:
            _check_database(store, report)
            if report.problems[len(report.repaired):]:
                return report  # a damaged database: rewriting the matrix from it would spread the damage
            _check_vectors(store, report, repair=True)  # first: the matrix may still hold what they lost
            matrix_rebuilt = _check_matrix(store, report, repair=True)
            _check_ann(store, report, repair=True, matrix_rebuilt=matrix_rebuilt)
    return report


def _check_layout(root: Path, report: CheckReport, *, repair: bool) -> None:
    try:
        current = _read_current(root)
        if current is None:
            problem = f"{CURRENT} is missing"
        elif not _is_store_db(root / current):
            problem = f"{CURRENT} names {current!r}, which has no readable {DB_FILE}"
        else:
            return
    except StoreError as exc:
        problem = str(exc).split("; run `")[0]
    report.problems.append(problem)
    candidates = [folder for folder in _data_dirs(root) if _is_store_db(folder)]
    if not candidates:
        report.notes.append(f"no data folder of {root} holds a readable database: nothing to repair from; move the "
                            f"folder away and index your images again (`python -m adapters.clip index FOLDER... "
                            f"--store {root}`)")
        return
    if repair:
        write_text_atomic(root / CURRENT, candidates[-1].name + "\n")
        report.repaired.append(f"{CURRENT} now names {candidates[-1].name}, the newest readable data folder")


def _check_database(store: Store, report: CheckReport) -> None:
    conn = store.conn
    verdict = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    if verdict != ["ok"]:
        report.problems.append(f"{store.data_dir / DB_FILE} fails SQLite's integrity check: {verdict[0]}")
        report.notes.append(f"a damaged database cannot be rebuilt from the derived files: move {store.root} away "
                            f"and index your images again")
        return
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    top_row, top_gen, report.items = conn.execute("SELECT MAX(row), MAX(gen), COUNT(*) FROM items").fetchone()
    if top_row is not None and top_row >= int(meta["next_row"]):
        report.problems.append(f"item row {top_row} is beyond the database's next_row {meta['next_row']}")
    if top_gen is not None and top_gen > int(meta["generation"]):
        report.problems.append(f"item generation {top_gen} is beyond the database's generation {meta['generation']}")


def _check_vectors(store: Store, report: CheckReport, *, repair: bool) -> None:
    """Vector blobs of the wrong length in the database (a stray write, a damaged page). Repair takes
    each back from the matrix when the matrix provably holds it (checksums and generation hold, the
    row still belongs to the item); the rest are embedded again from their files by `index`."""
    damaged = store.malformed_items()
    if not damaged:
        return
    listed = ", ".join(f"{path} ({length} bytes)" for _, path, _, length in damaged[:3])
    problem = (f"{len(damaged)} item(s) have a vector of the wrong length in the database (expected "
               f"{store.vector_bytes} bytes): {listed}{', ...' if len(damaged) > 3 else ''}")
    report.problems.append(problem)
    recovered = _vectors_in_matrix(store, damaged)
    if repair and recovered:
        store.restore_vectors(recovered)
    lost = [path for item_id, path, _, _ in damaged if item_id not in recovered]
    if repair and not lost:
        report.repaired.append(f"restored from the matrix: {problem}")
        return
    if recovered and not repair:
        report.notes.append(f"`check --repair` restores {len(recovered)} of them from the matrix")
    if lost:
        report.notes.append(f"{len(lost)} damaged vector(s) are not in the matrix any more (e.g. {lost[0]}): "
                            f"`python -m adapters.clip index` embeds their files again, keeping their subset, "
                            f"caption and metadata")


def _vectors_in_matrix(store: Store, damaged: list[tuple[int, str, int, int]]) -> dict[int, np.ndarray]:
    """{item id: vector} for the damaged items whose row in an intact, up-to-date matrix is still theirs."""
    state = store.matrix.state()
    if state is None or state.generation != store.generation() or store.matrix.problems(state):
        return {}
    snapshot = store.matrix.open(state)
    found = {}
    for item_id, _, row, _ in damaged:
        if row < snapshot.rows and snapshot.ids[row] == item_id and np.isfinite(snapshot.vectors[row]).all():
            found[item_id] = np.array(snapshot.vectors[row])
    return found


def _check_matrix(store: Store, report: CheckReport, *, repair: bool) -> bool:
    """Whether the matrix was rebuilt."""
    problems = matrix_problems(store)
    report.problems += problems
    if problems and repair:
        store.rebuild_matrix()
        left = matrix_problems(store)
        if left:
            report.notes.append(f"the matrix still differs after its rebuild: {left[0]}")
            return True
        report.repaired += [f"rebuilt from the database: {p}" for p in problems]
    return bool(problems and repair)


def _check_ann(store: Store, report: CheckReport, *, repair: bool, matrix_rebuilt: bool) -> None:
    """The ANN index file against its checksum; repair rebuilds it (also after a matrix rebuild: it
    may hold the damaged vectors)."""
    state = ann_state(store.data_dir)
    if not state:
        return
    problem = ann_problem(store.data_dir, state, verify=True)
    if problem is not None:
        report.problems.append(f"the ANN index {problem}")
    if state.get("checksum") is None:
        report.notes.append("the ANN index was written without a checksum (an older version); "
                            + ("rebuilt it" if repair else "`check --repair` or the next `index` rebuilds it"))
    if not repair or (problem is None and not matrix_rebuilt and state.get("checksum") is not None):
        return
    if store.snapshot().n_live == 0:  # nothing to index: the next index run builds one when it is needed
        (store.data_dir / ANN_STATE).unlink()
        what = "removed the ANN index of the empty store"
    else:
        what = f"rebuilt the ANN index from the matrix ({rebuild_ann(store).describe()})"
    if problem is not None:
        report.repaired.append(f"{what}: it {problem}")


def matrix_problems(store: Store) -> list[str]:
    """Where the matrix files differ from the database (empty: they match, row for row)."""
    state = store.matrix.state()
    generation = store.generation()
    if state is None:
        return ["the vector matrix files are missing, or smaller than recorded"]
    found = []
    if state.generation != generation:
        found.append(f"the vector matrix is at generation {state.generation}, the database at {generation}")
    found += store.matrix.problems(state)
    if found:
        return found
    snapshot = store.matrix.open(state)
    referenced = np.zeros(snapshot.rows, dtype=bool)
    wrong = 0
    for rows, ids, vectors in store.iter_rows():
        inside = rows < snapshot.rows
        wrong += int(np.count_nonzero(~inside))
        rows, ids, vectors = rows[inside], ids[inside], vectors[inside]
        referenced[rows] = True
        wrong += int(np.count_nonzero((snapshot.ids[rows] != ids)
                                      | np.any(snapshot.vectors[rows] != vectors, axis=1)))
    for row in store.malformed.values():  # known items (reported by _check_vectors), not strays
        if row < snapshot.rows:
            referenced[row] = True
    stray = int(np.count_nonzero(snapshot.ids[~referenced] != 0))
    if wrong:
        found.append(f"{wrong} matrix rows differ from the database's vectors")
    if stray:
        found.append(f"{stray} matrix rows are live but belong to no item")
    return found
