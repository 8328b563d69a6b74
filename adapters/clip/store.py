"""The local embedded store: one folder, SQLite for the truth, a memory-mapped matrix for speed.

Layout of a store folder (`--store DIR`):

    DIR/CURRENT             names the live data folder ("data-1"); `index --reindex` replaces it atomically
    DIR/writer.lock         held by the one process that writes (index, reindex)
    DIR/data-N/store.db     SQLite (WAL): per item its path, size, mtime, content hash, subset, caption,
                            metadata JSON and vector; the model binding; the schema version (user_version)
    DIR/data-N/vectors.f32  every vector in one contiguous float32 matrix (row = items.row)
    DIR/data-N/rows.i64     the item id of each matrix row, 0 where the row is dead
    DIR/data-N/matrix.json  the database generation the two files reflect, their block CRCs and stamps
    DIR/data-N/ann*.faiss   the ANN index of large stores (see search.py)
    DIR/reindex-<model>/    a re-index in progress; a stopped one is resumed by the next `--reindex`

Why this shape:
- SQLite is the truth and is crash-safe by itself (WAL, one transaction per batch). The matrix is a
  cache of it that a search maps instead of parsing a million rows.
- Matrix rows are append-only and never rewritten: a changed item gets a new row and its old row
  is marked dead. A reader mapping the file while an index run appends never sees a torn row.
- Every write transaction bumps a generation and records the rows it added (items.gen) or killed
  (dead_rows.gen); matrix.json says up to which generation the files are written. A writer that
  finds them behind (after its commit, or after a crash) replays just that delta.
- Readers never write (SQLite opened with mode=ro). Files behind the database or failing their
  checksums are searched from a copy rebuilt in memory from SQLite, with a warning; the next
  writer or `check --repair` (integrity.py) rewrites them. Nothing is deleted unless proven to be
  debris: see `settle_layout`.
- The store is bound to the model that made its vectors (fingerprint + dimension): vectors of two
  models are not comparable, so using another model is an error, and `reindex` builds the new
  vectors in a folder beside the old one and swaps `CURRENT`, so a failed re-index changes nothing.

The matrix files live in matrix.py, metadata conditions in filters.py; filling a store from folders
(`index`, `reindex`) in indexing.py; searching it in search.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
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
from .faults import faultpoint
from .files import pwrite, write_text_atomic
from .filters import Condition, register_sql_functions, typed_metadata
from .matrix import MATRIX_LOCK, MatrixSnapshot, MatrixState, VectorMatrix

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
DATA_PREFIX = "data-"
REINDEX_PREFIX = "reindex-"

# Rewrite the matrix without dead rows once they are this large a share of it.
COMPACT_DEAD_FRACTION = 0.25
COMPACT_MIN_DEAD = 1024
# Rows read or written per chunk when streaming the whole matrix (bounded memory at any size).
CHUNK_ROWS = 16384

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


def _check_schema_version(conn: sqlite3.Connection, where: Path) -> int:
    version = _user_version(conn)
    if version > SCHEMA_VERSION:
        raise StoreError(f"{where}: store schema version {version} is newer than this code reads "
                         f"({SCHEMA_VERSION}); upgrade the adapter")
    return version


def _migrate(conn: sqlite3.Connection, where: Path) -> None:
    version = _check_schema_version(conn, where)
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


def _connect(db_path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode; `readonly` opens with `mode=ro`, so SQLite itself refuses
    any write (a search never creates, migrates or repairs a database, whatever it finds)."""
    try:
        if readonly:
            conn = sqlite3.connect(f"{db_path.absolute().as_uri()}?mode=ro", uri=True, timeout=60,
                                   isolation_level=None, check_same_thread=False)
            register_sql_functions(conn)
            return conn
        conn = sqlite3.connect(str(db_path), timeout=60, isolation_level=None, check_same_thread=False)
        register_sql_functions(conn)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a killed process loses nothing committed; only power loss may drop
        # the last transactions (never corrupts).
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{db_path}: not a readable store database ({exc}); "
                         f"{repair_hint(db_path.parent.parent)}") from None


