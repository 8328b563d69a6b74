"""Fault injection: SIGKILL at every commit point of index, reindex, compaction and training.

Each case runs the operation in a child process with `CLIP_ADAPTER_KILL_AT=<point>` (see
adapters/clip/faults.py), checks the child really died there (SIGKILL), checks what a reader sees
meanwhile, then runs the operation again and requires: an intact store (`check` finds nothing),
no debris left, and the same content as a run that was never interrupted. Everything is real:
the tiny open_clip model, SQLite, the matrix files, the training loop; the kill is a real SIGKILL.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.clip.faults import FAULT_POINTS, KILL_ENV
from adapters.clip.indexing import IndexOptions, index, reindex
from adapters.clip.integrity import check_store
from adapters.clip.search import Searcher
from adapters.clip.store import ModelBinding, Store
from conftest import ROOT, pattern_image

OPTIONS = dict(batch_size=2, show_progress=False, ann="off", subset="train", metadata={"year": "2020"})

PRELUDE = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
"""

INDEX_CHILD = PRELUDE + """
from adapters.clip.embed import Embedder
from adapters.clip.models import load_model
from adapters.clip.indexing import IndexOptions, index, reindex
op, root, folder = sys.argv[1:4]
embedder = Embedder(load_model("tiny", device="cpu"), batch_size=2, num_workers=0)
(reindex if op == "reindex" else index)(root, embedder, [folder], IndexOptions(**%r))
""" % OPTIONS

COMPACT_CHILD = PRELUDE + """
from adapters.clip.store import ModelBinding, Store
with Store.open(sys.argv[1], create=ModelBinding("synthetic", "c" * 32, 8)) as store:
    store.compact()
"""

TRAIN_CHILD = PRELUDE + """
from test_train import config
from test_fault_injection import TRAIN_SETTINGS, training_pairs
from adapters.clip.train import fit
fit(config(**TRAIN_SETTINGS), training_pairs(sys.argv[2]), sys.argv[1], show_progress=False)
"""


