"""Which local file is a prompt item's image (`PromptImageResolver`), and where a downloader puts it.

A prompt item's image is another item, referenced from the prompt JSON (items.py reads the
reference); the platform side downloads missing ones to `<export root>/prompt_images/<item id><suffix>`
(`prompt_image_target`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

from .files import within
from .image_files import has_image_suffix, walk_images
from .items import is_item_id, ref_item_id

# Where images referenced by prompt items are looked for (and where a downloader should put
# them): <export root>/prompt_images/<item id><suffix>.
PROMPT_IMAGES_DIR = "prompt_images"


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
            if local is not None:  # local references stay inside the export
                inside = within(local, self.root)
                if inside is None:
                    return None, f"prompt image reference {ref[:80]!r} leads outside the export; skipped"
                return (inside, "") if inside.is_file() else (None, f"prompt image {inside} does not exist")
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
                    if has_image_suffix(path.name) and path.is_file():
                        listing.setdefault(path.stem, path)
            self._listings[folder] = listing
        return listing.get(prompt_file.stem)

    def _id_index(self) -> dict[str, Path]:
        """{item id: file} for image files named by an item id, anywhere under the root (walked once)."""
        if self._by_id is None:
            self._by_id = {}
            for path in walk_images(self.root, hidden=True):
                stem = os.path.splitext(os.path.basename(path))[0]
                if is_item_id(stem):
                    self._by_id.setdefault(stem, Path(path))
        return self._by_id


def _local_ref(ref: str, base: Path) -> Optional[Path]:
    parsed = urlparse(ref)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme in ("http", "https") or ref_item_id(ref):
        return None
    path = Path(ref).expanduser()
    return path if path.is_absolute() else base / path


def prompt_image_target(root: str | Path, item_id: str, suffix: str) -> Path:
    return Path(root) / PROMPT_IMAGES_DIR / f"{item_id}{suffix.lower()}"
