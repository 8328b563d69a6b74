"""The local store: incremental indexing, model binding, re-index, crash safety, concurrency.

Everything is real: the tiny open_clip model, SQLite, the memory-mapped matrix, files on disk,
and a child process killed with SIGKILL. Nothing is faked.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.clip import indexing as indexing_module
from adapters.clip import store as store_module
from adapters.clip.embed import Embedder
from adapters.clip.errors import InputError, ModelMismatchError, StoreError
from adapters.clip.models import load_model, save_checkpoint
from adapters.clip.search import Searcher
from adapters.clip.indexing import IndexOptions, index, reindex
from adapters.clip.matrix import MATRIX_STATE, ROWS_FILE, VECTORS_FILE
from adapters.clip.store import CURRENT, DB_FILE, ModelBinding, Store
from conftest import ROOT, pattern_image

QUIET = dict(show_progress=False, ann="off")


def write_images(folder: Path, names: list[str], first_seed: int = 0) -> list[Path]:
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pattern_image(first_seed + i).save(path)
        paths.append(path)
    return paths


def top_path(store: Store, vector: np.ndarray) -> tuple[str, float]:
    hit = Searcher(store, ann="off").search(vector, k=1).hits[0]
    return hit.path, hit.score


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A second real model: tiny with perturbed weights, saved and loaded as a checkpoint."""
    clip = load_model("tiny", device="cpu")
    with torch.no_grad():
        for param in clip.model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    directory = save_checkpoint(clip, tmp_path_factory.mktemp("other") / "other-tiny")
    return load_model(str(directory), device="cpu")


@pytest.fixture
def photos(tmp_path):
    """Five images, with unicode and spaces in their names and folders."""
    folder = tmp_path / "photos"
    names = ["a.png", "my photo 1.png", "ünïcode 画像/b.png", "sub dir/c d.jpg", "e.webp"]
    return folder, write_images(folder, names)


def test_index_stores_each_image_vector_and_finds_it_by_itself(photos, embedder, tmp_path):
    folder, paths = photos
    root = tmp_path / "store"
    summary = index(root, embedder, [folder], IndexOptions(**QUIET))
    assert (summary.added, summary.failed, summary.items) == (5, 0, 5)
    expected = embedder.embed_images(paths).vectors
    with Store.open(root) as store:
        assert store.binding == ModelBinding.of(embedder.clip)
        for path, vector in zip(paths, expected):
            record = store.item_by_path(path)
            assert record is not None and record.path == str(path)  # unicode and spaces round-trip
            np.testing.assert_allclose(store.vector(record.id), vector, atol=1e-6)
            found, score = top_path(store, vector)
            assert found == str(path) and score == pytest.approx(1.0, abs=1e-5)


def test_second_run_over_unchanged_folder_only_stats(photos, embedder, tmp_path, monkeypatch):
    folder, _ = photos
    root = tmp_path / "store"
    index(root, embedder, [folder], IndexOptions(**QUIET))
    hashed, embedded = [], []
    real_hash, real_iter = indexing_module.file_hash, embedder.iter_images
    monkeypatch.setattr(indexing_module, "file_hash", lambda path: hashed.append(path) or real_hash(path))

    def counting_iter(sources, *args, **kwargs):
        for batch in real_iter(sources, *args, **kwargs):
            embedded.append(len(batch))
            yield batch

    monkeypatch.setattr(embedder, "iter_images", counting_iter)
    again = index(root, embedder, [folder], IndexOptions(**QUIET))
    assert (again.unchanged, again.added, again.updated, again.removed, again.reused) == (5, 0, 0, 0, 0)
    assert hashed == [] and embedded == []  # not one file was read, not one image embedded


