"""Local image folders -> caption pairs (`prepare_folder`): captions from sidecar `.txt` files,
a captions CSV, or the directory name through a template; split by image (splits.py)
unless the folder is already split into train/ and validation/.
"""
from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from .errors import DataError
from .files import content_hash, not_utf8, open_csv, shown
from .image_files import walk_images
from .images import IMAGE_SUFFIXES, unreadable_images
from .pairs import CaptionPair, DataProblem, PairSet
from .splits import split_by_image

DEFAULT_TEMPLATE = "a photo of a {}"
VALIDATION_DIR_NAMES = ("validation", "val", "valid")
# Folder names that say where files are kept, not what they show: poor captions ("a photo of a photos").
STORAGE_FOLDER_NAMES = frozenset({
    "photos", "photo", "pictures", "picture", "pics", "images", "image", "img", "imgs", "dcim", "camera",
    "camera roll", "downloads", "download", "desktop", "documents", "new folder", "untitled folder", "misc",
    "other", "others", "backup", "backups", "export", "exports", "import", "imports", "upload", "uploads", "tmp",
    "temp", "data", "dataset", "files", "scans", "screenshots", "drawings", "sorted", "unsorted", "old", "new",
    "all", "archive", "raw", "edited", "final", "originals", "iphone", "android", "whatsapp images", "test"})


def humanize(name: str) -> str:
    """A directory name as words: 'golden_retriever' -> 'golden retriever'."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]+", " ", name)).strip()


def template_caption(label: str, template: str = DEFAULT_TEMPLATE) -> str:
    if "{}" not in template:
        raise DataError(f"caption template {template!r} has no '{{}}' for the directory name")
    return template.replace("{}", humanize(label))


def poor_caption_folders(pairs: Sequence[CaptionPair]) -> dict[str, int]:
    """{folder name: images captioned from it} for template captions whose folder name says little about
    an image: digits (a year, a date, a camera's counter) or a name for where files are kept."""
    poor: dict[str, int] = defaultdict(int)
    seen: set[str] = set()
    for pair in pairs:
        label = pair.label or ""
        if (pair.metadata or {}).get("caption_source") != "template" or pair.source in seen:
            continue
        seen.add(pair.source)
        words = humanize(label).lower()
        if any(c.isdigit() for c in words) or words in STORAGE_FOLDER_NAMES:
            poor[label] += 1
    return dict(poor)


def read_captions_csv(path: str | Path, problems: Optional[list[DataProblem]] = None) -> dict[str, list[str]]:
    """{image key: [captions]} from a CSV with an image column and a caption column.

    Image column: image, file, filename or path; caption column: caption, description or text.
    Keys are matched against the image's path relative to the folder, then its file name.
    Several rows for one image give it several captions. A row that is not UTF-8 text is skipped
    and added to `problems`.
    """
    path = Path(path).expanduser()
    with open_csv(path, "captions CSV") as fh:
        reader = csv.DictReader(fh)
        columns = {c.strip().lower(): c for c in reader.fieldnames or [] if c}
        image_col = next((columns[c] for c in ("image", "file", "filename", "path") if c in columns), None)
        text_col = next((columns[c] for c in ("caption", "description", "text") if c in columns), None)
        if image_col is None or text_col is None:
            raise DataError(f"{path}: a captions CSV needs an image column (image/file/filename/path) and a "
                            f"caption column (caption/description/text); it has "
                            f"{shown(', '.join(reader.fieldnames or []))}")
        captions: dict[str, list[str]] = defaultdict(list)
        for row in reader:
            key, text = (row.get(image_col) or "").strip(), (row.get(text_col) or "").strip()
            undecoded = not_utf8(key, text)
            if undecoded:
                if problems is not None:
                    problems.append(DataProblem(f"{path.name}:{reader.line_num}", undecoded))
                continue
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
    result = PairSet([], [])
    csv_captions = read_captions_csv(captions_csv, result.problems) if captions_csv else {}
    images = sorted(Path(p) for p in walk_images(root) if os.path.isfile(p))  # hidden files and folders skipped
    if not images:
        raise DataError(f"{root}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    fixed = _fixed_subsets(root)
    images = _readable(images, root, result.problems)
    originals = same_bytes_as(images)  # a copy is split with its original: never one in each subset
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
        original = originals.get(image)
        if fixed and original is not None and fixed.get(original.relative_to(root).parts[0]) != subset:
            result.problems.append(DataProblem(rel.as_posix(), f"the same bytes as {original.relative_to(root)}, "
                                               f"in another subset: left out"))
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
        copies = {image.relative_to(root).as_posix(): original.relative_to(root).as_posix()
                  for image, original in originals.items()}
        assignment = _split_keeping_copies(strata, copies, val=val, seed=seed)
        result.pairs = [_with_subset(p, assignment[p.source]) for p in result.pairs]
    return result


def _readable(images: list[Path], root: Path, problems: list) -> list[Path]:
    """The images that decode; the others go to `problems` (training would skip them every epoch)."""
    unreadable = unreadable_images(images)
    for image in images:
        if str(image) in unreadable:
            problems.append(DataProblem(image.relative_to(root).as_posix(), unreadable[str(image)]))
    return [image for image in images if str(image) not in unreadable]


def same_bytes_as(paths: Sequence[Path]) -> dict[Path, Path]:
    """{copy: original} for files whose bytes equal an earlier file's (only same-size files are hashed)."""
    by_size: dict[int, list[Path]] = defaultdict(list)
    for path in paths:
        by_size[path.stat().st_size].append(path)
    copies: dict[Path, Path] = {}
    for group in (g for g in by_size.values() if len(g) > 1):
        first: dict[str, Path] = {}
        for path in group:
            original = first.setdefault(content_hash(path), path)
            if original != path:
                copies[path] = original
    return copies


def _split_keeping_copies(strata: dict[str, str], copies: dict[str, str], *, val: float, seed: int) -> dict[str, str]:
    """`split_by_image` over the originals; each copy (of a captioned original) goes where its original went."""
    kept = {copy: original for copy, original in copies.items() if copy in strata and original in strata}
    assignment = split_by_image({rel: s for rel, s in strata.items() if rel not in kept}, val=val, seed=seed)
    assignment.update({copy: assignment[original] for copy, original in kept.items()})
    return assignment


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
