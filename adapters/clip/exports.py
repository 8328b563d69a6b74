"""Dataloop export folders: caption pairs read from them (`read_export`), and written as them
(`write_export`, for demos and tests).

Layouts read (see docs/data.md for the details):

- dtlpy's default `prepare_data`: `<root>[/datasets/<id>]/<subset>/items/<remote path>` and
  `<subset>/json/<remote dir>/<stem>.json`, one exported item (with `annotations`) per file;
- the earlier CLIP adapter's: `<subset>/json/*.json` holding JSON *lists* of exported items, and
  `<subset>/images/<remote path>`;
- a plain dataset download (`<root>/items` + `<root>/json`): the subset comes from each item's
  ML-subset tags (`metadata.system.tags`).

Captions: every `free-text` annotation of an item (its text is in `coordinates`), and an image
item's description (items.py reads the item JSON). A prompt item's image is the image in its
prompt; how that is found on disk is prompt_images.py's job.
"""
from __future__ import annotations

import hashlib
import re
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from .errors import DataError
from .files import JsonError, read_json, within, write_json_atomic
from .items import (annotation_prompt_id, annotation_text, caption_annotation_json, caption_annotations,
                    is_image_item, is_prompt_item, item_description, item_label, item_label_for_source,
                    item_subset_tags, prompt_image_ref, prompt_item_json, ref_item_id, stream_url)
from .pairs import KNOWN_SUBSETS, CaptionPair, DataProblem, PairSet
from .prompt_images import PromptImageResolver, prompt_image_target


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
        data = read_json(json_file)
        if isinstance(data, JsonError):
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
            if _escapes_export(item):
                yield _Record(None, subset, where, None, f"its filename {str(item.get('filename'))[:80]!r} leads outside "
                                                         f"the export; skipped (an export's files stay inside it)")
                continue
            item_file = _downloaded_file(subset_dir, item)
            if item_file is not None and is_image_item(item) and not is_prompt_item(item):
                resolver.remember(item.get("id"), item_file)
            yield _Record(item, subset, where, item_file)


def _escapes_export(item: dict) -> bool:
    """A filename or name whose `..` parts climb above the folder it is read from."""
    for key in ("filename", "name"):
        value = item.get(key)
        if isinstance(value, str) and within(Path("/export") / value.lstrip("/"), Path("/export")) is None:
            return True
    return False


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
    prompt_json = read_json(record.item_file)
    if isinstance(prompt_json, JsonError):
        sibling = resolver.sibling_image(record.item_file)
        return (sibling, "") if sibling else (None, f"prompt item is not valid JSON: {prompt_json}")
    ref = prompt_image_ref(prompt_json, prompt_id) if isinstance(prompt_json, dict) else None
    return resolver.resolve(ref, record.item_file)


def _relative_source(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


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
            prompt = read_json(record.item_file)
            if not isinstance(prompt, dict):
                continue
            for key in (prompt.get("prompts") or {}):
                ref = prompt_image_ref(prompt, key)
                path, _ = resolver.resolve(ref, record.item_file)
                item_id = ref_item_id(ref) if ref else None
                if path is None and item_id:
                    wanted.setdefault(item_id, ref)
    return wanted


# ---- writing an export ------------------------------------------------------------------------
def fake_item_id(key: str) -> str:
    """A stable 24-hex id (Dataloop's id shape) for items made up offline."""
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


def _folder_name(label: Optional[str]) -> str:
    """A label as one folder name: a label from a manifest (`../../x`) never makes a path leave the export."""
    name = re.sub(r"[\\/\x00]", "_", label or "").strip()
    return "images" if name.strip(".") == "" else name


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
    root = Path(root)
    grouped: dict[tuple[str, Path], list[CaptionPair]] = defaultdict(list)
    for pair in pairs:
        grouped[(pair.subset, Path(pair.image))].append(pair)
    exported: dict[str, list[dict]] = defaultdict(list)
    used_names: set[tuple[str, str]] = set()
    for (subset, image), group in grouped.items():
        image_id = fake_item_id(f"image:{image.resolve()}")
        label = group[0].label
        folder = _folder_name(label)
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
            write_json_atomic(subset_dir / "items" / filename.lstrip("/"), prompt_item_json(stream_url(image_id)))
            write_json_atomic(subset_dir / "json" / filename.lstrip("/"), item)
            target = prompt_image_target(root, image_id, image.suffix)
        else:
            write_json_atomic(subset_dir / "images" / filename.lstrip("/"), prompt_item_json(stream_url(image_id)))
            exported[subset].append(item)
            target = (subset_dir / "images" / filename.lstrip("/")).with_suffix(image.suffix.lower())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)
    for subset, items in exported.items():
        write_json_atomic(root / subset / "json" / "export.json", items)
    return root
