"""Issue 8, the store: a damaged CURRENT, an empty or unreadable folder, a corrupted matrix, a
truncated database. Each case first reproduced as the tester found it, then held to: nothing lost,
nothing wrong, one line that names the command that works (`check --repair`).

Real components only: the tiny open_clip model, SQLite, the matrix files, the command line.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from adapters.clip.cli import main
from adapters.clip.errors import StoreError
from adapters.clip.indexing import IndexOptions, index, reindex
from adapters.clip.integrity import check_store
from adapters.clip.search import Searcher
from adapters.clip.matrix import ROWS_FILE, VECTORS_FILE
from adapters.clip.store import CURRENT, DB_FILE, Store
from conftest import pattern_image

QUIET = dict(show_progress=False, ann="off")


def write_images(folder: Path, count: int, first_seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img {first_seed + i:03d}.png"
        pattern_image(first_seed + i).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def indexed(tmp_path, embedder):
    """A store of 6 images (4 in the folder, 2 in a sub-folder) with a subset and metadata."""
    folder = tmp_path / "photos"
    paths = write_images(folder, 4) + write_images(folder / "sub", 2, first_seed=10)
    root = tmp_path / "store"
    index(root, embedder, [folder], IndexOptions(subset="train", metadata={"camera": "Canon"}, **QUIET))
    return folder, root, paths


def data_dir(root: Path) -> Path:
    return root / (root / CURRENT).read_text().strip()


def top_paths(store: Store, embedder, paths: list[Path]) -> list[str]:
    vectors = embedder.embed_images(paths).vectors
    return [Searcher(store, ann="off").search(v, k=1).hits[0].path for v in vectors]


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file a store keeps (SQLite's own -wal/-shm aside: they are SQLite's, not ours)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


# ---- 1. a damaged CURRENT ------------------------------------------------------------------------
def test_a_lost_current_is_an_error_that_deletes_nothing_and_check_repairs_it(indexed, embedder):
    folder, root, paths = indexed
    live = data_dir(root)
    (root / CURRENT).unlink()
    with pytest.raises(StoreError, match="CURRENT is missing.*check --store .* --repair"):
        index(root, embedder, [folder / "sub"], IndexOptions(**QUIET))
    assert (live / DB_FILE).is_file()
    report = check_store(root, repair=True)
    assert report.problems and not report.unrepaired
    with Store.open(root) as store:
        assert store.count() == 6
        assert top_paths(store, embedder, paths) == [str(p) for p in paths]


@pytest.mark.parametrize("content", ["data-9\n", "../etc\n", "\n"])
def test_a_current_naming_no_data_folder_deletes_nothing_even_on_reindex(indexed, embedder, content):
    folder, root, paths = indexed
    live = data_dir(root)
    (root / CURRENT).write_text(content)
    for run in (index, reindex):
        with pytest.raises(StoreError, match="damaged.*check --store .* --repair"):
            run(root, embedder, [folder], IndexOptions(**QUIET))
        assert (live / DB_FILE).is_file()
    assert main(["check", "--store", str(root), "--repair"]) == 0
    assert data_dir(root) == live
    assert index(root, embedder, [folder], IndexOptions(**QUIET)).unchanged == 6


def test_a_reindex_killed_between_its_rename_and_current_is_finished_not_deleted(indexed, embedder, tmp_path):
    folder, root, _ = indexed
    old = data_dir(root)
    reindex(root, embedder, [], IndexOptions(**QUIET))
    new = data_dir(root)
    (root / CURRENT).write_text(old.name + "\n")   # as if killed after renaming, before CURRENT
    shutil.copytree(new, tmp_path / "keep")         # (the old folder was removed by nothing yet)
    assert old.is_dir()
    summary = index(root, embedder, [folder], IndexOptions(**QUIET))
    assert data_dir(root) == new and not old.exists()
    assert summary.unchanged == 6 and any("re-index" in note for note in summary.notes)


# ---- 2. an empty or unreadable folder ------------------------------------------------------------
def test_an_emptied_folder_keeps_its_items_subset_and_metadata(indexed, embedder, tmp_path):
    folder, root, paths = indexed
    away = tmp_path / "unmounted"
    shutil.move(str(folder), str(away))
    folder.mkdir()  # the empty mount point
    summary = index(root, embedder, [folder], IndexOptions(**QUIET))
    assert (summary.removed, summary.items) == (0, 6)
    assert any("--allow-empty-root" in note for note in summary.notes)
    shutil.rmtree(folder)
    shutil.move(str(away), str(folder))  # remounted
    summary = index(root, embedder, [folder], IndexOptions(**QUIET))
    assert (summary.unchanged, summary.added, summary.removed) == (6, 0, 0)
    with Store.open(root) as store:
        record = store.item_by_path(paths[0])
        assert (record.subset, record.metadata["camera"], record.metadata["width"]) == ("train", "Canon", 64)


def test_allow_empty_root_removes_the_items_of_an_emptied_folder(indexed, embedder, capsys):
    folder, root, paths = indexed
    for path in paths:
        path.unlink()
    assert main(["index", str(folder), "--store", str(root), "--model", "tiny", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "removed 0" in captured.out and "--allow-empty-root" in captured.err
    assert main(["index", str(folder), "--store", str(root), "--model", "tiny", "--device", "cpu",
                 "--allow-empty-root"]) == 0
    assert "removed 6" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_an_unreadable_sub_folder_removes_nothing_under_it(indexed, embedder):
    folder, root, _ = indexed
    (folder / "sub").chmod(0)
    try:
        summary = index(root, embedder, [folder], IndexOptions(allow_empty_root=True, **QUIET))
    finally:
        (folder / "sub").chmod(0o755)
    assert (summary.removed, summary.items) == (0, 6)


# ---- 4. same-size corruption of the matrix --------------------------------------------------------
@pytest.mark.parametrize("victim,garbage", [(VECTORS_FILE, "random"), (VECTORS_FILE, "zeros"), (ROWS_FILE, "random")])
def test_same_size_matrix_corruption_is_found_searched_right_and_repaired(indexed, embedder, capsys, victim,
                                                                         garbage):
    folder, root, paths = indexed
    target = data_dir(root) / victim
    size = target.stat().st_size
    rng = np.random.default_rng(0)
    target.write_bytes(rng.bytes(size) if garbage == "random" else bytes(size))
    damaged = file_bytes(root)

    capsys.readouterr()
    assert main(["search", "--image", str(paths[3]), "--store", str(root), "-k", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["path"] == str(paths[3])  # right, from the database
    assert "check --store" in captured.err and "--repair" in captured.err
    assert file_bytes(root) == damaged  # a search writes nothing

    assert main(["check", "--store", str(root)]) == 1
    assert "problem:" in capsys.readouterr().out
    assert main(["check", "--store", str(root), "--repair"]) == 0
    assert main(["check", "--store", str(root)]) == 0
    assert "ok:" in capsys.readouterr().out
    with Store.open(root, readonly=True) as store:
        assert top_paths(store, embedder, paths) == [str(p) for p in paths] and not store.warnings


def test_index_repairs_a_corrupted_matrix_before_adding_to_it(indexed, embedder):
    folder, root, paths = indexed
    target = data_dir(root) / VECTORS_FILE
    target.write_bytes(bytes(target.stat().st_size))
    late = write_images(folder, 1, first_seed=40)
    summary = index(root, embedder, [folder], IndexOptions(**QUIET))
    assert (summary.unchanged, summary.added) == (6, 1)
    assert check_store(root).problems == []
    with Store.open(root, readonly=True) as store:
        assert top_paths(store, embedder, paths + late) == [str(p) for p in paths + late]


# ---- 7. reads that write, damaged databases ------------------------------------------------------
def test_search_on_a_truncated_database_is_one_line_and_writes_nothing(indexed, capsys):
    _, root, _ = indexed
    db = data_dir(root) / DB_FILE
    db.write_bytes(b"")
    for wal in db.parent.glob(DB_FILE + "-*"):
        wal.unlink()
    before = file_bytes(root)
    assert main(["search", "dog", "--store", str(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "check --store" in err
    assert file_bytes(root) == before and db.stat().st_size == 0


def test_a_search_of_a_healthy_store_changes_no_file(indexed, capsys):
    _, root, _ = indexed
    before = file_bytes(root)
    assert main(["search", "dog", "--store", str(root), "--ann", "on"]) == 0
    assert file_bytes(root) == before


def test_check_names_what_it_cannot_repair(indexed, capsys):
    _, root, _ = indexed
    db = data_dir(root) / DB_FILE
    with open(db, "r+b") as fh:  # keep the header, destroy the pages
        fh.seek(4096)
        fh.write(os.urandom(db.stat().st_size - 4096))
    assert main(["check", "--store", str(root), "--repair"]) == 1
    out = capsys.readouterr()
    assert "index" in out.out + out.err