@contextlib.contextmanager
def sqlite_errors(root: Path) -> Iterator[None]:
    """SQLite's own failures (a full or failing disk, a damaged file) as one StoreError line that says
    what to do. A failed transaction rolled back: everything committed before it is kept."""
    try:
        yield
    except sqlite3.Error as exc:
        text = str(exc)
        if any(word in text for word in ("full", "I/O", "readonly", "unable to open")):
            raise StoreError(f"store {root}: cannot write its database ({text}): the disk may be full, read-only "
                             f"or failing; free some space and rerun (what was committed before is kept)") from None
        raise StoreError(f"store {root}: database error ({text}); {repair_hint(root)}") from None


def unreadable_database(root: Path, data_dir: Path, exc: Exception) -> StoreError:
    """Why a database could not be read, for people: damaged, unless a writer is running and only its
    write-ahead log is missing (deleted under it). SQLite then refuses readers (disk I/O error) until
    the writer ends; the writer, holding the log open, finishes with nothing lost."""
    wal = data_dir / f"{DB_FILE}-wal"
    writer = running_writer(root)
    # (the failed reader itself may have left an empty log file where the deleted one was)
    log_gone = not wal.exists() or wal.stat().st_size == 0
    if writer is not None and log_gone and (data_dir / f"{DB_FILE}-shm").exists():
        return StoreError(f"store {root} is being written (pid {writer}) and its write-ahead log {wal.name} is "
                          f"missing (deleted while in use?): the database cannot be read until that writer "
                          f"finishes; search again then (nothing is lost: the writer holds the log open)")
    return StoreError(f"store {root} is damaged: {data_dir / DB_FILE} cannot be read ({exc}); {repair_hint(root)}")


def running_writer(root: Path) -> Optional[int]:
    """The pid of the process holding a store's writer lock, if one does. Asked of the kernel's lock
    table (/proc/locks), never by trying the lock: even a moment's shared lock taken by a reader could
    make a starting writer fail. Elsewhere: the pid the lock file names, if that process is alive."""
    lock = Path(root) / WRITER_LOCK
    try:
        inode = lock.stat().st_ino
        named = int(lock.read_text(encoding="ascii").strip() or 0)
    except (OSError, ValueError):
        return None
    try:
        with open("/proc/locks", encoding="ascii") as fh:
            table = fh.read().splitlines()
    except OSError:
        table = None
    if table is not None:
        for line in table:  # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
            fields = line.split()
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                return int(fields[4])
        return None
    try:
        os.kill(named, 0)
    except (OSError, ValueError):
        return None
    return named or None


def repair_hint(root: Path) -> str:
    """The command that works on a damaged store (every damaged-store message ends with it)."""
    return f"run `python -m adapters.clip check --store {root} --repair`"


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
    vector_bytes: int = -1  # the length of its vector in the database (SQLite reads it without the blob)


_ITEM_COLUMNS = "id, path, size, mtime_ns, hash, row, subset, caption, metadata, length(vector)"


