"""Caption pairs for training and evaluation: Dataloop exports (both layouts), local manifests,
local image folders, and the deterministic train/validation split.

Everything reads into one shape, `CaptionPair` (an image file, a caption, a subset), collected in
a `PairSet` with the records that were skipped and why (`DataProblem`). One bad record never
stops the rest from loading; `strict=True` turns any problem into a `DataError`.

Dataloop layouts read by `read_export` (see docs/data.md for the details):

- dtlpy's default `prepare_data`: `<root>[/datasets/<id>]/<subset>/items/<remote path>` and
  `<subset>/json/<remote dir>/<stem>.json`, one exported item (with `annotations`) per file;
- the earlier CLIP adapter's: `<subset>/json/*.json` holding JSON *lists* of exported items, and
  `<subset>/images/<remote path>`;
- a plain dataset download (`<root>/items` + `<root>/json`): the subset comes from each item's
  ML-subset tags (`metadata.system.tags`).

Captions: every `free-text` annotation of an item (its text is in `coordinates`), and an image
item's `metadata.system.description`. A prompt item's image is the image in its prompt; how a
prompt's image reference is found on disk is `PromptImageResolver`'s job.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence
from urllib.parse import unquote, urlparse

from .errors import DataError
from .files import write_json_atomic
from .images import IMAGE_SUFFIXES
from .items import prompt_order

log = logging.getLogger(__name__)

SUBSETS = ("train", "validation")
KNOWN_SUBSETS = ("train", "validation", "test")
MANIFEST_SUFFIXES = (".jsonl", ".csv")
CAPTION_LABEL = "free-text"
DEFAULT_TEMPLATE = "a photo of a {}"
# Where images referenced by prompt items are looked for (and where a downloader should put
# them): <export root>/prompt_images/<item id><suffix>.
PROMPT_IMAGES_DIR = "prompt_images"
# How many problems a strict-mode error message lists before "... and N more".
MAX_LISTED_PROBLEMS = 10

_STREAM_ID = re.compile(r"/items/([0-9A-Za-z_-]+)/stream")
_ITEM_ID = re.compile(r"^[0-9a-f]{24}$")


@dataclass(frozen=True)
class CaptionPair:
    """One (image, caption) training example."""

    image: Path                 # absolute path to the image file
    caption: str                # non-empty, stripped
    subset: str                 # 'train' | 'validation' (| 'test')
    label: Optional[str] = None  # class label when known (zero-shot accuracy)
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    source: str = ""            # where it came from (file and item), for error reports


@dataclass(frozen=True)
class DataProblem:
    """A record that was skipped, and why."""

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass
class PairSet:
    pairs: list[CaptionPair]
    problems: list[DataProblem]

    def subset(self, name: str) -> list[CaptionPair]:
        return [p for p in self.pairs if p.subset == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """{subset: {"pairs": n, "images": n}} for the subsets present."""
        out: dict[str, dict[str, int]] = {}
        for name in sorted({p.subset for p in self.pairs}, key=_subset_order):
            pairs = self.subset(name)
            out[name] = {"pairs": len(pairs), "images": len({p.image for p in pairs})}
        return out

    def summary(self) -> str:
        parts = [f"{name}: {c['pairs']} pairs / {c['images']} images" for name, c in self.counts().items()]
        text = "; ".join(parts) or "no pairs"
        return f"{text}; {len(self.problems)} records skipped" if self.problems else text

    def raise_if_problems(self) -> None:
        """Strict mode: any skipped record is fatal; the message lists them."""
        if self.problems:
            raise DataError(problems_message(self.problems))

    def extend(self, other: "PairSet") -> None:
        self.pairs.extend(other.pairs)
        self.problems.extend(other.problems)


def problems_message(problems: Sequence[DataProblem], limit: int = MAX_LISTED_PROBLEMS) -> str:
    listed = "; ".join(str(p) for p in problems[:limit])
    more = f"; ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} bad data record(s): {listed}{more}"


def _subset_order(name: str) -> tuple[int, str]:
    return (KNOWN_SUBSETS.index(name), name) if name in KNOWN_SUBSETS else (len(KNOWN_SUBSETS), name)


# =========================================================================================
# Entry point
# =========================================================================================
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


# =========================================================================================
# Captions and subsets of exported Dataloop items (pure functions over item JSON)
# =========================================================================================
def is_prompt_item(item: dict) -> bool:
    system = _system(item)
    shebang = system.get("shebang")
    if isinstance(shebang, dict) and shebang.get("dltype") == "prompt":
        return True
    return str(system.get("mimetype", "")).startswith("application/json") and str(
        item.get("filename", "")).lower().endswith(".json")


def is_image_item(item: dict) -> bool:
    mimetype = str(_system(item).get("mimetype", "")).lower()
    if mimetype:
        return mimetype.startswith("image/")
    return Path(str(item.get("filename", ""))).suffix.lower() in IMAGE_SUFFIXES


def caption_annotations(item: dict) -> Iterator[dict]:
    """The item's `free-text` annotations (Dataloop stores their text in `coordinates`)."""
    for annotation in item.get("annotations") or []:
        if isinstance(annotation, dict) and annotation.get("label") == CAPTION_LABEL:
            yield annotation