def test_incremental_add_change_touch_delete_move_and_copy(photos, embedder, tmp_path):
    folder, paths = photos
    root = tmp_path / "store"
    index(root, embedder, [folder], IndexOptions(**QUIET))
    with Store.open(root) as store:
        before = {p: store.item_by_path(p) for p in paths}

    new = write_images(folder, ["new.png"], first_seed=50)[0]                 # added
    pattern_image(99).save(paths[0])                                          # changed content
    os.utime(paths[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    os.utime(paths[1], ns=(time.time_ns(), time.time_ns() + 2 * 10**9))       # touched, same bytes
    paths[2].unlink()                                                         # deleted
    moved = folder / "moved here" / "renamed.png"
    moved.parent.mkdir()
    os.rename(paths[3], moved)                                                # moved + renamed
    copy = folder / "copy of e.webp"
    shutil.copyfile(paths[4], copy)                                           # duplicate content

    summary = index(root, embedder, [folder], IndexOptions(**QUIET))
    assert (summary.added, summary.updated, summary.removed, summary.reused, summary.unchanged,
            summary.failed) == (1, 1, 1, 2, 2, 0)
    assert summary.items == 6
    with Store.open(root) as store:
        moved_record = store.item_by_path(moved)
        assert moved_record.id == before[paths[3]].id and moved_record.row == before[paths[3]].row
        assert store.item_by_path(paths[2]) is None and store.item_by_path(paths[3]) is None
        assert store.item_by_path(paths[1]).row == before[paths[1]].row       # not re-embedded
        np.testing.assert_allclose(store.vector(store.item_by_path(copy).id), store.vector(before[paths[4]].id))
        changed = embedder.embed_images([paths[0], new]).vectors
        assert top_path(store, changed[0])[0] == str(paths[0])
        assert top_path(store, changed[1])[0] == str(new)
        assert store.item_by_path(paths[0]).row != before[paths[0]].row      # a fresh row, old one dead
        snapshot = store.snapshot()
        assert snapshot.n_live == 6 and not snapshot.all_live
        assert before[paths[0]].row not in set(np.flatnonzero(snapshot.live))
    assert index(root, embedder, [folder], IndexOptions(**QUIET)).unchanged == 6


def test_unreadable_file_is_reported_skipped_and_not_retried_until_it_changes(photos, embedder, tmp_path):
    folder, _ = photos
    broken = folder / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    root = tmp_path / "store"
    first = index(root, embedder, [folder], IndexOptions(**QUIET))
    assert (first.added, first.failed) == (5, 1)
    assert first.failures[0][0] == str(broken) and "image" in first.failures[0][1]
    second = index(root, embedder, [folder], IndexOptions(**QUIET))
    assert (second.added, second.failed) == (0, 1) and "not retried" in second.failures[0][1]
    pattern_image(7).save(broken, format="JPEG")
    third = index(root, embedder, [folder], IndexOptions(**QUIET))
    assert (third.added, third.failed, third.items) == (1, 0, 6)


def test_missing_path_is_an_error_not_a_mass_removal(photos, embedder, tmp_path):
    folder, _ = photos
    root = tmp_path / "store"
    index(root, embedder, [folder], IndexOptions(**QUIET))
    with pytest.raises(InputError, match="no such file or folder"):
        index(root, embedder, [tmp_path / "typo"], IndexOptions(**QUIET))
    with Store.open(root) as store:
        assert store.count() == 5


def test_another_model_is_a_clear_error_naming_the_store_model(photos, embedder, other_model, tmp_path):
    folder, _ = photos
    root = tmp_path / "store"
    index(root, embedder, [folder], IndexOptions(**QUIET))
    with pytest.raises(ModelMismatchError) as caught:
        index(root, Embedder(other_model, num_workers=0), [folder], IndexOptions(**QUIET))
    message = str(caught.value)
    assert "'tiny'" in message and "index --reindex" in message and str(root) in message


def test_reindex_builds_beside_and_a_failed_one_leaves_the_old_store_working(photos, embedder, other_model,
                                                                              tmp_path):
    folder, paths = photos
    root = tmp_path / "store"
    index(root, embedder, [folder], IndexOptions(subset="train", metadata={"camera": "x"}, **QUIET))
    other = Embedder(other_model, batch_size=2, num_workers=0)

    def interrupt_after_first_batch(summary):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reindex(root, other, options=IndexOptions(batch_size=2, on_batch=interrupt_after_first_batch, **QUIET))
    with Store.open(root) as store:  # the old store, untouched and searchable
        assert store.binding.name == "tiny" and store.count() == 5
        assert top_path(store, embedder.embed_images([paths[1]]).vectors[0])[0] == str(paths[1])

    summary = reindex(root, other, options=IndexOptions(batch_size=2, **QUIET))
    assert summary.reindexed and summary.unchanged == 2 and summary.added == 3  # resumed, not redone
    with Store.open(root) as store:
        assert store.binding == ModelBinding.of(other_model)
        record = store.item_by_path(paths[2])
        assert (record.subset, record.metadata["camera"]) == ("train", "x")  # attributes carried over
        np.testing.assert_allclose(store.vector(record.id), other.embed_images([paths[2]]).vectors[0], atol=1e-6)
    assert not list(root.glob("reindex-*"))
    index(root, other, [folder], IndexOptions(**QUIET))  # next writer run removes the old data folder
    assert sorted(p.name for p in root.glob("data-*")) == [(root / CURRENT).read_text().strip()]


def test_matrix_catches_up_after_a_crash_between_commit_and_matrix_update(photos, embedder, tmp_path):
    folder, paths = photos
    root = tmp_path / "store"
    index(root, embedder, [folder], IndexOptions(**QUIET))
    with Store.open(root) as store:
        data = store.data_dir
    stale_state = (data / MATRIX_STATE).read_bytes()
    late = write_images(folder, ["late.png"], first_seed=70)[0]
    index(root, embedder, [folder], IndexOptions(**QUIET))
    (data / MATRIX_STATE).write_bytes(stale_state)  # as if killed after COMMIT, before the matrix update
    vector = embedder.embed_images([late]).vectors[0]
    with Store.open(root) as store:
        assert top_path(store, vector)[0] == str(late)
    for name in (MATRIX_STATE, VECTORS_FILE, ROWS_FILE):  # matrix lost entirely: rebuilt from SQLite
        (data / name).unlink()
    with Store.open(root) as store:
        assert store.snapshot().n_live == 6 and top_path(store, vector)[0] == str(late)


def test_sigkill_mid_index_keeps_committed_items_and_the_next_run_resumes(tmp_path, embedder):
    """A child process indexes slowly; we search while it writes, then kill it with SIGKILL."""
    folder, root, total = tmp_path / "many", tmp_path / "store", 24
    paths = write_images(folder, [f"img {i:02d}.png" for i in range(total)])
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from adapters.clip.embed import Embedder
        from adapters.clip.models import load_model
        from adapters.clip.indexing import IndexOptions, index

        def slowly(summary):
            print("committed", summary.added, flush=True)
            time.sleep(0.3)

        embedder = Embedder(load_model("tiny", device="cpu"), batch_size=2, num_workers=0)
        index({str(root)!r}, embedder, [{str(folder)!r}],
              IndexOptions(batch_size=2, show_progress=False, ann="off", on_batch=slowly))
        print("finished", flush=True)
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(child)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        counts_seen_by_reader = []
        line = ""
        while True:
            line = proc.stdout.readline()
            assert line, f"child ended early: {proc.stderr.read()}"
            committed = int(line.split()[1])
            with Store.open(root) as reader:  # a search while the index run writes
                result = Searcher(reader, ann="off").search(reader.vector(reader.item_by_path(paths[0]).id), k=3)
                assert result.hits[0].path == str(paths[0])
                counts_seen_by_reader.append(reader.count())
            if committed >= 8:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert counts_seen_by_reader == sorted(counts_seen_by_reader) and counts_seen_by_reader[-1] > counts_seen_by_reader[0]

    with Store.open(root) as store:
        survived = store.count()
        assert 8 <= survived < total
        committed_paths = [r.path for r in store.iter_items()]
        rows_before = {r.path: r.row for r in store.iter_items()}
        vectors = embedder.embed_images(committed_paths).vectors
        for path, vector in zip(committed_paths, vectors):  # intact and searchable
            assert top_path(store, vector)[0] == path
    summary = index(root, embedder, [folder], IndexOptions(**QUIET))
    assert (summary.unchanged, summary.added, summary.items) == (survived, total - survived, total)
    with Store.open(root) as store:
        assert all(store.item_by_path(p).row == row for p, row in rows_before.items())  # not re-embedded


def test_a_second_writer_fails_fast(tmp_path, photos, embedder):
    folder, _ = photos
    root = tmp_path / "store"
    index(root, embedder, [folder], IndexOptions(**QUIET))
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
                               f"from adapters.clip.store import writer_lock\n"
                               f"with writer_lock({str(root)!r}):\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match="being written by another index run"):
            index(root, embedder, [folder], IndexOptions(**QUIET))
        with Store.open(root) as store:  # readers are not blocked
            assert store.count() == 5
    finally:
        holder.kill()
        holder.wait()
    from adapters.clip.store import writer_lock
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        with writer_lock(root):
            locked.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert locked.wait(30)
        with pytest.raises(StoreError, match="being written"):  # another thread is another writer
            index(root, embedder, [folder], IndexOptions(**QUIET))
    finally:
        release.set()
        thread.join()
    assert index(root, embedder, [folder], IndexOptions(**QUIET)).unchanged == 5


def test_schema_migrates_from_version_1_and_refuses_newer(photos, embedder, tmp_path):
    folder, paths = photos
    root = tmp_path / "store"
    index(root, embedder, [folder], IndexOptions(**QUIET))
    db = root / (root / CURRENT).read_text().strip() / DB_FILE
    with sqlite3.connect(db) as conn:  # what a version-1 store looks like
        conn.execute("DROP TABLE failures")
        conn.execute("PRAGMA user_version = 1")
    with Store.open(root) as store:
        assert store.info()["schema_version"] == store_module.SCHEMA_VERSION == 2
        assert store.conn.execute("SELECT COUNT(*) FROM failures").fetchone()[0] == 0
        assert store.count() == 5
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer than this code"):
        Store.open(root)


def test_opening_a_missing_store_says_how_to_make_one(tmp_path):
    with pytest.raises(StoreError, match="index PATH"):
        Store.open(tmp_path / "nothing here")


def test_compaction_drops_dead_rows_and_keeps_results(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "store"
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    paths = [f"/synthetic/{i}.png" for i in range(3000)]
    with Store.open(root, create=ModelBinding("synthetic", "f" * 32, 16)) as store:
        store.add_vectors(paths, vectors)
        replaced = vectors[:2000][::-1].copy()  # 2000 items get new vectors: 2000 dead rows
        store.add_vectors(paths[:2000], replaced)
        assert store.needs_compaction()
        store.compact()
        assert not store.needs_compaction()
        current = np.concatenate([replaced, vectors[2000:]])
        snapshot = store.snapshot()
        assert snapshot.rows == 3000 and snapshot.all_live
        query = current[123]
        result = Searcher(store, ann="off").search(query, k=5)
        reference = np.argsort(-(current @ query))[:5]
        assert [h.path for h in result.hits] == [paths[i] for i in reference]
        assert json.loads((store.data_dir / MATRIX_STATE).read_text())["epoch"] == 1


# ---- what indexing and search read through the store's public methods ---------------------------
def test_store_answers_indexing_by_folder_file_and_whole_store(photos, embedder, tmp_path):
    folder, paths = photos
    root = tmp_path / "store"
    assert Store.current_data_name(root) is None  # no store yet
    (folder / "broken.jpg").write_bytes(b"not an image")
    index(root, embedder, [folder], IndexOptions(**QUIET))
    sub = str(folder / "sub dir")
    with Store.open(root) as store:
        assert Store.current_data_name(root) == store.data_dir.name
        assert store.paths() == {str(p) for p in paths}
        assert set(store.items_in([sub])) == {str(folder / "sub dir" / "c d.jpg")}
        assert set(store.items_in(files=[str(paths[0])])) == {str(paths[0])}
        assert set(store.items_in([sub], [str(paths[0])])) == {str(folder / "sub dir" / "c d.jpg"), str(paths[0])}
        assert set(store.items_in(everything=True)) == store.paths()
        assert set(store.failures_in([str(folder)])) == {str(folder / "broken.jpg")}
        assert store.failures_in([sub]) == {}
        assert set(store.failures_in(everything=True)) == {str(folder / "broken.jpg")}


def test_store_keeps_one_search_index_under_its_key(tmp_path):
    with Store.open(tmp_path / "store", create=ModelBinding("synthetic", "e" * 32, 4)) as store:
        assert store.cached_search_index("ann-1.faiss") is None
        kept = object()
        store.keep_search_index("ann-1.faiss", kept)
        assert store.cached_search_index("ann-1.faiss") is kept
        assert store.cached_search_index("ann-2.faiss") is None  # another file on disk now
        assert store.cached_search_index("ann-1.faiss") is None  # ... so the old one was dropped
        store.keep_search_index("ann-1.faiss", kept)
        store.forget_search_index()
        assert store.cached_search_index("ann-1.faiss") is None

def test_a_bare_index_rescans_the_folders_the_store_was_given(tmp_path, capsys):
    from adapters.clip.cli import main

    folder, extra = tmp_path / "pics", tmp_path / "one.png"
    folder.mkdir()
    for i in range(2):
        pattern_image(i).save(folder / f"{i}.png")
    pattern_image(5).save(extra)
    store = str(tmp_path / "store")
    base = ["--store", store, "--model", "tiny", "--device", "cpu", "--json"]
    assert main(["index", "--store", store, "--model", "tiny"]) == 2  # a new store: nothing to rescan
    assert "has none to rescan" in capsys.readouterr().err
    assert main(["index", str(folder), str(extra), *base]) == 0
    assert main(["index", str(folder / "0.png"), *base]) == 0  # under a known folder: no new root
    pattern_image(7).save(folder / "new.png")
    capsys.readouterr()
    assert main(["index", *base]) == 0
    out = capsys.readouterr()
    assert f"rescanning the store's folders: {extra}, {folder}" in out.err  # sorted
    summary = json.loads(out.out)
    assert (summary["added"], summary["unchanged"], summary["removed"], summary["items"]) == (1, 3, 0, 4)
    assert main(["index", "--reindex", *base]) == 0
    with Store.open(store) as reopened:
        assert reopened.roots() == [str(extra), str(folder)]  # a re-index keeps them
