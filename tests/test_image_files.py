"""The one folder walker, seen through each of its callers: which files each one finds, in what order.

Callers differ on purpose: `embed`/`classify` take every image under a folder (hidden ones too),
`prepare` and `index` skip hidden files and folders; none enters a symlinked folder; `index`
reports a broken link instead of dropping it silently. These expectations were checked against
the three walkers this one replaced.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapters.clip.cli import expand_paths
from adapters.clip.folders import prepare_folder
from adapters.clip.image_files import walk_images
from adapters.clip.indexing import scan_files
from adapters.clip.items import stream_url
from adapters.clip.prompt_images import PromptImageResolver
from conftest import pattern_image

ITEM_ID = "0123456789abcdef01234567"


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "photos"
    for i, rel in enumerate(["a.png", "B.JPG", ".hidden.png", ".cache/x.png", "sub/c.png", "sub/.d.png",
                             "z/e.webp", f".ids/{ITEM_ID}.png", "elsewhere/f.png"]):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pattern_image(i).save(path, format="JPEG" if rel.endswith(".JPG") else None)
    (root / "notes.txt").write_text("not an image")
    os.symlink(root / "sub" / "c.png", root / "linkfile.png")     # a linked file counts
    os.symlink(root / "elsewhere", root / "linkdir")              # a linked folder is not entered
    os.symlink(root / "missing.png", root / "broken.png")         # a dangling link
    return root


def rels(root: Path, paths) -> list[str]:
    return [Path(p).relative_to(root).as_posix() for p in paths]


VISIBLE = ["B.JPG", "a.png", "elsewhere/f.png", "linkfile.png", "sub/c.png", "z/e.webp"]


def test_walk_lists_each_folders_files_by_name_then_its_subfolders(tree):
    assert rels(tree, walk_images(tree)) == ["B.JPG", "a.png", "broken.png", "linkfile.png", "elsewhere/f.png",
                                             "sub/c.png", "z/e.webp"]
    everything = rels(tree, walk_images(tree, hidden=True))
    assert everything[:5] == [".hidden.png", "B.JPG", "a.png", "broken.png", "linkfile.png"]
    assert {".cache/x.png", "sub/.d.png", f".ids/{ITEM_ID}.png"} <= set(everything)
    assert not any(r.startswith("linkdir/") for r in everything)


def test_embed_and_classify_take_hidden_images_too_sorted_and_readable(tree):
    assert rels(tree, expand_paths([str(tree)])) == sorted(
        [".cache/x.png", f".ids/{ITEM_ID}.png", ".hidden.png", "sub/.d.png", *VISIBLE],
        key=lambda r: Path(r).parts)


def test_prepare_skips_hidden_images_and_dangling_links(tree):
    result = prepare_folder(tree, val=0.0)
    seen = {p.source for p in result.pairs} | {p.source for p in result.problems}
    assert seen == set(VISIBLE)


def test_index_skips_hidden_images_and_reports_a_dangling_link(tree):
    files, scope, problems = scan_files([tree])
    assert rels(tree, [f.path for f in files]) == sorted(VISIBLE)
    assert scope.folders == [str(tree)]
    assert [(Path(path).name, reason.split(":")[0]) for path, reason in problems] == [("broken.png", "cannot stat")]


def test_prompt_images_are_found_by_item_id_in_hidden_folders(tree):
    path, why = PromptImageResolver(tree).resolve(stream_url(ITEM_ID), None)
    assert (path, why) == (tree / ".ids" / f"{ITEM_ID}.png", "")