def _record(row: tuple) -> ItemRecord:
    return ItemRecord(id=row[0], path=row[1], size=row[2], mtime_ns=row[3], hash=row[4], row=row[5],
                      subset=row[6], caption=row[7], metadata=typed_metadata(json.loads(row[8] or "{}")),
                      vector_bytes=row[9])


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
        pwrite(fd, str(os.getpid()).encode(), 0)
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
def _file_lock(path: Path, *, create: bool = True) -> Iterator[None]:
    """Blocking exclusive lock on a small file (the matrix sync lock: held for milliseconds).

    `create=False` (readers): no lock file means no writer ever synced here; nothing to wait for.
    """
    try:
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644) if create else os.open(str(path), os.O_RDONLY)
    except FileNotFoundError:
        if create:
            raise
        yield
        return
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def _metadata_json(metadata: Optional[dict[str, Any]]) -> str:
    return json.dumps(typed_metadata(metadata), ensure_ascii=False)


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

    def __init__(self, root: Path, data_dir: Path, conn: sqlite3.Connection, *, readonly: bool = False):
        self.root = root
        self.data_dir = data_dir
        self.conn = conn
        self.readonly = readonly
        try:
            meta = self._meta()
        except sqlite3.DatabaseError as exc:
            raise unreadable_database(root, data_dir, exc) from None
        if meta.get("format") != STORE_FORMAT or not {"model_name", "model_fingerprint", "dim"} <= set(meta):
            raise StoreError(f"{data_dir / DB_FILE}: not a {STORE_FORMAT} database; {repair_hint(root)}")
        self.binding = ModelBinding(meta["model_name"], meta["model_fingerprint"], int(meta["dim"]))
        self.matrix = VectorMatrix(data_dir, self.binding.dim)
        self._snapshot: Optional[MatrixSnapshot] = None
        self._search_index: Optional[tuple[Any, Any]] = None  # (key, index): search.py's loaded ANN index
        self.warnings: list[str] = []          # what a read-only store found and could not fix
        self.malformed: dict[int, int] = {}     # item id -> row of damaged vector blobs met so far

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | os.PathLike, *, create: Optional[ModelBinding] = None,
             readonly: bool = False) -> "Store":
        """Open the store in `root`; with `create`, make an empty one bound to that model if there is none.

        `readonly` (searches): SQLite opened with mode=ro and nothing in the folder written, even
        when something is found damaged (the search then works from a copy in memory, and says so).
        """
        root = Path(root).expanduser().absolute()
        current = _read_current(root)
        if current is None:
            if create is None or readonly:
                if any(_items_held(folder) != 0 for folder in _data_dirs(root)):
                    raise StoreError(f"store {root} is damaged: {CURRENT} is missing; {repair_hint(root)}")
                raise StoreError(f"no store in {root}; build one with "
                                 f"`python -m adapters.clip index PATH... --store {root}`")
            with writer_lock(root):
                current = _read_current(root)
                if current is None:
                    return cls._create(root, create)
        data_dir = root / current
        if not (data_dir / DB_FILE).is_file():
            raise StoreError(f"store {root} is damaged: {root / CURRENT} names {current!r}, which has no "
                             f"{DB_FILE}; {repair_hint(root)}")
        return cls.open_data_dir(root, data_dir, readonly=readonly)

    @staticmethod
    def current_data_name(root: Path) -> Optional[str]:
        """The name of the live data folder in `root` (what CURRENT says), or None when there is no store."""
        return _read_current(Path(root))

    @classmethod
    def _create(cls, root: Path, binding: ModelBinding) -> "Store":
        """A new store. Caller holds the writer lock and found no CURRENT.

        A data folder already there is removed only when it provably holds nothing (a creation
        that died before writing CURRENT); one holding items means CURRENT was lost: an error.
        """
        for folder in _data_dirs(root):
            held = _items_held(folder)
            if held != 0:
                what = "an unreadable database" if held is None else f"{held} items"
                raise StoreError(f"store {root} is damaged: {CURRENT} is missing but {folder.name} holds {what}; "
                                 f"{repair_hint(root)}")
            shutil.rmtree(folder)
        data_dir = root / f"{DATA_PREFIX}1"
        store = cls.create_data_dir(root, data_dir, binding)
        faultpoint("store.created-before-current")
        write_text_atomic(root / CURRENT, data_dir.name + "\n")
        return store

    @classmethod
    def open_data_dir(cls, root: Path, data_dir: Path, *, readonly: bool = False) -> "Store":
        conn = _connect(data_dir / DB_FILE, readonly=readonly)
        try:
            try:
                if readonly:
                    _check_schema_version(conn, data_dir)
                else:
                    _migrate(conn, data_dir)
            except sqlite3.DatabaseError as exc:
                raise unreadable_database(root, data_dir, exc) from None
            return cls(root, data_dir, conn, readonly=readonly)
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
        """The item's vector; None when there is no such item or its stored vector is damaged."""
        row = self.conn.execute("SELECT vector FROM items WHERE id = ? AND length(vector) = ?",
                                (item_id, self.vector_bytes)).fetchone()
        return np.frombuffer(row[0], dtype="<f4").astype(np.float32) if row else None

    def vector_for_hash(self, content_hash: str) -> Optional[np.ndarray]:
        """The vector of any item with this content: identical bytes need no second embedding."""
        row = self.conn.execute("SELECT vector FROM items WHERE hash = ? AND length(vector) = ? LIMIT 1",
                                (content_hash, self.vector_bytes)).fetchone()
        return np.frombuffer(row[0], dtype="<f4").astype(np.float32) if row else None

    @property
    def vector_bytes(self) -> int:
        """The length of a well-formed vector blob (float32 x dim)."""
        return 4 * self.binding.dim

    def malformed_items(self) -> list[tuple[int, str, int, int]]:
        """(id, path, row, length) of the items whose vector blob has the wrong length (a stray write,
        a damaged page): they are skipped wherever vectors are read, and reported. Reads every row."""
        return self.conn.execute("SELECT id, path, row, length(vector) FROM items WHERE length(vector) != ? "
                                 "ORDER BY path", (self.vector_bytes,)).fetchall()

    def restore_vectors(self, vectors: dict[int, np.ndarray]) -> None:
        """Write back {item id: vector} over damaged blobs, the rows unchanged (the matrix already holds
        these vectors, so no generation passes)."""
        with writer_lock(self.root), _immediate(self.conn):
            self.conn.executemany("UPDATE items SET vector = ? WHERE id = ?",
                                  [(_blob(v), item_id) for item_id, v in vectors.items()])

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

    def keys_missing(self, conditions: Sequence[Condition]) -> list[str]:
        """The condition keys that no item has (a typo, or metadata never indexed)."""
        missing = []
        for condition in conditions:
            found = self.conn.execute("SELECT 1 FROM items WHERE json_type(metadata, ?) IS NOT NULL LIMIT 1",
                                      (condition.json_path,)).fetchone()
            if found is None and condition.key not in missing:
                missing.append(condition.key)
        return missing

    def metadata_keys(self, limit: int = 50) -> list[str]:
        """Top-level metadata keys in use, most common first."""
        return [key for (key,) in self.conn.execute(
            "SELECT j.key FROM items, json_each(items.metadata) AS j GROUP BY j.key ORDER BY COUNT(*) DESC LIMIT ?",
            (limit,))]

    # ---- the matrix ----------------------------------------------------------------------
    def snapshot(self) -> MatrixSnapshot:
        """The vectors of every committed item, as a memory-mapped matrix (cached per generation).

        Files that are behind the database or fail their checksums are brought up to date from
        SQLite (the truth) by a writable store; a read-only one builds the matrix in memory
        instead and says so in `warnings` (the files stay as they are for `check --repair`).
        """
        generation = self.generation()
        if self._snapshot is not None and self._snapshot.state.generation == generation:
            return self._snapshot
        state = self.matrix.state()
        if state is None or state.generation != generation or not self.matrix.intact(state):
            # a writer may be mid-sync: wait for it, then look again
            with _file_lock(self.data_dir / MATRIX_LOCK, create=not self.readonly):
                if not self.readonly:
                    state = self._sync_matrix()
                else:
                    generation = self.generation()
                    state = self.matrix.state()
                    if state is None or state.generation != generation or not self.matrix.intact(state):
                        self._snapshot = self._memory_snapshot(state, generation)
                        return self._snapshot
        self._snapshot = self.matrix.open(state)
        return self._snapshot

    def _memory_snapshot(self, state: Optional[MatrixState], generation: int) -> MatrixSnapshot:
        why = ("is missing" if state is None else "is behind the database (an interrupted writer)"
               if state.generation != generation else "does not match its checksums")
        self.warnings.append(f"store {self.root}: the vector matrix {why}; searching a copy rebuilt in memory "
                             f"from the database; {repair_hint(self.root)}")
        log.warning(self.warnings[-1])
        with _read_transaction(self.conn):
            meta = self._meta()
            target = MatrixState(int(meta["generation"]), int(meta["epoch"]), int(meta["next_row"]),
                                 self.binding.dim)
            vectors = np.zeros((target.rows, self.binding.dim), np.float32)
            ids = np.zeros(target.rows, np.int64)
            for rows, item_ids, found in self.iter_rows():
                vectors[rows], ids[rows] = found, item_ids
        return MatrixSnapshot(vectors, ids, target)

    def _sync_matrix(self, fresh: Optional[list[tuple[int, int, np.ndarray]]] = None) -> MatrixState:
        """Bring the matrix files up to the committed generation. Caller holds the matrix lock.

        `fresh` is what the caller's last transaction wrote, to avoid reading it back from SQLite.
        """
        if self.readonly:
            raise StoreError(f"store {self.root} was opened read-only")
        self.matrix.remove_debris()
        state = self.matrix.state()
        if state is not None and not self.matrix.unchanged_since_recorded():
            problems = self.matrix.problems(state)
            if problems:
                log.warning("%s: the vector matrix does not match its checksums (%s); rebuilding it from the "
                            "database", self.data_dir, problems[0])
                state = None
        with _read_transaction(self.conn):
            meta = self._meta()
            target = MatrixState(int(meta["generation"]), int(meta["epoch"]), int(meta["next_row"]),
                                 self.binding.dim)
            if state == target:
                return state
            if state is not None and state.generation > target.generation:
                log.warning("%s: the database is older than its vector matrix (generation %d < %d): its last "
                            "transactions were lost (a deleted or lost store.db-wal?); rebuilding the matrix from "
                            "the database; index the folders again to re-add what was lost",
                            self.data_dir, target.generation, state.generation)
            if state is None or state.epoch != target.epoch or state.generation > target.generation:
                log.info("%s: rebuilding the vector matrix from the database", self.data_dir)
                self.matrix.replace(self.iter_rows(), target)
                return target
            if fresh is not None and state.generation == target.generation - 1:
                rows = np.array([r for r, _, _ in fresh], dtype=np.int64)
                ids = np.array([i for _, i, _ in fresh], dtype=np.int64)
                vectors = np.array([v for _, _, v in fresh], dtype=np.float32).reshape(len(fresh), self.binding.dim)
            else:
                rows, ids, vectors = self._changed_rows(state.generation)
            dead = [r for (r,) in self.conn.execute("SELECT row FROM dead_rows WHERE gen > ?", (state.generation,))]
        self.matrix.write(rows, ids, vectors, dead)
        self.matrix.record(target, touched=[*rows.tolist(), *dead])
        return target

    def catch_up(self) -> MatrixState:
        """Bring the matrix files up to the database (after a killed writer, or damage) now, not at
        the next transaction: a writer run that finds nothing to change still leaves them right."""
        with writer_lock(self.root), _file_lock(self.data_dir / MATRIX_LOCK):
            state = self._sync_matrix()
        self._snapshot = None
        return state

    def rebuild_matrix(self) -> MatrixState:
        """Rewrite the matrix files from SQLite, whatever they hold now (`check --repair`)."""
        with writer_lock(self.root), _file_lock(self.data_dir / MATRIX_LOCK):
            with _read_transaction(self.conn):
                meta = self._meta()
                target = MatrixState(int(meta["generation"]), int(meta["epoch"]), int(meta["next_row"]),
                                     self.binding.dim)
                self.matrix.replace(self.iter_rows(), target)
        self._snapshot = None
        return target

    def _changed_rows(self, since: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        found = self.conn.execute("SELECT row, id, vector FROM items WHERE gen > ?", (since,)).fetchall()
        return self._as_arrays(found)

    def iter_rows(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(rows, ids, vectors) of every item, in chunks; an item whose vector blob is damaged is left
        out (its row is then dead in a matrix built from this) and reported in `warnings`."""
        cursor = self.conn.execute("SELECT row, id, vector FROM items")
        while True:
            found = cursor.fetchmany(CHUNK_ROWS)
            if not found:
                return
            yield self._as_arrays(found)

    def _as_arrays(self, found: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        intact = [isinstance(r[2], bytes) and len(r[2]) == self.vector_bytes for r in found]
        good = [r for r, ok in zip(found, intact) if ok]
        if len(good) < len(found):
            self._report_malformed([(r[1], r[0]) for r, ok in zip(found, intact) if not ok])
        return (np.array([r[0] for r in good], dtype=np.int64), np.array([r[1] for r in good], dtype=np.int64),
                np.frombuffer(b"".join(r[2] for r in good), dtype="<f4").reshape(len(good), self.binding.dim))

    def _report_malformed(self, found: list[tuple[int, int]]) -> None:
        """Damaged vector blobs met while reading: remembered (id -> row) and said once."""
        said = self._malformed_warning()
        self.malformed.update(found)
        if self._malformed_warning() != said:
            self.warnings = [w for w in self.warnings if w != said] + [self._malformed_warning()]
            log.warning(self.warnings[-1])

    def _malformed_warning(self) -> str:
        return (f"store {self.root}: {len(self.malformed)} item(s) have a damaged vector in the database (a blob "
                f"of the wrong length), left out; {repair_hint(self.root)}")

    # ---- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator["Transaction"]:
        """One atomic batch of changes; the matrix follows right after the commit."""
        if self.readonly:
            raise StoreError(f"store {self.root} was opened read-only")
        with writer_lock(self.root), _file_lock(self.data_dir / MATRIX_LOCK):
            self._sync_matrix()  # a crashed run's last commit, or damaged files: catch up before adding
            with _immediate(self.conn):
                meta = self._meta()
                txn = Transaction(self, int(meta["generation"]) + 1, int(meta["next_row"]))
                yield txn
                self.conn.executemany("UPDATE meta SET value = ? WHERE key = ?",
                                      [(str(txn.generation), "generation"), (str(txn.next_row), "next_row")])
                faultpoint("txn.before-commit")
            faultpoint("txn.committed")
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
            faultpoint("compact.committed")
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

    def count_under(self, folder: str) -> int:
        """Stored items whose path lies under `folder`."""
        return int(self.conn.execute("SELECT COUNT(*) FROM items WHERE path > ? AND path < ?",
                                     _prefix_range(folder)).fetchone()[0])

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
                 None if caption is KEEP else caption, _metadata_json({} if metadata is KEEP else metadata),
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
              _metadata_json({} if metadata is None or metadata[j] is KEEP else metadata[j]),
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
            self.conn.execute("UPDATE items SET metadata = ? WHERE id = ?", (_metadata_json(metadata), item_id))

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
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"store {root} is damaged: cannot read {root / CURRENT} ({exc}); {repair_hint(root)}") from None
    if not name or "/" in name or os.sep in name or name.startswith("."):
        raise StoreError(f"store {root} is damaged: {root / CURRENT} names {name[:40]!r}; {repair_hint(root)}")
    return name


def _data_number(folder: Path) -> Optional[int]:
    suffix = folder.name[len(DATA_PREFIX):]
    return int(suffix) if folder.name.startswith(DATA_PREFIX) and suffix.isdigit() else None


def _data_dirs(root: Path) -> list[Path]:
    """The data-N folders of a store, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _data_number(p) is not None]
    return sorted(found, key=_data_number)


def next_data_dir(root: Path) -> Path:
    return root / f"{DATA_PREFIX}{max((_data_number(p) for p in _data_dirs(root)), default=0) + 1}"


def _items_held(folder: Path) -> Optional[int]:
    """Items in a data folder's database: 0 when there is none, None when it cannot be read."""
    if not (folder / DB_FILE).is_file():
        return 0
    try:
        conn = _connect(folder / DB_FILE, readonly=True)
    except StoreError:
        return None
    try:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]) if "items" in tables else 0
    except sqlite3.DatabaseError:
        return None
    finally:
        conn.close()


