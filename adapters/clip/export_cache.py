"""The export cache on disk: which folders may hold a model's exports, whether an export's files are
the ones its `export.json` vouches for, which fingerprint a model name has without loading it, and
the lock that makes exporting safe from many threads and processes. Torch-free.

One folder per weights fingerprint (see engines.py for the files in it); beside them:

    <root>/names/<key>.json       a model name's identity: its weights files (size, mtime, inode,
                                  ctime) and the torch/open_clip versions -> the fingerprint
    <root>/.lock-<fingerprint>    held (flock) while that fingerprint is exported or rebuilt

Roots, in the order they are read: `<checkpoint>/engines` for this project's checkpoints (the
artifacts `save` uploads carry their exports), then `$CLIP_ADAPTER_ENGINES`, else the user cache
(`$XDG_CACHE_HOME/clip-adapter/engines`). A root that cannot be written (a baked read-only image
cache) is still read; new exports then go to the next writable one.

Trust: `export.json` records each file's size and blake2b and the weights' fingerprint. Before a
process uses an export it checks the files it needs once; a file already hashed is recognised by
its stat (inode, size, mtime, ctime: any write changes ctime), recorded in `verified.json`
beside it, so only new or changed files are hashed again. Bit rot that changes none of those is
not caught (the same limit as the store's matrix check).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import EngineError
from .files import fsync_dir, write_json_atomic

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: threads are still serialised, processes are not
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

ENGINE_ENV = "CLIP_ADAPTER_ENGINES"
CHECKPOINT_CONFIG = "clip_config.json"    # models.CHECKPOINT_CONFIG, repeated here to stay torch-free
CHECKPOINT_WEIGHTS = "model.safetensors"  # models.CHECKPOINT_WEIGHTS
CHECKPOINT_ENGINES = "engines"
EXPORT_INFO = "export.json"
EXPORT_FORMAT = 2          # 2: per-file hashes and sizes; format 1 exports are rebuilt
VERIFIED = "verified.json"
NAMES = "names"
WORK_PREFIX = ".export-"   # an export's work folder; one left by a killed export is swept
HASH_BLOCK = 1 << 22


class ExportDamaged(EngineError):
    """An export whose files are not the ones its export.json describes (or that lacks one)."""

    def __init__(self, directory: Path, reason: str) -> None:
        self.directory = Path(directory)
        super().__init__(f"{directory}: {reason}")


# --------------------------------------------------------------------------------------
# Roots
# --------------------------------------------------------------------------------------
def user_engine_root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "clip-adapter" / CHECKPOINT_ENGINES


def default_engine_root() -> Path:
    if os.environ.get(ENGINE_ENV):
        return Path(os.environ[ENGINE_ENV]).expanduser()
    return user_engine_root()


def checkpoint_dir(model_name: str) -> Optional[Path]:
    """This project's checkpoint folder, when `model_name` names one."""
    path = Path(model_name).expanduser()
    if path.name == CHECKPOINT_CONFIG:
        path = path.parent
    return path.absolute() if (path / CHECKPOINT_CONFIG).is_file() else None


def writable(path: Path) -> bool:
    """Whether `path` (or, not made yet, its nearest existing parent) can be written: tried, as
    permission bits do not bind root and an immutable or read-only mount ignores them."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not (candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK)):
                return False
            try:
                with tempfile.TemporaryFile(dir=candidate, prefix=".probe-"):
                    return True
            except OSError:
                return False
    return False


def engine_roots(model_name: str) -> list[Path]:
    """Where to look for this model's exports, in order."""
    roots = []
    checkpoint = checkpoint_dir(model_name)
    if checkpoint is not None:
        roots.append(checkpoint / CHECKPOINT_ENGINES)
    roots.append(default_engine_root())
    if os.environ.get(ENGINE_ENV) and not writable(roots[-1]):
        roots.append(user_engine_root())  # a read-only baked cache: new exports go to the user's
    return list(dict.fromkeys(roots))


