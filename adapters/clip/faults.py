"""Named kill points for the fault-injection tests.

`faultpoint("index.batch-committed")` does nothing unless the environment variable
`CLIP_ADAPTER_KILL_AT` names that point: then the process kills itself with SIGKILL there,
exactly as a power cut or an OOM kill would stop it (no `finally`, no atexit, no flush).
`CLIP_ADAPTER_KILL_AT=name@3` kills at the third time the point is reached. The tests run
`index`, `reindex`, compaction and training in a child process killed at each point, then check
that the next run finds an intact store (or run) equal to an uninterrupted one. Every commit
point of the library has one; FAULT_POINTS lists them (docs/robustness.md says what each proves).
"""
from __future__ import annotations

import os
import signal

KILL_ENV = "CLIP_ADAPTER_KILL_AT"

FAULT_POINTS = (
    # index / reindex / every store transaction
    "store.created-before-current",    # a new store's data folder exists, CURRENT not yet written
    "txn.before-commit",               # a batch is written to SQLite but not committed
    "txn.committed",                   # committed to SQLite, the matrix files not yet updated
    "matrix.rows-written",             # the matrix files have the new rows, matrix.json does not say so
    "index.removing-vanished",         # the batches are in; vanished files not yet removed
    "reindex.built",                   # the new data folder is complete, not yet renamed
    "reindex.renamed",                 # renamed to data-N, CURRENT still names the old one
    # compaction
    "compact.committed",               # rows renumbered in SQLite, the matrix not yet rewritten
    "compact.state-removed",           # matrix.json removed, the new files not yet renamed in
    "compact.vectors-replaced",        # the new vectors file is in, the new rows file not yet
    # training
    "train.epoch-trained",             # an epoch is trained, nothing of it saved yet
    "train.best-saved",                # best/ has the new epoch, last/ does not yet
    "swap.old-moved-aside",            # inside a directory swap: the old one renamed away, the new one not in
    "swap.new-in",                     # the new directory is in, the old one not yet deleted
    "train.last-saved",                # last/ has the epoch, metrics.jsonl not yet
    # engine exports
    "export.files-written",            # the towers are in the work folder, none renamed in yet
    "export.files-renamed",            # the towers are in place, export.json not yet written
)

_hits: dict[str, int] = {}


def faultpoint(name: str) -> None:
    """Die here (SIGKILL) when CLIP_ADAPTER_KILL_AT names this point; otherwise one dict lookup."""
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    point, _, count = wanted.partition("@")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
