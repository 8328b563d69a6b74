"""Issue 16 item 2: the store's ANN file is checked, its hits re-scored, a lost one rebuilt.

Each case reproduces what the hostile round found (random bytes in `ann-*.faiss` answered hits
with scores up to 6e37 and `check --repair` said ok; a deleted index made `index` say "up to date"
forever), then holds the trusted behaviour. Real SQLite, real FAISS, real files; the CLI runs
in-process like the other store tests.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from adapters.clip.ann import ANN_PREFIX, AnnIndex, ann_state, refresh_ann
from adapters.clip.cli import main
from adapters.clip.integrity import check_store
from adapters.clip.search import Searcher
from adapters.clip.store import ModelBinding, Store
from test_search import clustered, fresh_queries

DIM = 32
N = 4000


@pytest.fixture
def ann_store(tmp_path):
    """4000 clustered vectors with a built ANN index (closed: each test opens what it needs)."""
    vectors = clustered(N, seed=8)
    root = tmp_path / "store"
    with Store.open(root, create=ModelBinding("synthetic", "5" * 32, DIM)) as store:
        store.add_vectors([f"/v/{i:04d}.png" for i in range(N)], vectors)
        assert "built" in refresh_ann(store, build=True)
        data_dir = store.data_dir
    return root, data_dir, vectors


def ann_file(data_dir: Path) -> Path:
    return data_dir / ann_state(data_dir)["file"]


def scribble(path: Path, *, keep_mtime: bool = False) -> None:
    """Random bytes over the middle third of a file (its vectors and ids), same size; optionally with
    the old mtime put back, as bit rot or a write within the same clock tick leaves it."""
    before = path.stat()
    size = before.st_size
    with open(path, "r+b") as fh:
        fh.seek(size // 3)
        fh.write(np.random.default_rng(0).bytes(size // 3))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def exact_paths(root: Path, query: np.ndarray, k: int = 10) -> list[str]:
    with Store.open(root, readonly=True) as store:
        return [h.path for h in Searcher(store, ann="off").search(query, k=k).hits]


def garble_loaded_codes(ann: AnnIndex) -> None:
    """Overwrite the stored codes of a loaded index in memory (its ids stay valid): what FAISS answers
    from a damaged index that still parses. Flat codes get floats of 1e6, quantized codes random bytes."""
    import faiss

    ivf = faiss.extract_index_ivf(ann.index)
    lists = ivf.invlists
    rng = np.random.default_rng(0)
    for list_no in range(ivf.nlist):
        size = lists.list_size(list_no)
        if not size:
            continue
        codes = faiss.rev_swig_ptr(lists.get_codes(list_no), size * ivf.code_size)
        if ivf.code_size == 4 * ivf.d:
            codes.view(np.float32)[:] = rng.normal(0, 1e6, size * ivf.d).astype(np.float32)
        else:
            codes[:] = rng.integers(0, 256, len(codes), dtype=np.uint8)


def test_every_ann_hit_is_rescored_from_the_matrix(ann_store):
    """Whatever FAISS answers (here from codes damaged in memory; before, random bytes in the file
    gave scores up to 6e37), a hit is shown with its true cosine from the matrix, in that order."""
    root, data_dir, vectors = ann_store
    rows_of = {f"/v/{i:04d}.png": i for i in range(N)}
    with Store.open(root, readonly=True) as store:
        ann = AnnIndex.load(data_dir, writable=True)
        garble_loaded_codes(ann)
        store.keep_search_index(ann.file, ann)
        for query in fresh_queries(5, seed=3):
            result = Searcher(store, ann="on").search(query, k=10)
            assert store.cached_search_index(ann.file) is ann and result.hits
            scores = [h.score for h in result.hits]
            truth = [float(vectors[rows_of[h.path]] @ query) for h in result.hits]
            np.testing.assert_allclose(scores, truth, atol=1e-5)
            assert scores == sorted(scores, reverse=True)


def test_a_search_does_not_trust_an_ann_file_changed_since_it_was_written(ann_store, capsys):
    root, data_dir, _ = ann_store
    scribble(ann_file(data_dir))
    query = fresh_queries(1, seed=4)[0]
    with Store.open(root, readonly=True) as store:
        result = Searcher(store, ann="on").search(query, k=10)
    assert result.method == "exact" and [h.path for h in result.hits] == exact_paths(root, query)
    assert any("ANN index" in w and "check --store" in w for w in result.warnings)
    assert main(["search", "--store", str(root), "anything", "--model", "tiny"]) in (0, 1)  # never a traceback


def test_check_finds_a_damaged_ann_file_and_repair_rebuilds_it(ann_store, capsys):
    root, data_dir, _ = ann_store
    scribble(ann_file(data_dir), keep_mtime=True)
    report = check_store(root)
    assert any("ANN index" in p for p in report.problems), report.problems
    assert main(["check", "--store", str(root)]) == 1
    assert main(["check", "--store", str(root), "--repair"]) == 0
    assert "ANN index" in capsys.readouterr().out
    assert check_store(root).problems == []
    query = fresh_queries(1, seed=5)[0]
    with Store.open(root, readonly=True) as store:
        result = Searcher(store, ann="on").search(query, k=10)
    assert result.method == "ann" and not result.warnings
    assert len(set(h.path for h in result.hits) & set(exact_paths(root, query))) >= 8


def test_a_deleted_ann_file_is_rebuilt_by_the_next_index_run_not_reported_up_to_date(ann_store):
    root, data_dir, _ = ann_store
    ann_file(data_dir).unlink()
    assert any("ANN index" in p for p in check_store(root).problems)
    with Store.open(root, readonly=True) as store:  # a search says so instead of going slow in silence
        result = Searcher(store, threshold=N // 2).search(fresh_queries(1)[0], k=5)
        assert any("ANN index" in w for w in result.warnings) and result.method == "exact"
    with Store.open(root) as store:
        assert "built" in refresh_ann(store)
        assert ann_file(store.data_dir).is_file() and AnnIndex.load(store.data_dir) is not None
    assert check_store(root).problems == []
    assert len(list(data_dir.glob(ANN_PREFIX + "*.faiss"))) == 1


def test_check_repair_rebuilds_a_deleted_ann_file(ann_store):
    root, data_dir, _ = ann_store
    ann_file(data_dir).unlink()
    report = check_store(root, repair=True)
    assert report.problems and not report.unrepaired
    assert ann_file(data_dir).is_file() and check_store(root).problems == []


def test_an_index_from_before_checksums_is_used_rescored_and_replaced_by_the_next_index_run(ann_store):
    """A store written by the previous version: IVF-Flat, no checksum in ann.json."""
    import json

    from adapters.clip.ann import ANN_STATE

    root, data_dir, vectors = ann_store
    state = json.loads((data_dir / ANN_STATE).read_text())
    for key in ("checksum", "size", "mtime_ns"):
        state.pop(key)
    state["kind"] = "ivf-flat"
    (data_dir / ANN_STATE).write_text(json.dumps(state))
    query = fresh_queries(1, seed=6)[0]
    with Store.open(root, readonly=True) as store:
        result = Searcher(store, ann="on").search(query, k=10)
    assert result.method == "ann" and not result.warnings
    report = check_store(root)
    assert report.problems == [] and any("without a checksum" in n for n in report.notes)
    with Store.open(root) as store:
        assert "built" in refresh_ann(store)
    assert ann_state(data_dir)["kind"] == "ivf-sq8" and ann_state(data_dir)["checksum"]


def test_repair_of_a_damaged_index_on_a_store_emptied_since_removes_it(ann_store):
    root, data_dir, _ = ann_store
    with Store.open(root) as store:
        with store.transaction() as txn:
            for record in store.iter_items():
                txn.delete(record.id)
    ann_file(data_dir).unlink()
    report = check_store(root, repair=True)
    assert report.problems and not report.unrepaired and ann_state(data_dir) == {}
    assert check_store(root).problems == []