def annotation_text(annotation: dict) -> Optional[str]:
    """The text of a free-text annotation, stripped; None when it has none."""
    value = annotation.get("coordinates")
    if isinstance(value, dict):  # some exports nest it: {"text": ...}
        value = value.get("text")
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def annotation_prompt_id(annotation: dict) -> Optional[str]:
    prompt_id = _system(annotation).get("promptId")
    return str(prompt_id) if prompt_id is not None else None


def item_description(item: dict) -> Optional[str]:
    """The item's description, wherever this export keeps it.

    dtlpy 1.126 serialises it at the top level (`description`) and also reads
    `metadata.description.text`; the earlier adapter read `metadata.system.description`.
    """
    metadata = item.get("metadata") if isinstance(item.get("metadata"), dict) else {}
    nested = metadata.get("description")
    for value in (item.get("description"), nested.get("text") if isinstance(nested, dict) else None,
                  _system(item).get("description")):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def item_label(item: dict) -> Optional[str]:
    """A class label for zero-shot accuracy: a 'class' annotation, else metadata.user.label."""
    for annotation in item.get("annotations") or []:
        if isinstance(annotation, dict) and annotation.get("type") == "class" and annotation.get("label"):
            return str(annotation["label"])
    user = (item.get("metadata") or {}).get("user") or {}
    label = user.get("label") if isinstance(user, dict) else None
    return str(label) if isinstance(label, (str, int)) and str(label).strip() else None


def item_subset_tags(item: dict) -> list[str]:
    """The ML subsets an item is tagged with (dtlpy's `item.set_ml_subset` writes these)."""
    tags = _system(item).get("tags") or {}
    return [name for name, on in tags.items() if on is True] if isinstance(tags, dict) else []


def _system(obj: dict) -> dict:
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    system = metadata.get("system") if isinstance(metadata, dict) else None
    return system if isinstance(system, dict) else {}


def item_label_for_source(item: dict) -> str:
    item_id = item.get("id") or "?"
    name = item.get("filename") or item.get("name") or "?"
    return f"item {item_id} ({name})"


# =========================================================================================
# Prompt items: which image is the prompt
# =========================================================================================
def prompt_image_ref(prompt_json: dict, prompt_id: Optional[str] = None) -> Optional[str]:
    """The image reference of prompt `prompt_id` (else of the first prompt that has an image)."""
    prompts = prompt_json.get("prompts") if isinstance(prompt_json, dict) else None
    if not isinstance(prompts, dict):
        return None
    keys = [prompt_id] if prompt_id is not None and prompt_id in prompts else sorted(prompts, key=prompt_order)
    for key in keys:
        for part in prompts.get(key) or []:
            if isinstance(part, dict) and str(part.get("mimetype", "")).lower().startswith("image/"):
                value = part.get("value")
                if isinstance(value, str) and value.strip():
                    return value.strip()
    return None


def ref_item_id(ref: str) -> Optional[str]:
    """The Dataloop item id in an image reference: a stream URL `.../items/<id>/stream` or a bare id."""
    match = _STREAM_ID.search(ref)
    if match:
        return match.group(1)
    return ref if _ITEM_ID.match(ref) else None


