"""Manifests, the local pair format: JSONL lines `{"image", "caption", "subset", "metadata"[, "label"]}`
(image paths relative to the manifest) or CSV with those columns.

`load_pairs` is the one entry point for training and evaluation data: a manifest file, or a
Dataloop export folder (exports.py); `convert_export` turns the latter into the former.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from .errors import DataError
from .exports import read_export
from .files import JsonError, not_utf8, open_csv, open_text_lines, shown
from .pairs import KNOWN_SUBSETS, CaptionPair, DataProblem, PairSet, problems_message

log = logging.getLogger(__name__)


def load_pairs(path: str | Path, *, strict: bool = False) -> PairSet:
    """Read a manifest (.jsonl/.csv) or a Dataloop export folder (either layout).

    Bad records become `problems` (strict=True raises DataError instead).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        result = read_export(path)
    elif path.is_file():
        result = read_manifest(path)
    else:
        raise DataError(f"{path}: no such manifest or export folder")
    if strict:
        result.raise_if_problems()
    if result.problems:  # one line, not one per record: callers list them where people look
        log.warning("%s: skipped %s", path, problems_message(result.problems, limit=3))
    return result


def read_manifest(path: str | Path) -> PairSet:
    """Read a .jsonl (or .csv) manifest; image paths are relative to the manifest's folder."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    rows = _csv_rows(path) if suffix == ".csv" else _jsonl_rows(path)
    result = PairSet([], [])
    for where, row in rows:
        pair, problem = _pair_from_row(row, where, path.parent)
        if pair is not None:
            result.pairs.append(pair)
        else:
            result.problems.append(problem)
    return result


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        fh = open_text_lines(path)
    except OSError as exc:
        raise DataError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    with fh:
        for number, line in enumerate(fh, 1):
            where = f"{path.name}:{number}"
            if not line.strip():
                continue
            if not_utf8(line):
                yield where, JsonError(not_utf8(line))
                continue
            try:
                yield where, json.loads(line)
            except ValueError as exc:
                yield where, JsonError(f"not valid JSON ({exc})")


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with open_csv(path, "manifest") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or [])
        missing = {"image", "caption"} - columns
        if missing:
            raise DataError(f"{path}: CSV manifest lacks column(s) {', '.join(sorted(missing))} "
                            f"(has {shown(', '.join(reader.fieldnames or [])) or 'none'})")
        for row in reader:
            where = f"{path.name}:{reader.line_num}"
            undecoded = not_utf8(*(v for k, v in row.items() if k is not None), *(row.get(None) or []))
            row = {k: v for k, v in row.items() if k is not None}
            if undecoded:
                yield where, JsonError(undecoded)
                continue
            if isinstance(row.get("metadata"), str) and row["metadata"].strip():
                try:
                    row["metadata"] = json.loads(row["metadata"])
                except ValueError:
                    yield where, JsonError("the metadata column is not a JSON object")
                    continue
            extra = {k: v for k, v in row.items() if k not in _MANIFEST_KEYS and v not in (None, "")}
            if extra:  # any other column is kept as metadata
                row["metadata"] = {**extra, **(row.get("metadata") or {})}
            yield where, {k: v for k, v in row.items() if k in _MANIFEST_KEYS}


_MANIFEST_KEYS = ("image", "caption", "subset", "label", "metadata")


def _pair_from_row(row: Any, where: str, base: Path) -> tuple[Optional[CaptionPair], Optional[DataProblem]]:
    def bad(reason: str):
        return None, DataProblem(where, reason)

    if isinstance(row, JsonError):
        return bad(str(row))
    if not isinstance(row, dict):
        return bad("not a JSON object")
    image = row.get("image")
    if not isinstance(image, str) or not image.strip():
        return bad("no 'image' path")
    caption = row.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        return bad(f"empty caption for {image}")
    subset = row.get("subset")
    if not isinstance(subset, str) or subset.strip() not in KNOWN_SUBSETS:
        return bad(f"unknown subset {subset!r} for {image} (expected one of {', '.join(KNOWN_SUBSETS)})")
    path = Path(image).expanduser()
    path = Path(os.path.abspath(path if path.is_absolute() else base / path))
    if not path.is_file():
        return bad(f"image file missing: {path}")
    metadata = row.get("metadata") or {}
    if not isinstance(metadata, dict):
        return bad("'metadata' must be a JSON object")
    label = row.get("label")
    label = str(label).strip() if label not in (None, "") and str(label).strip() else None
    return CaptionPair(image=path, caption=caption.strip(), subset=subset.strip(), label=label,
                       metadata=metadata, source=where), None


def write_manifest(pairs: Iterable[CaptionPair], path: str | Path) -> int:
    """Write pairs as JSONL (or CSV when `path` ends in .csv), image paths relative to the file.

    Written to a temp file and renamed, so a killed run never leaves half a manifest.
    Returns the number of lines written.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    rows = [_manifest_row(pair, base) for pair in pairs]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            if path.suffix.lower() == ".csv":
                writer = csv.DictWriter(fh, fieldnames=list(_MANIFEST_KEYS))
                writer.writeheader()
                for row in rows:
                    writer.writerow({**row, "label": row.get("label") or "",
                                     "metadata": json.dumps(row["metadata"], ensure_ascii=False)})
            else:
                fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a manifest is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(rows)


def _manifest_row(pair: CaptionPair, base: Path) -> dict[str, Any]:
    image = Path(pair.image).resolve()
    try:
        rel = os.path.relpath(image, base)
    except ValueError:  # another drive on Windows
        rel = str(image)
    row: dict[str, Any] = {"image": Path(rel).as_posix(), "caption": pair.caption, "subset": pair.subset}
    if pair.label is not None:
        row["label"] = pair.label
    row["metadata"] = dict(pair.metadata)
    return row


def convert_export(export_dir: str | Path, out: str | Path, *, strict: bool = False) -> PairSet:
    """A Dataloop export folder -> a manifest at `out`. Returns what was read (with problems)."""
    result = read_export(export_dir)
    if strict:
        result.raise_if_problems()
    if not result.pairs:
        raise DataError(f"{export_dir}: no caption pairs found" + (
            f" ({problems_message(result.problems)})" if result.problems else ""))
    write_manifest(result.pairs, out)
    return result
