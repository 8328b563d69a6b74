"""`duplicates` and `sample` on a local store, through the command line.

The store is a real one (SQLite + matrix) filled through the store's own transaction with real
image files and planted vectors whose groups and clusters are known: these commands read vectors,
they never embed, so no model is loaded.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapters.clip.cli import main
from adapters.clip.store import FileStat, ModelBinding, Store
from conftest import pattern_image
from test_curation import clusters, near, unit

ROOT = Path(__file__).resolve().parents[1]
DIM = 64


def put(store: Store, path: Path, vector: np.ndarray, mtime_ns: int, subset=None) -> int:
    with store.transaction() as txn:
        item_id, _ = txn.put(FileStat(str(path), path.stat().st_size, mtime_ns), f"h-{path.name}", vector,
                             subset=subset)
    return item_id


@pytest.fixture
def dup_store(tmp_path):
    """Ten distinct photos; b.png has two near-copies (the copy made earlier is kept), e.png one."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    root = tmp_path / "store"
    base = unit(rng.standard_normal((10, DIM)))
    with Store.open(root, create=ModelBinding("planted", "0" * 32, DIM)) as store:
        for i, name in enumerate("abcdefghij"):
            path = folder / f"{name}.png"
            pattern_image(i).save(path)
            put(store, path, base[i], mtime_ns=1_000 + i)
        copies = [("b-copy.jpg", 1, 0.99, 500), ("b-small.png", 1, 0.97, 2_000), ("e-recoded.jpg", 4, 0.98, 3_000)]
        for name, source, cosine, mtime in copies:
            path = folder / name
            Image.open(folder / f"{'abcdefghij'[source]}.png").convert("RGB").save(path)
            put(store, path, near(base[source], cosine, rng), mtime_ns=mtime)
    return root, folder


def run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "adapters.clip", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_duplicates_json_lists_each_group_kept_first(dup_store, tmp_path):
    root, folder = dup_store
    result = run("duplicates", "--store", str(root), "--json", "--sheet", str(tmp_path / "groups.png"))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document == {"groups": [[str(folder / "b-copy.jpg"), str(folder / "b.png"), str(folder / "b-small.png")],
                                   [str(folder / "e.png"), str(folder / "e-recoded.jpg")]],
                        "missing": [], "threshold": 0.95}
    sheet = Image.open(tmp_path / "groups.png")
    assert sheet.width > 3 * 160 and sheet.height > 2 * 160  # two rows of up to three images


def test_duplicates_threshold_and_text_output(dup_store, capsys):
    root, folder = dup_store
    assert main(["duplicates", "--store", str(root), "--threshold", "0.975"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0] == "group 1 (2 items)" and lines[1].endswith("b-copy.jpg") and "kept" in lines[1]
    assert lines[2].strip().startswith("0.99") and lines[2].endswith("b.png")
    assert lines[3] == "group 2 (2 items)"
    assert "2 groups, 4 items, among 13 items" in out.err


def test_duplicates_missing_lists_files_the_store_could_not_embed(dup_store, capsys):
    root, folder = dup_store
    with Store.open(root) as store, store.transaction() as txn:
        txn.record_failure(FileStat(str(folder / "broken.png"), 4, 1), "not an image")
    assert main(["duplicates", "--store", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["missing"] == [str(folder / "broken.png")]


@pytest.mark.parametrize("threshold", ["0", "1.5", "-0.2"])
def test_a_threshold_outside_0_1_is_one_line_and_exit_1(dup_store, capsys, threshold):
    root, _ = dup_store
    assert main(["duplicates", "--store", str(root), "--threshold", threshold]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(0, 1]" in err[0]


@pytest.fixture
def cluster_store(tmp_path):
    """Clusters of 20, 20, 20 and one of 3 (subset 'rare'), as files with planted vectors."""
    x, labels = clusters([20, 20, 20, 3], seed=2)
    folder = tmp_path / "photos"
    folder.mkdir()
    root = tmp_path / "store"
    with Store.open(root, create=ModelBinding("planted", "0" * 32, DIM)) as store:
        for i, (vector, label) in enumerate(zip(x, labels)):
            path = folder / f"c{label}-{i:02d}.png"
            pattern_image(i).save(path)
            put(store, path, vector, mtime_ns=i, subset="labelled" if label == 0 else None)
    return root, folder


def cluster_of(path: str) -> int:
    return int(Path(path).name[1])


def test_sample_covers_every_cluster_and_is_deterministic(cluster_store, tmp_path):
    root, _ = cluster_store
    first = run("sample", "--store", str(root), "-n", "4", "--json", "--sheet", str(tmp_path / "sample.png"))
    assert first.returncode == 0, first.stderr
    document = json.loads(first.stdout)
    assert sorted(cluster_of(p) for p in document["items"]) == [0, 1, 2, 3]
    assert 0 < document["radius"] < 0.1
    assert Image.open(tmp_path / "sample.png").width > 2 * 160
    again = run("sample", "--store", str(root), "-n", "4", "--json")
    assert json.loads(again.stdout) == document


def test_sample_keeps_away_from_excluded_items(cluster_store, capsys):
    root, _ = cluster_store
    assert main(["sample", "--store", str(root), "-n", "3", "--exclude-subset", "labelled", "--json"]) == 0
    picks = json.loads(capsys.readouterr().out)["items"]
    assert sorted(cluster_of(p) for p in picks) == [1, 2, 3]


def test_sample_larger_than_the_store_is_one_line(cluster_store, capsys):
    root, _ = cluster_store
    assert main(["sample", "--store", str(root), "-n", "64"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: n=64 is larger than the 63 selected items that have a vector"]