class PromptImageResolver:
    """Finds the local file of a prompt item's image, in this order:

    1. the reference itself when it is a local file (`file://` URL or a path relative to the
       prompt file): offline exports and demos;
    2. an image next to the prompt file with the same stem (`a/x.json` -> `a/x.png`): what the
       earlier adapter downloaded;
    3. the referenced item id (from `.../items/<id>/stream`): a file `<id>.<ext>` anywhere
       under the export root (e.g. `prompt_images/`), or an image item with that id exported
       in any subset of the same folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_id: Optional[dict[str, Path]] = None
        self._exported: dict[str, Path] = {}
        self._listings: dict[Path, dict[str, Path]] = {}  # folder -> {stem: image}, listed once

    def remember(self, item_id: Optional[str], image: Path) -> None:
        """An exported image item, so prompts pointing at it find it."""
        if item_id:
            self._exported.setdefault(str(item_id), image)

    def resolve(self, ref: Optional[str], prompt_file: Optional[Path]) -> tuple[Optional[Path], str]:
        """(path, '') when found, else (None, why not)."""
        if ref is not None:
            local = _local_ref(ref, prompt_file.parent if prompt_file else self.root)
            if local is not None:
                return (local, "") if local.is_file() else (None, f"prompt image {local} does not exist")
        sibling = self.sibling_image(prompt_file) if prompt_file is not None else None
        if sibling is not None:
            return sibling, ""
        item_id = ref_item_id(ref) if ref else None
        if item_id:
            found = self._exported.get(item_id) or self._id_index().get(item_id)
            if found is not None:
                return found, ""
            return None, (f"prompt image (item {item_id}) was not downloaded; put it at "
                          f"{PROMPT_IMAGES_DIR}/{item_id}.<ext> under the export folder")
        if ref is None:
            return None, "prompt has no image (no 'image/*' part in the prompt JSON)"
        return None, f"prompt image reference {ref!r} is neither a local file nor a Dataloop item"

    def sibling_image(self, prompt_file: Path) -> Optional[Path]:
        """An image with the prompt file's stem in the same folder (`x.json` -> `x.png`)."""
        folder = prompt_file.parent
        listing = self._listings.get(folder)
        if listing is None:
            listing = {}
            if folder.is_dir():
                for path in sorted(folder.iterdir()):
                    if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                        listing.setdefault(path.stem, path)
            self._listings[folder] = listing
        return listing.get(prompt_file.stem)

    def _id_index(self) -> dict[str, Path]:
        """{item id: file} for image files named by an item id, anywhere under the root (walked once)."""
        if self._by_id is None:
            self._by_id = {}
            for folder, dirs, files in os.walk(self.root):
                dirs.sort()
                for name in sorted(files):
                    stem, suffix = os.path.splitext(name)
                    if suffix.lower() in IMAGE_SUFFIXES and _ITEM_ID.match(stem):
                        self._by_id.setdefault(stem, Path(folder) / name)
        return self._by_id


def _local_ref(ref: str, base: Path) -> Optional[Path]:
    parsed = urlparse(ref)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme in ("http", "https") or ref_item_id(ref):
        return None
    path = Path(ref).expanduser()
    return path if path.is_absolute() else base / path


def prompt_images_to_download(root: str | Path) -> dict[str, str]:
    """{item id: reference} of prompt images that a Dataloop export references but lacks locally.

    The platform side downloads each to `<root>/prompt_images/<item id><suffix>` (see
    `prompt_image_target`), after which `read_export` finds them.
    """
    root = Path(root)
    wanted: dict[str, str] = {}
    resolver = PromptImageResolver(root)
    for subset_dir, subset in find_export_subsets(root):
        for record in _iter_export_records(subset_dir, subset, resolver):
            if record.item is None or not is_prompt_item(record.item) or record.item_file is None:
                continue
            prompt = _read_json(record.item_file)
            if not isinstance(prompt, dict):
                continue
            for key in (prompt.get("prompts") or {}):
                ref = prompt_image_ref(prompt, key)
                path, _ = resolver.resolve(ref, record.item_file)
                item_id = ref_item_id(ref) if ref else None
                if path is None and item_id:
                    wanted.setdefault(item_id, ref)
    return wanted


