"""Which vectors of a platform feature set are the earlier adapter's (adapters/clip/feature_sets.py), and
the flat layout a training run takes in a model folder (adapters/clip/runs.py). No platform, no dtlpy."""
from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import pytest

from adapters.clip.feature_sets import batches, check_vectors, is_current
from adapters.clip.runs import (RESUME_ARCHIVE, archive_is_resumable, flatten_run, pack_resume_state,
                                unpack_resume_state)


def test_a_vector_is_current_only_at_unit_length():
    unit = (np.ones(512) / math.sqrt(512)).astype(np.float32).tolist()  # as sent in JSON: float32 digits
    assert is_current(unit)
    assert not is_current([x * 9.7 for x in unit])         # the earlier adapter's raw features
    assert not is_current([x * 1.01 for x in unit])
    assert not is_current([]) and not is_current(None) and not is_current([math.nan] * 4)


def test_check_names_each_old_entity_once_in_order():
    unit = [1.0, 0.0]
    check = check_vectors([("a", unit), ("b", [3.0, 4.0]), ("c", unit), ("b", [3.0, 4.0]), ("d", None)])
    assert check.looked_at == 5 and check.mixed and check.old_entities == ["b", "d"]
    assert not check_vectors([("a", unit)]).mixed


def test_batches_split_and_refuse_an_empty_size():
    assert batches(["a", "b", "c"], 2) == [["a", "b"], ["c"]]
    with pytest.raises(ValueError):
        batches(["a"], 0)


def make_run(folder):
    for name, text in {"last/state.json": '{"epoch": 2}', "last/weights.bin": "w", "best/model.bin": "b",
                       "metrics.jsonl": "{}\n", "report.json": "{}", "curves.png": "png",
                       "report.md": "![curves](curves.png)"}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_a_run_is_laid_out_flat_with_its_resume_state_in_one_archive(tmp_path):
    model = tmp_path / "model"
    run = make_run(model / "training")
    written = flatten_run(run, model, resumable=True)
    assert not run.exists() and sorted(p.name for p in model.iterdir()) == sorted(written)
    assert (model / "training_report.md").read_text() == "![curves](training_curves.png)"
    assert archive_is_resumable(model / RESUME_ARCHIVE)
    unpacked = unpack_resume_state(model / RESUME_ARCHIVE, tmp_path / "back")
    assert json.loads((unpacked / "last" / "state.json").read_text()) == {"epoch": 2}
    assert (unpacked / "best" / "model.bin").read_text() == "b" and (unpacked / "metrics.jsonl").is_file()


def test_a_finished_run_leaves_only_a_done_marker(tmp_path):
    archive = tmp_path / RESUME_ARCHIVE
    pack_resume_state(make_run(tmp_path / "run"), archive, resumable=False)
    with zipfile.ZipFile(archive) as bundle:
        assert bundle.namelist() == ["resume.json"]
    assert not archive_is_resumable(archive)
    archive.write_bytes(b"not a zip")
    assert not archive_is_resumable(archive) and not archive_is_resumable(tmp_path / "missing.zip")
