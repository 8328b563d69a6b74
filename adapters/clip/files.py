"""Files on disk: atomic writes, content hashes, and the data readers' tolerant reads.

Writes build beside the target, fsync, rename over it: a process killed at any moment leaves
either the old file (or directory) or the new one, never half of either. Every module that
writes something a user keeps goes through here. Reads of data files (JSON, CSV) say what is
wrong with a file instead of raising deep inside a reader.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Iterator, Optional

from .errors import DataError


HASH_BLOCK = 1 << 20


def content_hash(path: str | os.PathLike) -> str:
    """blake2b-128 of a file's bytes: equal bytes, equal hash (a copy under another name included)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()

from .faults import faultpoint


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# fdatasync is missing on macOS, pwrite on Windows: same durability through the portable calls.
datasync = getattr(os, "fdatasync", os.fsync)


def pwrite(fd: int, data: bytes, offset: int) -> None:
    if hasattr(os, "pwrite"):
        os.pwrite(fd, data, offset)
    else:  # pragma: no cover - Windows
        os.lseek(fd, offset, os.SEEK_SET)
        os.write(fd, data)


def _sibling(path: Path) -> Path:
    """A temp name beside `path`, unique per process and thread, with the same suffix (savefig needs it)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{threading.get_ident()}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path)
    try:
        yield tmp
        with contextlib.suppress(OSError):  # some writers (PIL, matplotlib) close without fsync
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data: Any, *, indent: int | None = 2) -> None:
    write_text_atomic(path, strict_json(data, indent=indent))


def strict_json(data: Any, **options: Any) -> str:
    """JSON that every parser reads: NaN and infinities (which json.dumps writes as the non-JSON
    literals NaN/Infinity) become null; anything else unknown is written as its str()."""
    options = {"ensure_ascii": False, "default": str, **options}
    return json.dumps(_finite(data), allow_nan=False, **options)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # numpy scalars and arrays
        return _finite(value.tolist())
    return value


@contextlib.contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a fresh directory beside `directory`; on success it is swapped in whole."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; checkpoints and runs are for people to read
    try:
        yield tmp
        fsync_dir(tmp)
        swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(tmp: Path, directory: Path) -> None:
    """Replace `directory` by the complete `tmp`; `recover_directory` finishes a swap killed midway.

    The complete new one is first renamed `.NAME.new-PID` (so a recovery knows it is whole), the
    old one `.NAME.old-PID`, then the new one takes the name: between the renames only those exist.
    """
    if not directory.exists():
        os.replace(tmp, directory)
    else:
        ready = directory.with_name(f".{directory.name}.new-{os.getpid()}")
        backup = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(tmp, ready)
        os.replace(directory, backup)
        faultpoint("swap.old-moved-aside")
        os.replace(ready, directory)
        faultpoint("swap.new-in")
        shutil.rmtree(backup, ignore_errors=True)
    fsync_dir(directory.parent)


# ---- tolerant reads -----------------------------------------------------------------------------
class JsonError(str):
    """A JSON file (or line) that could not be read; the text says why."""


def read_json(path: Path) -> Any:
    """The file's JSON, or a `JsonError` saying why not (the caller records it and goes on)."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        return JsonError(f"{type(exc).__name__}: {exc}")


def open_csv(path: Path, what: str) -> IO[str]:
    """A CSV opened for csv.DictReader (a BOM from spreadsheet exports is dropped). Bytes that are not
    UTF-8 are kept as surrogate escapes, for `not_utf8` to find: the record holding them is skipped
    and listed, the rest of the file is read."""
    try:
        return open(path, "r", encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def open_text_lines(path: Path) -> IO[str]:
    """A UTF-8 text file (JSONL) read line by line, bytes that are not UTF-8 kept for `not_utf8`."""
    return open(path, "r", encoding="utf-8", errors="surrogateescape")


_UNDECODED = re.compile("[\udc80-\udcff]")


def not_utf8(*texts: Optional[str]) -> Optional[str]:
    """Why a record read through `open_csv`/`open_text_lines` is not UTF-8 text, or None."""
    for text in texts:
        found = _UNDECODED.search(text) if isinstance(text, str) else None
        if found:
            return (f"not UTF-8 text (byte 0x{ord(found.group()) - 0xDC00:02X} after "
                    f"{shown(text[:found.start()][-20:])!r}): save the file as UTF-8")
    return None


def shown(text: str) -> str:
    """`text` printable whatever bytes it holds: undecodable ones as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def recover_directory(directory: str | Path) -> list[str]:
    """Finish what a killed `atomic_directory` left beside `directory`, and remove its debris.

    `directory` itself, when it exists, is whole (it only ever appears by a rename of a complete
    one) and is kept. Missing, it is taken from the complete new copy if the kill came after that
    was ready, else from the backup of the old one. Everything else is debris: half-built temp
    folders, backups of replaced versions. Returns what it did, for the user.
    """
    directory = Path(directory)
    parent, name = directory.parent, directory.name
    if not parent.is_dir():
        return []
    ready = sorted(parent.glob(f".{name}.new-*"), key=lambda p: p.stat().st_mtime)
    backups = sorted(parent.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
    done: list[str] = []
    if not directory.exists() and (ready or backups):
        source = (ready or backups)[-1]
        os.replace(source, directory)
        fsync_dir(parent)
        done.append(f"{directory}: {'finished the save' if ready else 'restored the previous version'} that was "
                    f"interrupted (from {source.name})")
    debris = [p for p in (*parent.glob(f".{name}.new-*"), *parent.glob(f".{name}.old-*"),
                          *parent.glob(f".{name}.tmp-*")) if p.is_dir()]
    for folder in debris:
        shutil.rmtree(folder, ignore_errors=True)
    if debris:
        done.append(f"{directory}: removed {len(debris)} leftover folder(s) of an interrupted save")
    return done


def within(path: str | Path, base: str | Path) -> Path | None:
    """`path` made absolute and normalised (`..` resolved, symlinks not followed), if it lies in `base`.

    Lexical on purpose: a user may link `items/` to another disk, but a name from an export
    (`/../../../../etc/hostname`) never climbs out of the export it came with.
    """
    normal = Path(os.path.normpath(os.path.abspath(path)))
    top = Path(os.path.normpath(os.path.abspath(base)))
    return normal if normal == top or top in normal.parents else None