def prompt_image_target(root: str | Path, item_id: str, suffix: str) -> Path:
    return Path(root) / PROMPT_IMAGES_DIR / f"{item_id}{suffix.lower()}"


# =========================================================================================
# Dataloop export folders
# =========================================================================================
def find_export_subsets(root: Path) -> list[tuple[Path, Optional[str]]]:
    """(folder, subset) pairs in an export; subset None means 'from each item's tags'.

    Accepts `<root>/<subset>/{json,items,images}`, `<root>/datasets/<id>/<subset>/...`, and a
    plain download `<root>/{json,items}`.
    """
    root = Path(root)
    if (root / "json").is_dir():
        return [(root, None)]
    found: list[tuple[Path, Optional[str]]] = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if (child / "json").is_dir():
            found.append((child, child.name))
    datasets = root / "datasets"
    if datasets.is_dir():
        for dataset_dir in sorted(p for p in datasets.iterdir() if p.is_dir()):
            found.extend(find_export_subsets(dataset_dir))
    return found


@dataclass
class _Record:
    item: Optional[dict]
    subset: Optional[str]
    source: str
    item_file: Optional[Path]   # the downloaded item (image or prompt JSON), if found
    error: Optional[str] = None


def read_export(root: str | Path) -> PairSet:
    """Caption pairs from a Dataloop export folder (any of the layouts in the module docstring)."""
    root = Path(root).expanduser().absolute()  # every path below is then absolute, without resolving each
    subsets = find_export_subsets(root)
    if not subsets:
        raise DataError(f"{root}: not a Dataloop export: expected <subset>/json/ folders (train, validation), "
                        f"datasets/<id>/<subset>/json/, or json/ + items/")
    resolver = PromptImageResolver(root)
    records: list[_Record] = []
    for subset_dir, subset in subsets:
        records.extend(_iter_export_records(subset_dir, subset, resolver))
    result = PairSet([], [])
    for record in records:
        result.extend(_pairs_from_record(record, resolver, root))
    return result


def _iter_export_records(subset_dir: Path, subset: Optional[str], resolver: PromptImageResolver) -> Iterator[_Record]:
    """Every exported item under `<subset_dir>/json`, with its downloaded file located."""
    json_dir = subset_dir / "json"
    for json_file in sorted(json_dir.rglob("*.json"), key=os.fspath):
        source = _relative_source(json_file, subset_dir.parent)
        data = _read_json(json_file)
        if isinstance(data, _JsonError):
            yield _Record(None, subset, source, None, f"unreadable JSON: {data}")
            continue
        if isinstance(data, dict) and isinstance(data.get("items"), list):
            data = data["items"]
        items = data if isinstance(data, list) else [data]
        for position, item in enumerate(items):
            where = f"{source}[{position}]" if isinstance(data, list) else source
            if not isinstance(item, dict) or "filename" not in item and "name" not in item:
                yield _Record(None, subset, where, None, "not an exported Dataloop item (no 'filename')")
                continue
            where = f"{where} {item_label_for_source(item)}"
            item_file = _downloaded_file(subset_dir, item)
            if item_file is not None and is_image_item(item) and not is_prompt_item(item):
                resolver.remember(item.get("id"), item_file)
            yield _Record(item, subset, where, item_file)


def _downloaded_file(subset_dir: Path, item: dict) -> Optional[Path]:
    filename = str(item.get("filename") or item.get("name") or "").lstrip("/")
    name = str(item.get("name") or Path(filename).name)
    for folder in ("items", "images"):
        for candidate in (subset_dir / folder / filename, subset_dir / folder / name):
            if filename and candidate.is_file():
                return candidate
    return None