def write_root(model_name: str) -> Path:
    """The first root that can be written; the first one when none can (the write then fails clearly)."""
    roots = engine_roots(model_name)
    return next((root for root in roots if writable(root)), roots[0])


def tower_file(directory: Path, tower: str, precision: str) -> Path:
    return directory / f"{tower}-{precision}.onnx"


def tower_files(directory: Path, tower: str, precision: str, info: dict[str, Any]) -> list[str]:
    """The file names one tower needs: the graph and, when it has one, its external weights."""
    graph = tower_file(directory, tower, precision).name
    return [name for name in (graph, graph + ".data") if name in info.get("files", {})] or [graph]


# --------------------------------------------------------------------------------------
# export.json and the check of the files it vouches for
# --------------------------------------------------------------------------------------
def read_export_info(directory: Path) -> Optional[dict[str, Any]]:
    """The export's description, or None when there is no complete export of this format here."""
    try:
        info = json.loads((directory / EXPORT_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT or not isinstance(info.get("files"), dict):
        return None
    return info


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def describe_file(path: Path) -> dict[str, Any]:
    """What export.json records of one file: its size and content hash."""
    return {"size": path.stat().st_size, "blake2b": file_digest(path)}


_checked: dict[tuple, str] = {}  # (path, stat) -> blake2b: each file is hashed at most once per process
_checked_lock = threading.Lock()


def _stat_key(path: Path) -> tuple:
    st = os.stat(path)
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_export(directory: Path, names: Optional[list[str]] = None) -> dict[str, Any]:
    """export.json of `directory`, after checking the named files (default: all) against it.

    Raises ExportDamaged naming the folder and the first file that differs."""
    info = read_export_info(directory)
    if info is None:
        raise ExportDamaged(directory, "no complete export here (export.json missing, unreadable or older)")
    if info.get("fingerprint") != directory.name:
        raise ExportDamaged(directory, f"export.json belongs to other weights (fingerprint "
                            f"{str(info.get('fingerprint'))[:12]}, folder {directory.name[:12]})")
    stamps = _read_stamps(directory)
    new_stamps: dict[str, list] = {}
    for name in names if names is not None else list(info["files"]):
        expected = info["files"].get(name)
        if not isinstance(expected, dict):
            raise ExportDamaged(directory, f"{name} is not listed in export.json")
        path = directory / name
        try:
            key = _stat_key(path)
        except OSError:
            raise ExportDamaged(directory, f"{name} is missing") from None
        if key[3] != expected.get("size"):
            raise ExportDamaged(directory, f"{name} has {key[3]} bytes, export.json says {expected.get('size')}")
        with _checked_lock:
            digest = _checked.get(key)
        if digest is None and stamps.get(name) == list(key[1:]) + [expected.get("blake2b")]:
            digest = expected.get("blake2b")  # hashed earlier, unchanged since (any write changes ctime)
        if digest is None:
            digest = file_digest(path)
            new_stamps[name] = list(key[1:]) + [digest]
        with _checked_lock:
            _checked[key] = digest
        if digest != expected.get("blake2b"):
            raise ExportDamaged(directory, f"{name}'s content differs from what export.json recorded")
    if new_stamps:
        _write_stamps(directory, {**stamps, **new_stamps})
    return info


def _read_stamps(directory: Path) -> dict[str, list]:
    try:
        stamps = json.loads((directory / VERIFIED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _write_stamps(directory: Path, stamps: dict[str, list]) -> None:
    if writable(directory):
        with contextlib.suppress(OSError):
            write_json_atomic(directory / VERIFIED, stamps, indent=None)


_warned: set[str] = set()


def warn_damaged(exc: ExportDamaged, action: str) -> None:
    """One warning per damaged folder and process: what is wrong, and what happens instead."""
    if str(exc.directory) not in _warned:
        _warned.add(str(exc.directory))
        log.warning("engine export damaged: %s; %s", exc, action)


def forget_checks(directory: Path) -> None:
    """Drop what this process remembered of `directory`'s files (after rebuilding them)."""
    with _checked_lock:
        for key in [k for k in _checked if Path(k[0]).parent == directory]:
            del _checked[key]


# --------------------------------------------------------------------------------------
# Writing: one exporter per fingerprint at a time; what a killed one left is swept
# --------------------------------------------------------------------------------------
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def export_lock(directory: Path) -> Iterator[None]:
    """Exclusive right to write `directory`: a thread lock (flock does not order threads sharing
    nothing but a path reliably everywhere) and an flock on `<root>/.lock-<fingerprint>`."""
    with _thread_locks_guard:
        lock = _thread_locks.setdefault(str(directory), threading.Lock())
    with lock:
        directory.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(directory.parent / f".lock-{directory.name}"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock


def sweep_debris(directory: Path) -> list[str]:
    """Remove what a killed export left in `directory` (call with `export_lock` held)."""
    removed = []
    if directory.is_dir():
        for path in directory.iterdir():
            if path.name.startswith(WORK_PREFIX) or ".tmp-" in path.name:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path.name)
    if removed:
        log.info("removed %d leftover file(s) of an interrupted export in %s", len(removed), directory)
    return removed


def discard_export(directory: Path) -> None:
    """Remove a damaged export's files (call with `export_lock` held): export.json first, so a kill
    midway leaves no folder that claims to be complete. `auto`'s choice stays: it belongs to the
    weights (the folder's fingerprint), which the rebuilt export reproduces."""
    (directory / EXPORT_INFO).unlink(missing_ok=True)
    fsync_dir(directory)
    for path in directory.iterdir() if directory.is_dir() else ():
        if path.name.startswith("auto-"):
            continue  # measured on these weights: a rebuilt export of them is the same model
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    forget_checks(directory)


def durable_rename(source: Path, target: Path) -> None:
    """fsync `source`'s bytes, then rename it over `target` (the rename alone can land before the data)."""
    with open(source, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(source, target)


# --------------------------------------------------------------------------------------
# A model name's identity -> its fingerprint, without loading the weights
# --------------------------------------------------------------------------------------
def name_key(model_name: str) -> str:
    """What identifies a name: a path made absolute (any working directory), else the name itself."""
    path = Path(model_name).expanduser()
    checkpoint = checkpoint_dir(model_name)
    if checkpoint is not None:
        return str(checkpoint)
    return str(path.absolute()) if path.exists() else model_name


def _identity_file(root: Path, model_name: str) -> Path:
    digest = hashlib.blake2b(name_key(model_name).encode(), digest_size=12).hexdigest()
    return root / NAMES / f"{digest}.json"


def _versions() -> dict[str, str]:
    """A random initialisation (`ARCH:random`, `tiny`) is only the same under the same libraries."""
    found = {}
    for package in ("torch", "open_clip_torch"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "-"
    return found


def _file_identity(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
            "ctime_ns": st.st_ctime_ns}


def identity(model_name: str, weights_files: list[str]) -> dict[str, Any]:
    return {"name": name_key(model_name), "versions": _versions(),
            "files": [_file_identity(f) for f in weights_files]}


def remember_fingerprint(model_name: str, weights_files: list[str], fingerprint: str, root: Path) -> None:
    """Record that `model_name`, with these weights files as they are now, has `fingerprint` (in
    `root`, beside the export, or the first writable root when that is read-only)."""
    if known_fingerprint(model_name) == fingerprint:
        return
    record = {**identity(model_name, weights_files), "fingerprint": fingerprint,
              "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with contextlib.suppress(OSError):
        write_json_atomic(_identity_file(root if writable(root) else write_root(model_name), model_name), record)


def known_fingerprint(model_name: str) -> Optional[str]:
    """The fingerprint recorded for `model_name` if its weights files are unchanged since (stat)."""
    for root in engine_roots(model_name):
        try:
            record = json.loads(_identity_file(root, model_name).read_text(encoding="utf-8"))
            paths = [f["path"] for f in record["files"]]
            if record["name"] != name_key(model_name) or record["versions"] != _versions():
                continue
            if [_file_identity(p) for p in paths] == record["files"] and isinstance(record["fingerprint"], str):
                return record["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None
