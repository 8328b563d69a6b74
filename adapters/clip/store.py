"""The local embedded store: one folder, SQLite for the truth, a memory-mapped matrix for speed.

Layout of a store folder (`--store DIR`):

    DIR/CURRENT             names the live data folder ("data-1"); `index --reindex` replaces it atomically
    DIR/writer.lock         held by the one process that writes (index, reindex)
    DIR/data-N/store.db     SQLite (WAL): per item its path, size, mtime, content hash, subset, caption,
                            metadata JSON and vector; the model binding; the schema version (user_version)
    DIR/data-N/vectors.f32  every vector in one contiguous float32 matrix (row = items.row)
    DIR/data-N/rows.i64     the item id of each matrix row, 0 where the row is dead
    DIR/data-N/matrix.json  the database generation the two files reflect
    DIR/data-N/ann*.faiss   the ANN index of large stores (see search.py)
    DIR/reindex-<model>/    a re-index in progress; a stopped one is resumed by the next `--reindex`

Why this shape:
- SQLite is the truth and is crash-safe by itself (WAL, one transaction per batch). The matrix is a
  cache of it that a search maps instead of parsing a million rows.
- Matrix rows are append-only and never rewritten: a changed item gets a new row and its old row
  is marked dead. A reader mapping the file while an index run appends never sees a torn row.
- Every write transaction bumps a generation and records the rows it added (items.gen) or killed
  (dead_rows.gen); matrix.json says up to which generation the files are written. Whoever finds
  them behind (the writer after its commit, or anyone after a crash) replays just that delta.
- The store is bound to the model that made its vectors (fingerprint + dimension): vectors of two
  models are not comparable, so using another model is an error, and `reindex` builds the new
  vectors in a folder beside the old one and swaps `CURRENT`, so a failed re-index changes nothing.

Filling a store from folders (`index`, `reindex`) lives in indexing.py; searching it in search.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from .progress import progress_bar
from .errors import InputError, ModelMismatchError, StoreError
from .files import write_json_atomic, write_text_atomic

if TYPE_CHECKING:  # the store itself needs no torch; indexing gets an Embedder passed in
    from .models import ClipModel

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: single-writer discipline is then up to the user
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

STORE_ENV = "CLIP_ADAPTER_STORE"
DEFAULT_STORE_DIR = "~/.cache/clip-adapter/store"
STORE_FORMAT = "clip-adapter-store"

CURRENT = "CURRENT"
WRITER_LOCK = "writer.lock"
DB_FILE = "store.db"
VECTORS_FILE = "vectors.f32"
ROWS_FILE = "rows.i64"
MATRIX_STATE = "matrix.json"
MATRIX_LOCK = "matrix.lock"
DATA_PREFIX = "data-"
REINDEX_PREFIX = "reindex-"

# Rewrite the matrix without dead rows once they are this large a share of it.
COMPACT_DEAD_FRACTION = 0.25
COMPACT_MIN_DEAD = 1024
# Rows read or written per chunk when streaming the whole matrix (bounded memory at any size).
CHUNK_ROWS = 16384

# fdatasync is missing on macOS, pwrite on Windows: same durability through the portable calls.
_datasync = getattr(os, "fdatasync", os.fsync)


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    if hasattr(os, "pwrite"):
        os.pwrite(fd, data, offset)
    else:  # pragma: no cover - Windows
        os.lseek(fd, offset, os.SEEK_SET)
        os.write(fd, data)


def default_store_dir() -> Path:
    """`$CLIP_ADAPTER_STORE`, else `~/.cache/clip-adapter/store`."""
    return Path(os.environ.get(STORE_ENV) or DEFAULT_STORE_DIR).expanduser()


# --------------------------------------------------------------------------------------
# Schema: each migration is a list of statements; a new store runs them all, an old one the rest
# --------------------------------------------------------------------------------------
MIGRATIONS: list[tuple[str, ...]] = [
    (  # 1: items, their vectors and matrix rows; rows killed by updates and deletes
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE items (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL UNIQUE,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            hash TEXT NOT NULL,
            subset TEXT,
            caption TEXT,
            metadata TEXT NOT NULL DEFAULT '{}',
            vector BLOB NOT NULL,
            row INTEGER NOT NULL UNIQUE,
            gen INTEGER NOT NULL,
            added REAL NOT NULL)""",
        "CREATE INDEX items_hash ON items(hash)",
        "CREATE INDEX items_gen ON items(gen)",
        "CREATE INDEX items_subset ON items(subset)",
        "CREATE TABLE dead_rows (row INTEGER PRIMARY KEY, gen INTEGER NOT NULL)",
        "CREATE INDEX dead_rows_gen ON dead_rows(gen)",
    ),
    (  # 2: unreadable files, so an unchanged bad file is reported but not re-read on every run
        """CREATE TABLE failures (
            path TEXT PRIMARY KEY,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            reason TEXT NOT NULL,
            seen REAL NOT NULL)""",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)
