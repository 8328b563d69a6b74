"""The store's vector matrix: `vectors.f32` + `rows.i64` + `matrix.json` in one data folder.

A cache of the vectors SQLite holds (store.py): every vector in one contiguous float32 file that a
search maps instead of parsing a million rows, the item id of each row beside it, and in
matrix.json the database generation both files reflect with per-block checksums. Rows are
append-only; store.py decides what to write and holds the matrix lock while this module writes.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from .faults import faultpoint
from .files import datasync, pwrite, write_json_atomic

VECTORS_FILE = "vectors.f32"
ROWS_FILE = "rows.i64"
MATRIX_STATE = "matrix.json"
MATRIX_LOCK = "matrix.lock"
# Rows per checksum block of the matrix files (8 MB of a 512-d matrix: an append re-reads at most that).
CHECK_BLOCK_ROWS = 4096


@dataclass(frozen=True)
class MatrixState:
    generation: int
    epoch: int
    rows: int
    dim: int


class MatrixSnapshot:
    """The vectors as of one generation: `vectors` (rows, D) maps the file; `ids` is a private copy."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, state: MatrixState, keepalive: Any = None):
        self.vectors = vectors
        self.ids = ids
        self.state = state
        self._keepalive = keepalive  # the mmap under `vectors`
        self.live = ids > 0
        self.n_live = int(self.live.sum())
        self.all_live = self.n_live == len(ids)

    @property
    def rows(self) -> int:
        return len(self.ids)