def _pairs_from_record(record: _Record, resolver: PromptImageResolver, root: Path) -> PairSet:
    out = PairSet([], [])
    if record.error or record.item is None:
        out.problems.append(DataProblem(record.source, record.error or "no item"))
        return out
    item = record.item
    subset, why = _record_subset(record)
    if subset is None:
        out.problems.append(DataProblem(record.source, why))
        return out
    captions: list[tuple[str, Optional[str]]] = []  # (caption, prompt id)
    for annotation in caption_annotations(item):
        text = annotation_text(annotation)
        if text is None:
            out.problems.append(DataProblem(
                f"{record.source} annotation {annotation.get('id', '?')}", "free-text annotation without text"))
        else:
            captions.append((text, annotation_prompt_id(annotation)))
    prompt = is_prompt_item(item)
    if not prompt:
        description = item_description(item)
        if description and description not in {c for c, _ in captions}:
            captions.append((description, None))
    if not captions:
        reason = ("prompt item has no free-text annotation with a caption" if prompt
                  else "no caption (no description and no free-text annotation)")
        out.problems.append(DataProblem(record.source, reason))
        return out
    label = item_label(item)
    base_meta = {"item_id": item.get("id"), "dataloop_filename": item.get("filename")}
    for caption, prompt_id in captions:
        image, reason = _record_image(record, prompt, prompt_id, resolver)
        if image is None:
            out.problems.append(DataProblem(record.source, reason))
            continue
        meta = dict(base_meta, prompt_id=prompt_id) if prompt else dict(base_meta)
        out.pairs.append(CaptionPair(image=Path(os.path.abspath(image)), caption=caption, subset=subset, label=label,
                                     metadata={k: v for k, v in meta.items() if v is not None},
                                     source=record.source))
    return out


def _record_subset(record: _Record) -> tuple[Optional[str], str]:
    if record.subset is not None:
        if record.subset in KNOWN_SUBSETS:
            return record.subset, ""
        return None, f"unknown subset {record.subset!r} (expected one of {', '.join(KNOWN_SUBSETS)})"
    tags = [t for t in item_subset_tags(record.item or {}) if t in KNOWN_SUBSETS]
    if len(tags) == 1:
        return tags[0], ""
    if not tags:
        return None, "no subset: the item has no ML-subset tag and is not under a train/ or validation/ folder"
    return None, f"item is tagged with several subsets {tags}"


def _record_image(record: _Record, prompt: bool, prompt_id: Optional[str],
                  resolver: PromptImageResolver) -> tuple[Optional[Path], str]:
    if not prompt:
        if record.item_file is None:
            return None, "image file missing (not under items/ or images/)"
        return record.item_file, ""
    if record.item_file is None:
        # No prompt JSON downloaded: only a same-stem image next to where it would be can help.
        return None, "prompt item file missing (not under items/ or images/), so its image is unknown"
    prompt_json = _read_json(record.item_file)
    if isinstance(prompt_json, _JsonError):
        sibling = resolver.sibling_image(record.item_file)
        return (sibling, "") if sibling else (None, f"prompt item is not valid JSON: {prompt_json}")
    ref = prompt_image_ref(prompt_json, prompt_id) if isinstance(prompt_json, dict) else None
    return resolver.resolve(ref, record.item_file)


class _JsonError(str):
    """A JSON file that could not be read; the text says why."""


def _read_json(path: Path) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        return _JsonError(f"{type(exc).__name__}: {exc}")