def _is_store_db(folder: Path) -> bool:
    try:
        with contextlib.closing(_connect(folder / DB_FILE, readonly=True)) as conn:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            conn.execute("SELECT COUNT(*) FROM items").fetchone()
        return meta.get("format") == STORE_FORMAT
    except (StoreError, sqlite3.DatabaseError):
        return False


def remove_temp_files(data_dir: Path) -> None:
    """Temp files of writers killed mid-write (`.vectors.f32.tmp-PID`, `.matrix.tmp-PID-TID.json`,
    `.ann-....faiss.tmp`). Only a writer makes them, and the caller holds the writer lock: none is live."""
    for path in data_dir.glob(".*"):
        if ".tmp" in path.name and path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()


def settle_layout(root: Path) -> list[str]:
    """Before a writer opens the store (it holds the writer lock): finish or clear what a killed
    re-index left, deleting only folders proven to be superseded. Returns notes for the user.

    - CURRENT damaged, or naming a folder without a readable database: StoreError, nothing deleted.
    - data-N newer than CURRENT: a re-index renamed into place and killed before CURRENT was
      written (it is renamed only once complete): CURRENT is switched to it.
    - data-N older than CURRENT: left by a finished re-index (a reader may have used it until
      now): removed.
    """
    current = _read_current(root)
    if current is None:
        return []
    live = root / current
    if _data_number(live) is None or not _is_store_db(live):
        raise StoreError(f"store {root} is damaged: {CURRENT} names {current!r}, which is not a readable "
                         f"data folder; {repair_hint(root)}")
    remove_temp_files(live)
    notes = []
    newer = [p for p in _data_dirs(root) if _data_number(p) > _data_number(live) and _is_store_db(p)]
    if newer:
        live = newer[-1]
        write_text_atomic(root / CURRENT, live.name + "\n")
        notes.append(f"finished the re-index that was stopped just before switching to {live.name}")
    for folder in _data_dirs(root):
        if _data_number(folder) < _data_number(live):
            shutil.rmtree(folder, ignore_errors=True)
    return notes