class VectorMatrix:
    """`vectors.f32` + `rows.i64` + `matrix.json` in one data folder. Callers hold the matrix lock to write.

    matrix.json also records a CRC-32 of every block of CHECK_BLOCK_ROWS rows of both files and
    their size and mtime as written. A reader compares the sizes and mtimes (two stats) and, when
    they differ, the CRCs (one pass over the files): a matrix changed behind the store's back
    (a disk error, a stray write, a restored backup) is never searched as if it were right.
    """

    def __init__(self, directory: Path, dim: int):
        self.directory = directory
        self.dim = dim
        self.row_bytes = dim * 4
        self.vectors_path = directory / VECTORS_FILE
        self.ids_path = directory / ROWS_FILE
        self.state_path = directory / MATRIX_STATE

    def _record(self) -> Optional[dict[str, Any]]:
        try:
            raw = json.loads(self.state_path.read_text(encoding="utf-8"))
            return raw if isinstance(raw, dict) else None
        except (OSError, ValueError):
            return None

    def state(self) -> Optional[MatrixState]:
        """The recorded state, or None when it is missing or does not fit the files (rebuild)."""
        raw = self._record()
        try:
            state = MatrixState(int(raw["generation"]), int(raw["epoch"]), int(raw["rows"]), int(raw["dim"]))
            if state.dim != self.dim:
                return None
            if state.rows and (self.vectors_path.stat().st_size < state.rows * self.row_bytes
                               or self.ids_path.stat().st_size < state.rows * 8):
                return None
            return state
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # ---- proving the files are what was written -------------------------------------------
    def unchanged_since_recorded(self) -> bool:
        """Cheap: both files have the size and mtime they had when matrix.json was written."""
        recorded = (self._record() or {}).get("files")
        return isinstance(recorded, dict) and recorded == self._file_stamps()

    def problems(self, state: MatrixState) -> list[str]:
        """Every block whose CRC differs from the recorded one (reads both files once)."""
        raw = self._record() or {}
        checks = raw.get("checks")
        if not isinstance(checks, dict) or checks.get("block_rows") != CHECK_BLOCK_ROWS:
            return [f"{self.state_path.name} has no checksums (written by an older version)"]
        try:
            found = self._block_crcs(state.rows, range(_blocks(state.rows)))
        except OSError as exc:
            return [f"cannot read the matrix files: {exc.strerror or exc}"]
        bad = []
        for name, key in ((VECTORS_FILE, "vectors"), (ROWS_FILE, "ids")):
            recorded = checks.get(key) or []
            for block, crc in found[key].items():
                if block >= len(recorded) or recorded[block] != crc:
                    last = min(state.rows, (block + 1) * CHECK_BLOCK_ROWS) - 1
                    bad.append(f"{name} rows {block * CHECK_BLOCK_ROWS}-{last} differ from their checksum")
        return bad

    def intact(self, state: MatrixState) -> bool:
        return self.unchanged_since_recorded() or not self.problems(state)

    def _file_stamps(self) -> dict[str, list[int]]:
        stamps = {}
        for key, path in (("vectors", self.vectors_path), ("ids", self.ids_path)):
            try:
                st = path.stat()
                stamps[key] = [st.st_size, st.st_mtime_ns]
            except FileNotFoundError:
                stamps[key] = [0, 0]
        return stamps

    def _block_crcs(self, rows: int, blocks: Iterable[int]) -> dict[str, dict[int, int]]:
        """CRC-32 of the given blocks of both files, as they are on disk now."""
        crcs: dict[str, dict[int, int]] = {"vectors": {}, "ids": {}}
        blocks = list(blocks)
        if rows == 0 or not blocks:
            return crcs
        with open(self.vectors_path, "rb") as vf, open(self.ids_path, "rb") as fi:
            for block in blocks:
                first = block * CHECK_BLOCK_ROWS
                count = min(rows, first + CHECK_BLOCK_ROWS) - first
                crcs["vectors"][block] = zlib.crc32(os.pread(vf.fileno(), count * self.row_bytes,
                                                             first * self.row_bytes))
                crcs["ids"][block] = zlib.crc32(os.pread(fi.fileno(), count * 8, first * 8))
        return crcs

    # ---- reading ----------------------------------------------------------------------------
    def open(self, state: MatrixState) -> MatrixSnapshot:
        if state.rows == 0:
            return MatrixSnapshot(np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64), state)
        with open(self.vectors_path, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), state.rows * self.row_bytes, access=mmap.ACCESS_READ)
        vectors = np.ndarray((state.rows, self.dim), dtype=np.float32, buffer=mapped)
        ids = np.fromfile(self.ids_path, dtype=np.int64, count=state.rows)
        return MatrixSnapshot(vectors, ids, state, keepalive=mapped)

    # ---- writing ----------------------------------------------------------------------------
    def write(self, rows: np.ndarray, ids: np.ndarray, vectors: np.ndarray, dead: Sequence[int] = ()) -> None:
        """Write rows (any order) and mark `dead` rows; files grow as needed."""
        with _open_rw(self.vectors_path) as vfd, _open_rw(self.ids_path) as ifd:
            _write_rows(vfd, ifd, rows, ids, vectors, self.row_bytes)
            zero = np.zeros(1, np.int64).tobytes()
            for row in dead:
                pwrite(ifd, zero, int(row) * 8)
            datasync(vfd)
            datasync(ifd)
        faultpoint("matrix.rows-written")

    def record(self, state: MatrixState, touched: Optional[Iterable[int]] = None) -> None:
        """Say the files now reflect `state` (after their data is on disk), with their checksums.

        `touched`: the rows written or killed since the recorded state; only their blocks (and
        the growing last block) are read again. None: every block.
        """
        previous = self._record() or {}
        checks = previous.get("checks") if isinstance(previous.get("checks"), dict) else None
        wanted = range(_blocks(state.rows))
        vectors_crc: list[Optional[int]] = [None] * len(wanted)
        ids_crc: list[Optional[int]] = [None] * len(wanted)
        if (touched is not None and checks is not None and checks.get("block_rows") == CHECK_BLOCK_ROWS
                and previous.get("epoch") == state.epoch and int(previous.get("rows", -1)) <= state.rows):
            kept = _blocks(int(previous["rows"]))
            if int(previous["rows"]) % CHECK_BLOCK_ROWS:
                kept -= 1  # the last block was partial: it grew
            dirty = {int(r) // CHECK_BLOCK_ROWS for r in touched}
            for block in range(min(kept, len(wanted), len(checks["vectors"]), len(checks["ids"]))):
                if block not in dirty:
                    vectors_crc[block], ids_crc[block] = checks["vectors"][block], checks["ids"][block]
        missing = [b for b in wanted if vectors_crc[b] is None]
        found = self._block_crcs(state.rows, missing)
        for block in missing:
            vectors_crc[block], ids_crc[block] = found["vectors"][block], found["ids"][block]
        write_json_atomic(self.state_path, {**state.__dict__, "files": self._file_stamps(),
                                            "checks": {"block_rows": CHECK_BLOCK_ROWS, "vectors": vectors_crc,
                                                       "ids": ids_crc}}, indent=None)

    def remove_debris(self) -> None:
        """Temp files of a writer killed mid-write. The caller holds the matrix lock, under which alone
        they are made, so none of them is live."""
        for pattern in (f".{VECTORS_FILE}.tmp-*", f".{ROWS_FILE}.tmp-*", f".{Path(MATRIX_STATE).stem}.tmp-*"):
            for path in self.directory.glob(pattern):
                with contextlib.suppress(OSError):
                    path.unlink()

    def replace(self, chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], state: MatrixState) -> None:
        """Write a whole new matrix beside the old files and swap it in.

        Never truncates a mapped file (a reader mapping it would crash): new inodes are renamed
        over the old names, and the state is removed first so a crash mid-way reads as "rebuild".
        """
        tmp_vectors = self.directory / f".{VECTORS_FILE}.tmp-{os.getpid()}"
        tmp_ids = self.directory / f".{ROWS_FILE}.tmp-{os.getpid()}"
        try:
            with _open_rw(tmp_vectors, truncate=True) as vfd, _open_rw(tmp_ids, truncate=True) as ifd:
                os.ftruncate(vfd, state.rows * self.row_bytes)
                os.ftruncate(ifd, state.rows * 8)
                for rows, ids, vectors in chunks:
                    _write_rows(vfd, ifd, rows, ids, vectors, self.row_bytes)
                datasync(vfd)
                datasync(ifd)
            with contextlib.suppress(FileNotFoundError):
                self.state_path.unlink()
            faultpoint("compact.state-removed")
            os.replace(tmp_vectors, self.vectors_path)
            faultpoint("compact.vectors-replaced")
            os.replace(tmp_ids, self.ids_path)
            self.record(state)
        finally:
            for tmp in (tmp_vectors, tmp_ids):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()


def _blocks(rows: int) -> int:
    return -(-rows // CHECK_BLOCK_ROWS)


@contextlib.contextmanager
def _open_rw(path: Path, truncate: bool = False) -> Iterator[int]:
    flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if truncate else 0)
    fd = os.open(str(path), flags, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)


def _write_rows(vfd: int, ifd: int, rows: np.ndarray, ids: np.ndarray, vectors: np.ndarray,
                row_bytes: int) -> None:
    """pwrite runs of consecutive rows in one call each (new rows are usually one run)."""
    if len(rows) == 0:
        return
    order = np.argsort(rows, kind="stable")
    rows, ids = np.asarray(rows)[order], np.asarray(ids, dtype=np.int64)[order]
    vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32)[order])
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
        first = int(rows[start])
        pwrite(vfd, vectors[start:stop].tobytes(), first * row_bytes)
        pwrite(ifd, ids[start:stop].tobytes(), first * 8)