def killed_child(code: str, point: str, *args: str) -> None:
    """Run `code` in a child that must die by SIGKILL at `point` (a point never reached fails the test)."""
    env = {**os.environ, KILL_ENV: point, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == -signal.SIGKILL, f"not killed at {point}: rc {done.returncode}\n{done.stderr[-3000:]}"


def contents(root: Path) -> dict[str, tuple]:
    """Everything a store says about its items, vectors rounded (a child's BLAS may sum in another order)."""
    with Store.open(root, readonly=True) as store:
        return {r.path: (r.subset, json.dumps(r.metadata, sort_keys=True),
                         tuple(np.round(store.vector(r.id), 4).tolist())) for r in store.iter_items()}


def assert_intact(root: Path) -> None:
    report = check_store(root)
    assert report.problems == [], report.problems
    debris = [p.name for p in root.rglob("*") if ".tmp" in p.name or ".old-" in p.name or ".new-" in p.name]
    assert debris == [], debris
    with Store.open(root, readonly=True) as store:  # every item finds itself first
        for record in store.iter_items():
            hit = Searcher(store, ann="off").search(store.vector(record.id), k=1).hits[0]
            assert hit.path == record.path


def write_folder(folder: Path, seeds) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        pattern_image(seed).save(folder / f"img {seed:03d}.png")


# ---- index and reindex -----------------------------------------------------------------------------
INDEX_CASES = [  # (operation, kill point, the store already held an index before the operation)
    ("index", "store.created-before-current", False),
    ("index", "txn.before-commit@2", False),
    ("index", "txn.committed@2", False),
    ("index", "matrix.rows-written@2", False),
    ("index", "txn.committed@2", True),
    ("index", "index.removing-vanished", True),
    ("reindex", "txn.committed@2", True),
    ("reindex", "reindex.built", True),
    ("reindex", "reindex.renamed", True),
]


@pytest.mark.parametrize("operation,point,existing", INDEX_CASES, ids=[f"{o}-{p}" for o, p, _ in INDEX_CASES])
def test_index_killed_at_a_commit_point_resumes_to_the_same_store(tmp_path, embedder, operation, point, existing):
    folder, root, reference = tmp_path / "photos", tmp_path / "store", tmp_path / "reference"
    write_folder(folder, range(8))
    if existing:  # then some files go, some come: the run has additions, removals and a re-index to do
        for target in (root, reference):
            index(target, embedder, [folder], IndexOptions(**OPTIONS))
        for seed in (0, 1):
            (folder / f"img {seed:03d}.png").unlink()
        write_folder(folder, (20, 21))
    run = reindex if operation == "reindex" else index
    run(reference, embedder, [folder], IndexOptions(**OPTIONS))

    killed_child(INDEX_CHILD, point, operation, str(root), str(folder))
    if existing:  # a search meanwhile sees the store as before, or as far as the run committed
        with Store.open(root, readonly=True) as store:
            for record in store.iter_items():
                assert Searcher(store, ann="off").search(store.vector(record.id), k=1).hits[0].path == record.path
    run(root, embedder, [folder], IndexOptions(**OPTIONS))
    if operation == "reindex":  # the old data folder goes at the next writer run
        index(root, embedder, [folder], IndexOptions(**OPTIONS))
        index(reference, embedder, [folder], IndexOptions(**OPTIONS))
    assert_intact(root)
    assert contents(root) == contents(reference)


# ---- compaction -----------------------------------------------------------------------------------
def compactable(root: Path) -> None:
    """60 items, 30 of them updated since: 30 dead rows to compact away."""
    rng = np.random.default_rng(0)
    with Store.open(root, create=ModelBinding("synthetic", "c" * 32, 8)) as store:
        vectors = rng.standard_normal((60, 8)).astype(np.float32)
        store.add_vectors([f"/p/{i}.jpg" for i in range(60)], vectors / np.linalg.norm(vectors, axis=1, keepdims=True),
                          metadata=[{"i": i} for i in range(60)])
        updated = rng.standard_normal((30, 8)).astype(np.float32)
        store.add_vectors([f"/p/{i}.jpg" for i in range(30)], updated / np.linalg.norm(updated, axis=1, keepdims=True),
                          metadata=[{"i": i} for i in range(30)], batch=10)


@pytest.mark.parametrize("point", ["compact.committed", "compact.state-removed", "compact.vectors-replaced",
                                   "compact.committed+rebuild"])
def test_compaction_killed_at_a_commit_point_leaves_a_store_that_heals(tmp_path, point):
    root, reference = tmp_path / "store", tmp_path / "reference"
    compactable(root)
    compactable(reference)
    with Store.open(reference) as store:
        store.compact()
    if point.endswith("+rebuild"):  # the next run's rebuild from SQLite is itself killed: heal twice
        killed_child(COMPACT_CHILD, "compact.committed", str(root))
        point = "compact.vectors-replaced"
    killed_child(COMPACT_CHILD, point, str(root))
    with Store.open(root, readonly=True) as store:  # a reader meanwhile is right, from memory if need be
        query = store.vector(store.item_by_path("/p/5.jpg").id)
        assert Searcher(store, ann="off").search(query, k=1).hits[0].path == "/p/5.jpg"
    with Store.open(root) as store:  # the next writer brings the files up to date from SQLite
        with store.transaction():
            pass
        store.compact()
        assert store.snapshot().rows == store.count() == 60
    assert_intact(root)
    assert contents(root) == contents(reference)


# ---- training -------------------------------------------------------------------------------------
TRAIN_SETTINGS = dict(num_epochs=3, warmup_ratio=0.3, early_stop=False)


def training_pairs(folder: str):
    """12 training and 4 validation pairs on images written once in `folder`."""
    from adapters.clip.pairs import CaptionPair
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(16):
        path = folder / f"img{i:02d}.png"
        if not path.exists():
            pattern_image(200 + i).save(path)
        pairs.append(CaptionPair(image=path, caption=f"photo number {i}", subset="train" if i < 12 else "validation"))
    return pairs


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from adapters.clip.train import fit
    from test_train import config
    root = tmp_path_factory.mktemp("training")
    pairs = training_pairs(str(root / "images"))
    result = fit(config(**TRAIN_SETTINGS), pairs, root / "whole", show_progress=False)
    return root, result


# swap.* are hit by every replacement of best/ or last/ (the first save of each creates it: no swap)
TRAIN_CASES = ["train.epoch-trained@2", "train.best-saved@1", "train.last-saved@2", "swap.old-moved-aside@2",
               "swap.new-in@3"]


@pytest.mark.parametrize("point", TRAIN_CASES)
def test_training_killed_at_a_commit_point_resumes_from_the_last_complete_epoch(uninterrupted, tmp_path, capsys,
                                                                              point):
    from adapters.clip.models import CHECKPOINT_WEIGHTS, read_state_dict
    from adapters.clip.train import fit
    from test_train import config
    root, whole = uninterrupted
    run_dir = tmp_path / "run"
    killed_child(TRAIN_CHILD, point, str(run_dir), str(root / "images"))
    capsys.readouterr()
    resumed = fit(config(**TRAIN_SETTINGS), training_pairs(str(root / "images")), run_dir, resume=True,
                  show_progress=True)
    said = capsys.readouterr().err
    assert "resuming" in said and "from epoch" in said
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []
    assert [(r.epoch, r.step, r.improved) for r in resumed.history] == \
           [(r.epoch, r.step, r.improved) for r in whole.history]
    for a, b in zip(resumed.history, whole.history):
        assert a.val == pytest.approx(b.val, abs=1e-4)
    for folder in ("last", "best"):
        mine, theirs = read_state_dict(run_dir / folder / CHECKPOINT_WEIGHTS), read_state_dict(
            root / "whole" / folder / CHECKPOINT_WEIGHTS)
        assert all(torch.allclose(mine[k], theirs[k], atol=1e-5) for k in theirs), folder
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2, 3]


# ---- every commit point is covered --------------------------------------------------------------------
def test_every_fault_point_is_in_the_library_and_killed_here():
    source = "".join(p.read_text() for p in (ROOT / "adapters" / "clip").glob("*.py"))
    tried = {p.split("@")[0] for _, p, _ in INDEX_CASES} | {p.split("@")[0] for p in TRAIN_CASES} | {
        "compact.committed", "compact.state-removed", "compact.vectors-replaced",
        "export.files-written", "export.files-renamed"}  # killed in test_engine_cache.py
    for point in FAULT_POINTS:
        assert f'faultpoint("{point}")' in source, point
    assert set(FAULT_POINTS) == tried
