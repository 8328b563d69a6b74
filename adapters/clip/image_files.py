"""Finding image files in folders: the one walker every command uses.

`walk_images` lists, depth first, the entries of a folder tree whose names end in an image
suffix; each folder's files come in name order, then its sub-folders in name order. Symlinked
folders are not entered (a link loop cannot hang a run, and a linked tree is not counted
twice); symlinked files are listed like files. Entries are listed by name only, so a broken
link or a special file can appear: callers that need readable files check or stat them (and
say why one is skipped). Callers sort the result as they need.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Optional

from .images import IMAGE_SUFFIXES


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def has_image_suffix(name: str, suffixes: frozenset[str] = IMAGE_SUFFIXES) -> bool:
    return os.path.splitext(name)[1].lower() in suffixes


def walk_images(folder: str | os.PathLike, *, hidden: bool = False, suffixes: frozenset[str] = IMAGE_SUFFIXES,
                on_error: Optional[Callable[[OSError], None]] = None) -> Iterator[str]:
    """Paths (`folder` joined with the names found) of image-named entries under `folder`.

    hidden=False skips hidden (dot) files and does not enter hidden folders. `on_error` gets
    each folder that cannot be listed (default: skipped silently).
    """
    for current, dirs, files in os.walk(folder, onerror=on_error):
        dirs[:] = sorted(d for d in dirs if hidden or not is_hidden(d))
        for name in sorted(files):
            if (hidden or not is_hidden(name)) and has_image_suffix(name, suffixes):
                yield os.path.join(current, name)