def _relative_source(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


# =========================================================================================
# Manifests: JSONL lines {"image", "caption", "subset", "metadata"[, "label"]}, or CSV
# =========================================================================================
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
        fh = open(path, "r", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    with fh:
        for number, line in enumerate(fh, 1):
            where = f"{path.name}:{number}"
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except ValueError as exc:
                yield where, _JsonError(f"not valid JSON ({exc})")


def _open_csv(path: Path, what: str):
    """A CSV opened for csv.DictReader (a BOM from spreadsheet exports is dropped)."""
    try:
        return open(path, "r", encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_csv(path, "manifest") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or [])
        missing = {"image", "caption"} - columns
        if missing:
            raise DataError(f"{path}: CSV manifest lacks column(s) {', '.join(sorted(missing))} "
                            f"(has {', '.join(reader.fieldnames or []) or 'none'})")
        for row in reader:
            where = f"{path.name}:{reader.line_num}"
            row = {k: v for k, v in row.items() if k is not None}
            if isinstance(row.get("metadata"), str) and row["metadata"].strip():
                try:
                    row["metadata"] = json.loads(row["metadata"])
                except ValueError:
                    yield where, _JsonError("the metadata column is not a JSON object")
                    continue
            extra = {k: v for k, v in row.items() if k not in _MANIFEST_KEYS and v not in (None, "")}
            if extra:  # any other column is kept as metadata
                row["metadata"] = {**extra, **(row.get("metadata") or {})}
            yield where, {k: v for k, v in row.items() if k in _MANIFEST_KEYS}


_MANIFEST_KEYS = ("image", "caption", "subset", "label", "metadata")


def _pair_from_row(row: Any, where: str, base: Path) -> tuple[Optional[CaptionPair], Optional[DataProblem]]:
    def bad(reason: str):
        return None, DataProblem(where, reason)

    if isinstance(row, _JsonError):
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


# =========================================================================================
# Local image folders -> caption pairs, with a deterministic split by image
# =========================================================================================
VALIDATION_DIR_NAMES = ("validation", "val", "valid")


def humanize(name: str) -> str:
    """A directory name as words: 'golden_retriever' -> 'golden retriever'."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]+", " ", name)).strip()


def template_caption(label: str, template: str = DEFAULT_TEMPLATE) -> str:
    if "{}" not in template:
        raise DataError(f"caption template {template!r} has no '{{}}' for the directory name")
    return template.replace("{}", humanize(label))


def read_captions_csv(path: str | Path) -> dict[str, list[str]]:
    """{image key: [captions]} from a CSV with an image column and a caption column.

    Image column: image, file, filename or path; caption column: caption, description or text.
    Keys are matched against the image's path relative to the folder, then its file name.
    Several rows for one image give it several captions.
    """
    path = Path(path).expanduser()
    with _open_csv(path, "captions CSV") as fh:
        reader = csv.DictReader(fh)
        columns = {c.strip().lower(): c for c in reader.fieldnames or [] if c}
        image_col = next((columns[c] for c in ("image", "file", "filename", "path") if c in columns), None)
        text_col = next((columns[c] for c in ("caption", "description", "text") if c in columns), None)
        if image_col is None or text_col is None:
            raise DataError(f"{path}: a captions CSV needs an image column (image/file/filename/path) and a "
                            f"caption column (caption/description/text); it has {', '.join(reader.fieldnames or [])}")
        captions: dict[str, list[str]] = defaultdict(list)
        for row in reader:
            key, text = (row.get(image_col) or "").strip(), (row.get(text_col) or "").strip()
            if key and text:
                captions[Path(key).as_posix().lstrip("./")].append(text)
    return dict(captions)


def sidecar_captions(image: Path) -> list[str]:
    """Captions in `<image stem>.txt` next to the image, one per non-empty line."""
    sidecar = image.with_suffix(".txt")
    if not sidecar.is_file():
        return []
    try:
        text = sidecar.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def prepare_folder(folder: str | Path, *, val: float = 0.2, seed: int = 0,
                   captions_csv: Optional[str | Path] = None, template: str = DEFAULT_TEMPLATE) -> PairSet:
    """Caption pairs for every image under `folder`, split into train/validation by image.

    Captions, for each image: the lines of a sidecar `<stem>.txt`, and the rows of
    `captions_csv` for it; when it has neither, its directory name through `template`.
    Label: the image's directory name (none for images directly in `folder`).
    Subsets: top-level `train/` and `validation/` (or `val/`) folders are kept as they are;
    otherwise `split_by_image(..., val, seed)`, stratified by directory.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    if not 0.0 <= val < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), got {val}")
    if "{}" not in template:
        raise DataError(f"caption template {template!r} has no '{{}}' for the directory name")
    csv_captions = read_captions_csv(captions_csv) if captions_csv else {}
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not images:
        raise DataError(f"{root}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    fixed = _fixed_subsets(root)
    result = PairSet([], [])
    rels = [image.relative_to(root).as_posix() for image in images]
    csv_captions, unmatched = _match_csv_keys(csv_captions, rels)
    result.problems.extend(DataProblem(f"{Path(captions_csv).name}: {key}", reason) for key, reason in unmatched)
    strata: dict[str, str] = {}  # relative path -> stratum (its directory), for the split
    for image in images:
        rel = image.relative_to(root)
        parts = rel.parts[:-1]
        subset = fixed.get(parts[0]) if parts and fixed else None
        if fixed and subset is None:
            result.problems.append(DataProblem(rel.as_posix(), "image outside the train/ and validation/ folders"))
            continue
        class_parts = parts[1:] if subset else parts
        label = class_parts[-1] if class_parts else None
        captions = _folder_captions(image, rel, csv_captions)
        caption_source = "caption" if captions else "template"
        if not captions:
            if label is None:
                result.problems.append(DataProblem(rel.as_posix(), "no caption: no sidecar .txt, no row in the "
                                                   "captions CSV, and no directory name to use"))
                continue
            captions = [template_caption(label, template)]
        strata[rel.as_posix()] = "/".join(class_parts)
        for caption in captions:
            result.pairs.append(CaptionPair(image=Path(os.path.abspath(image)), caption=caption, subset=subset or "",
                                            label=label, metadata={"caption_source": caption_source},
                                            source=rel.as_posix()))
    if not fixed:
        assignment = split_by_image(strata, val=val, seed=seed)
        result.pairs = [_with_subset(p, assignment[p.source]) for p in result.pairs]
    return result


def _with_subset(pair: CaptionPair, subset: str) -> CaptionPair:
    return CaptionPair(pair.image, pair.caption, subset, pair.label, pair.metadata, pair.source)


def _fixed_subsets(root: Path) -> dict[str, str]:
    """{top-level folder name: subset} when the folder is already split, else {}."""
    names = {p.name: p.name.lower() for p in root.iterdir() if p.is_dir()}
    train = [n for n, low in names.items() if low == "train"]
    val = [n for n, low in names.items() if low in VALIDATION_DIR_NAMES]
    if not train or not val:
        return {}
    mapping = {train[0]: "train", **{n: "validation" for n in val}}
    test = [n for n, low in names.items() if low == "test"]
    mapping.update({n: "test" for n in test})
    return mapping


def _match_csv_keys(csv_captions: dict[str, list[str]], rels: list[str]
                    ) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """Re-key CSV captions by relative path. A bare file name matches only when it is unique in
    the folder; rows that match no image, or several, are returned as (key, reason)."""
    by_name: dict[str, list[str]] = defaultdict(list)
    for rel in rels:
        by_name[rel.rsplit("/", 1)[-1]].append(rel)
    known = set(rels)
    matched: dict[str, list[str]] = defaultdict(list)
    unmatched: list[tuple[str, str]] = []
    for key, captions in csv_captions.items():
        if key in known:
            matched[key].extend(captions)
        elif "/" not in key and len(by_name.get(key, [])) == 1:
            matched[by_name[key][0]].extend(captions)
        elif "/" not in key and by_name.get(key):
            unmatched.append((key, f"captions CSV names {key!r}, which matches {len(by_name[key])} images; "
                                   f"use the path relative to the folder"))
        else:
            unmatched.append((key, "captions CSV row matches no image in the folder"))
    return dict(matched), unmatched


def _folder_captions(image: Path, rel: Path, csv_captions: dict[str, list[str]]) -> list[str]:
    captions = sidecar_captions(image) + csv_captions.get(rel.as_posix(), [])
    seen: set[str] = set()
    return [c for c in captions if not (c in seen or seen.add(c))]


def split_by_image(strata: dict[Any, str], *, val: float = 0.2, seed: int = 0,
                   key=str) -> dict[Any, str]:
    """{image: 'train' | 'validation'}: a deterministic split by image, stratified by `strata[image]`.

    Each image's place comes from a hash of (seed, key(image)), so the split does not depend on
    the order images are listed in, and adding images moves few others. Within each stratum
    round(n * val) images go to validation — at least one when the stratum has two or more
    images and val > 0, and never all of them.
    """
    by_stratum: dict[str, list[Any]] = defaultdict(list)
    for image, stratum in strata.items():
        by_stratum[stratum].append(image)
    assignment: dict[Any, str] = {}
    for stratum in sorted(by_stratum):
        members = sorted(by_stratum[stratum], key=lambda img: _split_hash(seed, key(img)))
        n = len(members)
        n_val = int(round(n * val))
        if val > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        for position, image in enumerate(members):
            assignment[image] = "validation" if position < n_val else "train"
    return assignment


def _split_hash(seed: int, key: str) -> str:
    return hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).hexdigest()


# =========================================================================================
# Writing Dataloop-shaped data (prompt items, exports): for utils/prepare_dataset.py, demos, tests
# =========================================================================================
DATALOOP_STREAM_URL = "https://gate.dataloop.ai/api/v1/items/{}/stream"


def prompt_item_json(image_ref: str) -> dict[str, Any]:
    """A prompt item's file content with the image as the (user) prompt: dtlpy's PromptItem shape.

    The caption is not in here: on the platform it is a `free-text` annotation of the item
    (`caption_annotation_json`).
    """
    return {"shebang": "dataloop", "metadata": {"dltype": "prompt"},
            "prompts": {"1": [{"mimetype": "image/*", "value": image_ref},
                              {"mimetype": "metadata", "value": {"role": "user"}}]}}


def caption_annotation_json(text: str, prompt_id: str = "1", annotation_id: Optional[str] = None) -> dict[str, Any]:
    """A caption as Dataloop exports it: a `text` annotation labelled `free-text`, text in `coordinates`."""
    return {"id": annotation_id, "type": "text", "label": CAPTION_LABEL, "coordinates": text,
            "metadata": {"system": {"promptId": prompt_id}}}


def fake_item_id(key: str) -> str:
    """A stable 24-hex id (Dataloop's id shape) for items made up offline."""
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


def write_export(pairs: Iterable[CaptionPair], root: str | Path, *, layout: str = "dtlpy") -> Path:
    """Write pairs as a Dataloop export of prompt items that `read_export` reads back.

    layout 'dtlpy': `<subset>/items/<dir>/<stem>.json` (prompt files) + `<subset>/json/<dir>/<stem>.json`
    (exported items); the images play the platform's separate image dataset: the prompts
    reference them by stream URL and they lie in `prompt_images/<item id><suffix>`, where the
    adapter's download step puts them. layout 'legacy': the earlier adapter's layout, one JSON
    list per subset in `<subset>/json/` and each image next to its prompt in `<subset>/images/`.
    An image's captions become several `free-text` annotations of one prompt item.
    """
    if layout not in ("dtlpy", "legacy"):
        raise ValueError(f"layout must be 'dtlpy' or 'legacy', got {layout!r}")
    import shutil

    root = Path(root)
    grouped: dict[tuple[str, Path], list[CaptionPair]] = defaultdict(list)
    for pair in pairs:
        grouped[(pair.subset, Path(pair.image))].append(pair)
    exported: dict[str, list[dict]] = defaultdict(list)
    used_names: set[tuple[str, str]] = set()
    for (subset, image), group in grouped.items():
        image_id = fake_item_id(f"image:{image.resolve()}")
        label = group[0].label
        folder = label or "images"
        stem = f"{image.stem}-{image_id[:6]}" if (subset, f"{folder}/{image.stem}") in used_names else image.stem
        used_names.add((subset, f"{folder}/{stem}"))
        filename = f"/{folder}/{stem}.json"
        item = {"id": fake_item_id(f"prompt:{subset}:{filename}"), "name": f"{stem}.json", "filename": filename,
                "dir": f"/{folder}", "type": "file",
                "metadata": {"system": {"mimetype": "application/json", "shebang": {"dltype": "prompt"},
                                        "tags": {subset: True}},
                             "user": {"label": label} if label else {}},
                "annotations": [caption_annotation_json(p.caption, "1", fake_item_id(f"ann:{filename}:{n}"))
                                for n, p in enumerate(group)]}
        item["annotationsCount"] = len(item["annotations"])
        subset_dir = root / subset
        if layout == "dtlpy":
            write_json_atomic(subset_dir / "items" / filename.lstrip("/"), prompt_item_json(DATALOOP_STREAM_URL.format(image_id)))
            write_json_atomic(subset_dir / "json" / filename.lstrip("/"), item)
            target = prompt_image_target(root, image_id, image.suffix)
        else:
            write_json_atomic(subset_dir / "images" / filename.lstrip("/"), prompt_item_json(DATALOOP_STREAM_URL.format(image_id)))
            exported[subset].append(item)
            target = (subset_dir / "images" / filename.lstrip("/")).with_suffix(image.suffix.lower())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)
    for subset, items in exported.items():
        write_json_atomic(root / subset / "json" / "export.json", items)
    return root