ROOTS_KEY = "roots"  # meta: JSON list of the paths `index` was given


def _migrate(conn: sqlite3.Connection, where: Path) -> None:
    version = _user_version(conn)
    if version > SCHEMA_VERSION:
        raise StoreError(f"{where}: store schema version {version} is newer than this code reads "
                         f"({SCHEMA_VERSION}); upgrade the adapter")
    for number in range(version + 1, SCHEMA_VERSION + 1):
        with _immediate(conn):
            if _user_version(conn) >= number:  # another process migrated it meanwhile
                continue
            for statement in MIGRATIONS[number - 1]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
        if number > 1:
            log.info("%s: migrated store schema to version %d", where, number)


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (BEGIN IMMEDIATE takes the write lock up front: no upgrade deadlocks)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextlib.contextmanager
def _read_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Several reads that see one committed state (WAL: never blocks the writer)."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")


def _connect(db_path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(str(db_path), timeout=60, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a killed process loses nothing committed; only power loss may drop
        # the last transactions (never corrupts).
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{db_path}: not a readable store database ({exc})") from None


# --------------------------------------------------------------------------------------
# The model a store is bound to
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelBinding:
    """Which model made a store's vectors: only that model's queries are comparable to them."""

    name: str
    fingerprint: str
    dim: int

    @classmethod
    def of(cls, clip: "ClipModel") -> "ModelBinding":
        name = clip.name
        if os.path.exists(name):  # a checkpoint: remember where, whatever the working directory
            name = os.path.abspath(name)
        return cls(name=name, fingerprint=clip.fingerprint, dim=int(clip.dim))

    def describe(self) -> str:
        return f"'{self.name}' ({self.dim}-d, fingerprint {self.fingerprint[:12]})"


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------
@dataclass
class ItemRecord:
    id: int
    path: str
    size: int
    mtime_ns: int
    hash: str
    row: int
    subset: Optional[str] = None
    caption: Optional[str] = None
    metadata: dict[str, Any] = field(default_factory=dict)


_ITEM_COLUMNS = "id, path, size, mtime_ns, hash, row, subset, caption, metadata"


def _record(row: tuple) -> ItemRecord:
    return ItemRecord(id=row[0], path=row[1], size=row[2], mtime_ns=row[3], hash=row[4], row=row[5],
                      subset=row[6], caption=row[7], metadata=json.loads(row[8] or "{}"))


@dataclass(frozen=True)
class FileStat:
    path: str      # absolute
    size: int
    mtime_ns: int


KEEP = object()  # "leave this attribute as it is"


# --------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------
_held_writer_locks: dict[tuple[str, int], tuple[int, int]] = {}  # (root, thread) -> (fd, depth)
_held_guard = threading.Lock()


@contextlib.contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """The store's single-writer lock: a second index run fails fast instead of interleaving.

    Re-entrant within one thread (index -> transaction); another thread or process is refused.
    """
    folder = str(Path(root).absolute())
    key = (folder, threading.get_ident())
    with _held_guard:
        held = _held_writer_locks.get(key)
        if held:
            _held_writer_locks[key] = (held[0], held[1] + 1)
    if held:
        try:
            yield
        finally:
            with _held_guard:
                fd, depth = _held_writer_locks[key]
                _held_writer_locks[key] = (fd, depth - 1)
        return
    Path(root).mkdir(parents=True, exist_ok=True)
    fd = os.open(os.path.join(folder, WRITER_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise StoreError(f"store {folder} is being written by another index run (pid {other}); "
                                 f"wait for it to finish") from None
        os.ftruncate(fd, 0)
        _pwrite(fd, str(os.getpid()).encode(), 0)
        with _held_guard:
            _held_writer_locks[key] = (fd, 1)
        try:
            yield
        finally:
            with _held_guard:
                _held_writer_locks.pop(key, None)
    finally:
        os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Blocking exclusive lock on a small file (the matrix sync lock: held for milliseconds)."""
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------
# The contiguous matrix
# --------------------------------------------------------------------------------------
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
    """`vectors.f32` + `rows.i64` + `matrix.json` in one data folder. Callers hold the matrix lock to write."""

    def __init__(self, directory: Path, dim: int):
        self.directory = directory
        self.dim = dim
        self.row_bytes = dim * 4
        self.vectors_path = directory / VECTORS_FILE
        self.ids_path = directory / ROWS_FILE
        self.state_path = directory / MATRIX_STATE

    def state(self) -> Optional[MatrixState]:
        """The recorded state, or None when it is missing or does not fit the files (rebuild)."""
        try:
            raw = json.loads(self.state_path.read_text(encoding="utf-8"))
            state = MatrixState(int(raw["generation"]), int(raw["epoch"]), int(raw["rows"]), int(raw["dim"]))
            if state.dim != self.dim:
                return None
            if state.rows and (self.vectors_path.stat().st_size < state.rows * self.row_bytes
                               or self.ids_path.stat().st_size < state.rows * 8):
                return None
            return state
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def open(self, state: MatrixState) -> MatrixSnapshot:
        if state.rows == 0:
            return MatrixSnapshot(np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64), state)
        with open(self.vectors_path, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), state.rows * self.row_bytes, access=mmap.ACCESS_READ)
        vectors = np.ndarray((state.rows, self.dim), dtype=np.float32, buffer=mapped)
        ids = np.fromfile(self.ids_path, dtype=np.int64, count=state.rows)
        return MatrixSnapshot(vectors, ids, state, keepalive=mapped)

    def write(self, rows: np.ndarray, ids: np.ndarray, vectors: np.ndarray, dead: Sequence[int] = ()) -> None:
        """Write rows (any order) and mark `dead` rows; files grow as needed."""
        with _open_rw(self.vectors_path) as vfd, _open_rw(self.ids_path) as ifd:
            _write_rows(vfd, ifd, rows, ids, vectors, self.row_bytes)
            zero = np.zeros(1, np.int64).tobytes()
            for row in dead:
                _pwrite(ifd, zero, int(row) * 8)
            _datasync(vfd)
            _datasync(ifd)

    def record(self, state: MatrixState) -> None:
        """Say the files now reflect `state` (after their data is on disk)."""
        write_json_atomic(self.state_path, state.__dict__, indent=None)

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
                _datasync(vfd)
                _datasync(ifd)
            with contextlib.suppress(FileNotFoundError):
                self.state_path.unlink()
            os.replace(tmp_vectors, self.vectors_path)
            os.replace(tmp_ids, self.ids_path)
            self.record(state)
        finally:
            for tmp in (tmp_vectors, tmp_ids):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()


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
        _pwrite(vfd, vectors[start:stop].tobytes(), first * row_bytes)
        _pwrite(ifd, ids[start:stop].tobytes(), first * 8)


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


# --------------------------------------------------------------------------------------
# Metadata filters (the SQL half of search filters)
# --------------------------------------------------------------------------------------
_WHERE = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(!=|>=|<=|=|>|<|~)\s*(.*?)\s*$")
_SQL_OPS = {"=": "=", "!=": "!=", ">=": ">=", "<=": "<=", ">": ">", "<": "<", "~": "GLOB"}


@dataclass(frozen=True)
class Condition:
    """`key OP value` on an item's metadata JSON; `~` is a glob (`camera~Canon*`)."""

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
        if isinstance(value, (dict, list)):
            value = raw
        return cls(key, op, value)

    def sql(self) -> tuple[str, list[Any]]:
        json_path = "$" + "".join(f'."{part}"' for part in self.key.split("."))
        if self.value is None:
            return f"json_extract(metadata, ?) IS {'NOT ' if self.op == '!=' else ''}NULL", [json_path]
        value = int(self.value) if isinstance(self.value, bool) else self.value
        return f"json_extract(metadata, ?) {_SQL_OPS[self.op]} ?", [json_path, value]


def _path_glob_sql(pattern: str) -> tuple[str, list[Any]]:
    """Patterns with a '/' match the whole absolute path; others match the file name."""
    if "/" in pattern or os.sep in pattern:
        return "path GLOB ?", [pattern]
    return "(path GLOB ?)", ["*" + os.sep + pattern]


# --------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------
class Store:
    """One store folder: read it (search), or write it through `transaction()` and `index()`.

    Use one Store per thread. Any number of processes may read while one writes.
    """

    def __init__(self, root: Path, data_dir: Path, conn: sqlite3.Connection):
        self.root = root
        self.data_dir = data_dir
        self.conn = conn
        meta = self._meta()
        if meta.get("format") != STORE_FORMAT:
            raise StoreError(f"{data_dir / DB_FILE}: not a {STORE_FORMAT} database")
        self.binding = ModelBinding(meta["model_name"], meta["model_fingerprint"], int(meta["dim"]))
        self.matrix = VectorMatrix(data_dir, self.binding.dim)
        self._snapshot: Optional[MatrixSnapshot] = None
        self._search_index: Optional[tuple[Any, Any]] = None  # (key, index): search.py's loaded ANN index

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | os.PathLike, *, create: Optional[ModelBinding] = None) -> "Store":
        """Open the store in `root`; with `create`, make an empty one bound to that model if there is none."""
        root = Path(root).expanduser().absolute()
        current = _read_current(root)
        if current is None:
            if create is None:
                raise StoreError(f"no store in {root}; build one with "
                                 f"`python -m adapters.clip index PATH... --store {root}`")
            with writer_lock(root):
                current = _read_current(root)
                if current is None:
                    data_dir = root / f"{DATA_PREFIX}1"
                    if data_dir.exists():  # debris of a creation that died before CURRENT was written
                        shutil.rmtree(data_dir)
                    store = cls.create_data_dir(root, data_dir, create)
                    write_text_atomic(root / CURRENT, data_dir.name + "\n")
                    return store
        data_dir = root / current
        if not (data_dir / DB_FILE).is_file():
            raise StoreError(f"store {root} is damaged: {root / CURRENT} names {current!r}, which has no "
                             f"{DB_FILE}; rebuild it with `index --reindex` or delete the folder")
        return cls.open_data_dir(root, data_dir)

    @staticmethod
    def current_data_name(root: Path) -> Optional[str]:
        """The name of the live data folder in `root` (what CURRENT says), or None when there is no store."""
        return _read_current(Path(root))

    @classmethod
    def open_data_dir(cls, root: Path, data_dir: Path) -> "Store":
        conn = _connect(data_dir / DB_FILE)
        try:
            _migrate(conn, data_dir)
            return cls(root, data_dir, conn)
        except BaseException:
            conn.close()
            raise

    @classmethod
    def create_data_dir(cls, root: Path, data_dir: Path, binding: ModelBinding) -> "Store":
        data_dir.mkdir(parents=True, exist_ok=True)
        conn = _connect(data_dir / DB_FILE)
        try:
            _migrate(conn, data_dir)
            with _immediate(conn):
                if conn.execute("SELECT COUNT(*) FROM meta").fetchone()[0] == 0:
                    values = {"format": STORE_FORMAT, "model_name": binding.name,
                              "model_fingerprint": binding.fingerprint, "dim": binding.dim,
                              "generation": 0, "epoch": 0, "next_row": 0,
                              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                    conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                                     [(k, str(v)) for k, v in values.items()])
            return cls(root, data_dir, conn)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self._snapshot = None
        self.forget_search_index()
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the model -----------------------------------------------------------------------
    def check_model(self, binding: ModelBinding) -> None:
        """Raise `ModelMismatchError` unless `binding` is the model that made this store's vectors."""
        mine = self.binding
        if mine.fingerprint == binding.fingerprint and mine.dim == binding.dim:
            return
        raise ModelMismatchError(
            f"store {self.root} holds {self.count()} vectors from model {mine.describe()}, not from "
            f"{binding.describe()}; their vectors are not comparable. Search it with --model '{mine.name}', "
            f"or re-embed it with the new model: python -m adapters.clip index --reindex "
            f"--store {self.root} --model '{binding.name}'")

    # ---- reading -------------------------------------------------------------------------
    def _meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta").fetchall())

    def generation(self) -> int:
        return int(self.conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def info(self) -> dict[str, Any]:
        meta = self._meta()
        return {"store": str(self.root), "data": str(self.data_dir), "items": self.count(),
                "model": self.binding.name, "fingerprint": self.binding.fingerprint, "dim": self.binding.dim,
                "schema_version": _user_version(self.conn), "generation": int(meta["generation"]),
                "matrix_rows": int(meta["next_row"]), "created": meta.get("created")}

    def items(self, ids: Iterable[int]) -> dict[int, ItemRecord]:
        ids = [int(i) for i in ids]
        found: dict[int, ItemRecord] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE id IN ({marks})", chunk):
                found[row[0]] = _record(row)
        return found

    def item_by_path(self, path: str | os.PathLike) -> Optional[ItemRecord]:
        row = self.conn.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE path = ?",
                                (os.path.abspath(path),)).fetchone()
        return _record(row) if row else None

    def paths(self) -> set[str]:
        """Every stored item's path."""
        return {path for (path,) in self.conn.execute("SELECT path FROM items")}

    def iter_items(self) -> Iterator[ItemRecord]:
        for row in self.conn.execute(f"SELECT {_ITEM_COLUMNS} FROM items ORDER BY path"):
            yield _record(row)

    def vector(self, item_id: int) -> Optional[np.ndarray]:
        row = self.conn.execute("SELECT vector FROM items WHERE id = ?", (item_id,)).fetchone()
        return np.frombuffer(row[0], dtype="<f4").astype(np.float32) if row else None

    def vector_for_hash(self, content_hash: str) -> Optional[np.ndarray]:
        """The vector of any item with this content: identical bytes need no second embedding."""
        row = self.conn.execute("SELECT vector FROM items WHERE hash = ? LIMIT 1", (content_hash,)).fetchone()
        return np.frombuffer(row[0], dtype="<f4").astype(np.float32) if row else None

    def rows_matching(self, *, subsets: Sequence[str] = (), where: Sequence[Condition] = (),
                      path_glob: Optional[str] = None) -> np.ndarray:
        """Matrix rows of the items that pass every filter (sorted int64)."""
        clauses, params = [], []
        if subsets:
            clauses.append(f"subset IN ({','.join('?' * len(subsets))})")
            params += list(subsets)
        for condition in where:
            sql, values = condition.sql()
            clauses.append(sql)
            params += values
        if path_glob:
            sql, values = _path_glob_sql(path_glob)
            clauses.append(sql)
            params += values
        query = "SELECT row FROM items" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        rows = np.fromiter((r for (r,) in self.conn.execute(query + " ORDER BY row", params)), dtype=np.int64)
        return rows

    # ---- the matrix ----------------------------------------------------------------------
    def snapshot(self) -> MatrixSnapshot:
        """The vectors of every committed item, as a memory-mapped matrix (cached per generation)."""
        generation = self.generation()
        if self._snapshot is not None and self._snapshot.state.generation == generation:
            return self._snapshot
        state = self.matrix.state()
        if state is None or state.generation != generation:
            with _file_lock(self.data_dir / MATRIX_LOCK):  # a writer mid-sync finishes first
                state = self._sync_matrix()
        self._snapshot = self.matrix.open(state)
        return self._snapshot

    def _sync_matrix(self, fresh: Optional[list[tuple[int, int, np.ndarray]]] = None) -> MatrixState:
        """Bring the matrix files up to the committed generation. Caller holds the matrix lock.

        `fresh` is what the caller's last transaction wrote, to avoid reading it back from SQLite.
        """
        state = self.matrix.state()
        with _read_transaction(self.conn):
            meta = self._meta()
            target = MatrixState(int(meta["generation"]), int(meta["epoch"]), int(meta["next_row"]),
                                 self.binding.dim)
            if state == target:
                return state
            if state is None or state.epoch != target.epoch or state.generation > target.generation:
                log.info("%s: rebuilding the vector matrix from the database", self.data_dir)
                self.matrix.replace(self._all_rows(), target)
                return target
            if fresh is not None and state.generation == target.generation - 1:
                rows = np.array([r for r, _, _ in fresh], dtype=np.int64)
                ids = np.array([i for _, i, _ in fresh], dtype=np.int64)
                vectors = np.array([v for _, _, v in fresh], dtype=np.float32).reshape(len(fresh), self.binding.dim)
            else:
                rows, ids, vectors = self._changed_rows(state.generation)
            dead = [r for (r,) in self.conn.execute("SELECT row FROM dead_rows WHERE gen > ?", (state.generation,))]
        self.matrix.write(rows, ids, vectors, dead)
        self.matrix.record(target)
        return target

    def _changed_rows(self, since: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        found = self.conn.execute("SELECT row, id, vector FROM items WHERE gen > ?", (since,)).fetchall()
        rows = np.array([r[0] for r in found], dtype=np.int64)
        ids = np.array([r[1] for r in found], dtype=np.int64)
        vectors = np.frombuffer(b"".join(r[2] for r in found), dtype="<f4").reshape(len(found), self.binding.dim)
        return rows, ids, vectors

    def _all_rows(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        cursor = self.conn.execute("SELECT row, id, vector FROM items")
        while True:
            found = cursor.fetchmany(CHUNK_ROWS)
            if not found:
                return
            yield (np.array([r[0] for r in found], dtype=np.int64), np.array([r[1] for r in found], dtype=np.int64),
                   np.frombuffer(b"".join(r[2] for r in found), dtype="<f4").reshape(len(found), self.binding.dim))

    # ---- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator["Transaction"]:
        """One atomic batch of changes; the matrix follows right after the commit."""
        with writer_lock(self.root), _file_lock(self.data_dir / MATRIX_LOCK):
            if self.matrix.state() is None or self.matrix.state().generation != self.generation():
                self._sync_matrix()  # a crashed run's last commit: catch up before adding to it
            with _immediate(self.conn):
                meta = self._meta()
                txn = Transaction(self, int(meta["generation"]) + 1, int(meta["next_row"]))
                yield txn
                self.conn.executemany("UPDATE meta SET value = ? WHERE key = ?",
                                      [(str(txn.generation), "generation"), (str(txn.next_row), "next_row")])
            self._sync_matrix(fresh=txn.written)
        self._snapshot = None

    def add_vectors(self, paths: Sequence[str], vectors: np.ndarray, *, hashes: Optional[Sequence[str]] = None,
                    subset: Optional[str] = None, metadata: Optional[Sequence[dict]] = None,
                    batch: int = 20000, progress: bool = False) -> int:
        """Put ready-made vectors into the store (bulk loads, benchmarks, tests). Returns the count.

        Paths need not exist; without `hashes` the content hash is that of the vector.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.binding.dim:
            raise InputError(f"vectors of shape {vectors.shape} do not fit this {self.binding.dim}-d store")
        if len(paths) != len(vectors):
            raise InputError(f"{len(paths)} paths for {len(vectors)} vectors")
        if not np.isfinite(vectors).all():
            raise InputError("vectors contain NaN or infinite values")
        bar = progress_bar(len(paths), "loading vectors", enabled=progress, leave=False)
        for start in range(0, len(paths), batch):
            stop = min(start + batch, len(paths))
            stats = [FileStat(os.path.abspath(paths[i]), 0, 0) for i in range(start, stop)]
            contents = [hashes[i] if hashes is not None else
                        "vec:" + hashlib.blake2b(vectors[i].tobytes(), digest_size=16).hexdigest()
                        for i in range(start, stop)]
            metas = [metadata[i] if metadata is not None else KEEP for i in range(start, stop)]
            existing = self._existing_paths([s.path for s in stats])
            fresh = [j for j, s in enumerate(stats) if s.path not in existing]
            with self.transaction() as txn:
                txn.insert_new([stats[j] for j in fresh], [contents[j] for j in fresh], vectors[start:stop][fresh],
                               subset=subset, metadata=[metas[j] for j in fresh])
                for j, stat in enumerate(stats):
                    if stat.path in existing:
                        txn.put(stat, contents[j], vectors[start + j], subset=subset if subset is not None else KEEP,
                                metadata=metas[j])
            bar.update(stop - start)
        bar.close()
        return len(paths)

    def _existing_paths(self, paths: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(paths), 500):
            chunk = list(paths[start:start + 500])
            found.update(p for (p,) in self.conn.execute(
                f"SELECT path FROM items WHERE path IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def needs_compaction(self) -> bool:
        meta = self._meta()
        rows = int(meta["next_row"])
        dead = rows - self.count()
        return dead >= COMPACT_MIN_DEAD and dead > COMPACT_DEAD_FRACTION * rows

    def compact(self) -> None:
        """Rewrite the matrix without dead rows (renumbers rows; the ANN index is rebuilt after)."""
        with writer_lock(self.root), _file_lock(self.data_dir / MATRIX_LOCK):
            self._sync_matrix()
            old = self.matrix.open(self.matrix.state())
            with _immediate(self.conn):
                meta = self._meta()
                pairs = self.conn.execute("SELECT id, row FROM items ORDER BY row").fetchall()
                generation, epoch = int(meta["generation"]) + 1, int(meta["epoch"]) + 1
                # ascending order: each new row is <= the old one and never taken by an unmoved item
                self.conn.executemany("UPDATE items SET row = ?, gen = ? WHERE id = ?",
                                      [(new, generation, item) for new, (item, _) in enumerate(pairs)])
                self.conn.execute("DELETE FROM dead_rows")
                self.conn.executemany("UPDATE meta SET value = ? WHERE key = ?",
                                      [(str(generation), "generation"), (str(epoch), "epoch"),
                                       (str(len(pairs)), "next_row")])
            ids = np.array([p[0] for p in pairs], dtype=np.int64)
            old_rows = np.array([p[1] for p in pairs], dtype=np.int64)

            def chunks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
                for start in range(0, len(pairs), CHUNK_ROWS):
                    stop = min(start + CHUNK_ROWS, len(pairs))
                    yield np.arange(start, stop, dtype=np.int64), ids[start:stop], old.vectors[old_rows[start:stop]]

            self.matrix.replace(chunks(), MatrixState(generation, epoch, len(pairs), self.binding.dim))
        self._snapshot = None
        log.info("%s: compacted the vector matrix to %d rows", self.data_dir, len(pairs))

    # ---- index bookkeeping ---------------------------------------------------------------
    def items_in(self, folders: Sequence[str] = (), files: Sequence[str] = (), *,
                 everything: bool = False) -> dict[str, ItemRecord]:
        """{path: record} of the items under `folders` and at `files` (all of them with `everything`)."""
        query = f"SELECT {_ITEM_COLUMNS} FROM items"
        if everything:
            return {r[1]: _record(r) for r in self.conn.execute(query)}
        found: dict[str, ItemRecord] = {}
        for root in folders:
            low, high = _prefix_range(root)
            for r in self.conn.execute(query + " WHERE path > ? AND path < ?", (low, high)):
                found[r[1]] = _record(r)
        for path in files:
            r = self.conn.execute(query + " WHERE path = ?", (path,)).fetchone()
            if r:
                found[r[1]] = _record(r)
        return found

    def failures_in(self, folders: Sequence[str] = (), files: Sequence[str] = (), *,
                    everything: bool = False) -> dict[str, tuple[int, int, str]]:
        """{path: (size, mtime_ns, reason)} of the recorded failures under `folders` and at `files`."""
        query = "SELECT path, size, mtime_ns, reason FROM failures"
        rows: list[tuple] = []
        if everything:
            rows = self.conn.execute(query).fetchall()
        else:
            for root in folders:
                rows += self.conn.execute(query + " WHERE path > ? AND path < ?", _prefix_range(root)).fetchall()
            for path in files:
                rows += self.conn.execute(query + " WHERE path = ?", (path,)).fetchall()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    # ---- a search index kept while the store is open ---------------------------------------
    def cached_search_index(self, key: Any) -> Any:
        """The index kept by `keep_search_index` under `key`, else None (one under another key is dropped)."""
        if self._search_index is not None and self._search_index[0] != key:
            self._search_index = None
        return self._search_index[1] if self._search_index is not None else None

    def keep_search_index(self, key: Any, index: Any) -> None:
        """Keep a loaded search index (search.py's ANN index) for the next query on this store."""
        self._search_index = (key, index)

    def forget_search_index(self) -> None:
        """Drop the kept index: it was rebuilt or extended on disk."""
        self._search_index = None

    # ---- the folders and files `index` was given ---------------------------------------------
    def roots(self) -> list[str]:
        """The absolute folders and files indexed into this store, so a bare `index` rescans them."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (ROOTS_KEY,)).fetchone()
        return json.loads(row[0]) if row else []

    def remember_roots(self, paths: Iterable[str]) -> None:
        """Add `paths` (absolute) to `roots()`; a path under another root adds nothing."""
        merged = sorted(set(self.roots()) | {os.path.abspath(p) for p in paths})
        kept = [p for p in merged if not any(p != q and p.startswith(q.rstrip(os.sep) + os.sep) for q in merged)]
        with _immediate(self.conn):
            self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (ROOTS_KEY, json.dumps(kept)))


def _prefix_range(folder: str) -> tuple[str, str]:
    """Every path under `folder` sorts strictly between these two (no GLOB escaping needed)."""
    base = folder.rstrip(os.sep)
    return base + os.sep, base + chr(ord(os.sep) + 1)


class Transaction:
    """Changes inside one `Store.transaction()`; each `put` takes a fresh matrix row."""

    def __init__(self, store: Store, generation: int, next_row: int):
        self.store = store
        self.conn = store.conn
        self.generation = generation
        self.next_row = next_row
        self.written: list[tuple[int, int, np.ndarray]] = []  # (row, id, vector)

    def put(self, stat: FileStat, content_hash: str, vector: np.ndarray, *, subset: Any = KEEP,
            caption: Any = KEEP, metadata: Any = KEEP) -> tuple[int, bool]:
        """Insert or replace the item at `stat.path`. Returns (item id, whether it existed)."""
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.store.binding.dim or not np.isfinite(vector).all():
            raise StoreError(f"{stat.path}: refusing a vector of shape {vector.shape} or with NaN for a "
                             f"{self.store.binding.dim}-d store")
        row = self.next_row
        self.next_row += 1
        existing = self.conn.execute("SELECT id, row FROM items WHERE path = ?", (stat.path,)).fetchone()
        if existing:
            item_id = existing[0]
            self._kill_row(existing[1])
            self.conn.execute("UPDATE items SET size = ?, mtime_ns = ?, hash = ?, vector = ?, row = ?, gen = ? "
                              "WHERE id = ?", (stat.size, stat.mtime_ns, content_hash, _blob(vector), row,
                                               self.generation, item_id))
            self.set_attributes(item_id, subset=subset, caption=caption, metadata=metadata)
        else:
            item_id = self.conn.execute(
                "INSERT INTO items(path, size, mtime_ns, hash, subset, caption, metadata, vector, row, gen, added) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (stat.path, stat.size, stat.mtime_ns, content_hash, None if subset is KEEP else subset,
                 None if caption is KEEP else caption, json.dumps({} if metadata is KEEP else metadata or {}),
                 _blob(vector), row, self.generation, time.time())).lastrowid
        self.conn.execute("DELETE FROM failures WHERE path = ?", (stat.path,))
        self.written.append((row, item_id, vector))
        return item_id, existing is not None

    def insert_new(self, stats: Sequence[FileStat], hashes: Sequence[str], vectors: np.ndarray, *,
                   subset: Optional[str] = None, metadata: Optional[Sequence[Any]] = None) -> None:
        """Insert items at paths not in the store yet, in one statement (bulk loads)."""
        if not stats:
            return
        first = self.next_row
        self.next_row += len(stats)
        now = time.time()
        self.conn.executemany(
            "INSERT INTO items(path, size, mtime_ns, hash, subset, caption, metadata, vector, row, gen, added) "
            "VALUES (?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?)",
            ((s.path, s.size, s.mtime_ns, h, subset,
              json.dumps({} if metadata is None or metadata[j] is KEEP else metadata[j] or {}),
              _blob(vectors[j]), first + j, self.generation, now) for j, (s, h) in enumerate(zip(stats, hashes))))
        ids = dict(self.conn.execute("SELECT row, id FROM items WHERE row >= ? AND row < ?",
                                     (first, self.next_row)).fetchall())
        self.written.extend((first + j, ids[first + j], vectors[j]) for j in range(len(stats)))

    def move(self, item_id: int, stat: FileStat) -> None:
        """The same content under a new path: keep the vector and the row."""
        self.conn.execute("UPDATE items SET path = ?, size = ?, mtime_ns = ? WHERE id = ?",
                          (stat.path, stat.size, stat.mtime_ns, item_id))
        self.conn.execute("DELETE FROM failures WHERE path = ?", (stat.path,))

    def touch(self, item_id: int, stat: FileStat) -> None:
        """New size/mtime, same content hash: nothing to embed."""
        self.conn.execute("UPDATE items SET size = ?, mtime_ns = ? WHERE id = ?", (stat.size, stat.mtime_ns, item_id))

    def set_attributes(self, item_id: int, *, subset: Any = KEEP, caption: Any = KEEP, metadata: Any = KEEP) -> None:
        for column, value in (("subset", subset), ("caption", caption)):
            if value is not KEEP:
                self.conn.execute(f"UPDATE items SET {column} = ? WHERE id = ?", (value, item_id))
        if metadata is not KEEP:
            self.conn.execute("UPDATE items SET metadata = ? WHERE id = ?", (json.dumps(metadata or {}), item_id))

    def delete(self, item_id: int) -> None:
        found = self.conn.execute("SELECT row FROM items WHERE id = ?", (item_id,)).fetchone()
        if found:
            self._kill_row(found[0])
            self.conn.execute("DELETE FROM items WHERE id = ?", (item_id,))

    def record_failure(self, stat: FileStat, reason: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO failures(path, size, mtime_ns, reason, seen) VALUES (?, ?, ?, ?, ?)",
                          (stat.path, stat.size, stat.mtime_ns, reason, time.time()))

    def clear_failure(self, path: str) -> None:
        self.conn.execute("DELETE FROM failures WHERE path = ?", (path,))

    def _kill_row(self, row: int) -> None:
        self.conn.execute("INSERT OR REPLACE INTO dead_rows(row, gen) VALUES (?, ?)", (row, self.generation))


def _read_current(root: Path) -> Optional[str]:
    try:
        name = (root / CURRENT).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {root / CURRENT}: {exc}") from None
    if not name or "/" in name or name.startswith("."):
        raise StoreError(f"{root / CURRENT} is damaged (names {name!r}); rebuild the store with `index --reindex`")
    return name
