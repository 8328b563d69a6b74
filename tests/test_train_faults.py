"""Issue 8, training: divergence, settings that cannot work, damaged or half-swapped checkpoints.

Real training of the tiny open_clip model on real image files; real checkpoint files damaged on
disk the way a crash, a full disk or a hostile file would leave them.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from adapters.clip.cli import main
from adapters.clip.manifests import write_manifest
from adapters.clip.pairs import CaptionPair
from adapters.clip.errors import TrainingDivergedError
from adapters.clip.models import CHECKPOINT_WEIGHTS, read_state_dict
from adapters.clip.train import fit
from conftest import pattern_image
from test_train import config, weights

SETTINGS = dict(num_epochs=2, warmup_ratio=0.3, early_stop=False)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list[CaptionPair]:
    root = tmp_path_factory.mktemp("pairs")
    out = []
    for i in range(16):
        path = root / f"img{i:02d}.png"
        pattern_image(100 + i).save(path)
        out.append(CaptionPair(image=path, caption=f"picture number {i}", subset="train" if i < 12 else "validation"))
    return out


@pytest.fixture(scope="module")
def whole(pairs, tmp_path_factory):
    """An uninterrupted run: what every interrupted one must end up equal to."""
    run_dir = tmp_path_factory.mktemp("whole")
    fit(config(**SETTINGS), pairs, run_dir, show_progress=False)
    return run_dir


def train_cli(pairs, out: Path, *extra: str) -> list[str]:
    manifest = out.parent / "pairs.jsonl"
    write_manifest(pairs, manifest)
    return ["train", "--data", str(manifest), "--out", str(out), "--model", "tiny", "--set", "device=cpu",
            "--set", "batch_size=8", "--set", "learning_rate=1e-3", "--set", "num_epochs=2",
            "--set", "warmup_ratio=0.3", "--set", "early_stop=false", *extra]


def one_line_error(capsys) -> str:
    """The failure is one line (progress and data summaries may come before it), never a traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(("error:", "python -m adapters.clip"))]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ---- 6. divergence and settings that cannot work -------------------------------------------------
@pytest.mark.parametrize("key", ["epsilon", "weight_decay", "learning_rate", "min_delta", "grad_clip_norm"])
@pytest.mark.parametrize("value", ["Infinity", "NaN", "-Infinity"])
def test_infinite_or_nan_settings_are_rejected_by_validation(key, value, capsys):
    assert main(["config", "--set", f"{key}={value}"]) == 1
    assert key in one_line_error(capsys)


def test_a_diverging_run_stops_with_the_setting_named_and_keeps_the_best(pairs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match="weight_decay=1e\\+30.*best model so far \\(epoch 0\\)"):
        fit(config(weight_decay=1e30, num_epochs=3), pairs, run_dir, show_progress=False)
    best = read_state_dict(run_dir / "best" / CHECKPOINT_WEIGHTS)
    assert all(torch.isfinite(t).all() for t in best.values())
    assert json.loads((run_dir / "last" / "state.json").read_text())["epoch"] == 0
    assert main(train_cli(pairs, tmp_path / "cli", "--set", "weight_decay=1e30")) == 1
    assert "weight_decay" in one_line_error(capsys)


# ---- 6. damaged resume state ---------------------------------------------------------------------
class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/clip-adapter-pwned",))


@pytest.mark.parametrize("damage", ["malicious", "garbage", "empty", "missing_keys", "not_json"])
def test_a_damaged_checkpoint_is_one_line_on_resume(pairs, tmp_path, capsys, damage):
    out = tmp_path / "run"
    args = train_cli(pairs, out, "--set", "num_epochs=1")
    assert main(args) == 0
    last = out / "last"
    if damage == "malicious":
        (last / "trainer.pt").write_bytes(pickle.dumps(Evil()))
    elif damage == "garbage":
        (last / "trainer.pt").write_bytes(os.urandom(4096))
    elif damage == "empty":
        (last / "trainer.pt").write_bytes(b"")
    elif damage == "missing_keys":
        state = json.loads((last / "state.json").read_text())
        del state["early_stopping"], state["history"]
        (last / "state.json").write_text(json.dumps(state))
    else:
        (last / "state.json").write_text("{not json")
    capsys.readouterr()
    assert main(args + ["--resume"]) == 1
    err = one_line_error(capsys)
    assert "cannot resume" in err and "--out" in err
    assert not Path("/tmp/clip-adapter-pwned").exists()


# ---- 8. kills inside the directory swap ------------------------------------------------------------
def killed_after_epoch_one(pairs, run_dir: Path) -> None:
    class Killed(Exception):
        pass

    def stop(record, num_epochs):
        if record.epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        fit(config(**SETTINGS), pairs, run_dir, on_epoch_end=stop, show_progress=False)


@pytest.mark.parametrize("window", ["between_renames", "new_ready", "old_not_deleted", "half_built_tmp"])
def test_resume_after_a_kill_inside_the_swap_continues_says_so_and_cleans_up(pairs, whole, tmp_path, capsys,
                                                                           window):
    run_dir = tmp_path / "run"
    killed_after_epoch_one(pairs, run_dir)
    last = run_dir / "last"
    if window == "between_renames":      # old renamed aside; the new one (epoch 2) never came
        os.replace(last, run_dir / ".last.old-4242")
        (run_dir / ".last.tmp-abcd").mkdir()
    elif window == "new_ready":           # the complete new one ready beside, the old one aside
        shutil.copytree(last, run_dir / ".last.new-4242")
        os.replace(last, run_dir / ".last.old-4242")
    elif window == "old_not_deleted":     # the new one in; the backup not yet removed
        shutil.copytree(last, run_dir / ".last.old-4242")
    else:                                 # killed while building the next one
        shutil.copytree(last, run_dir / ".last.tmp-abcd")
        (run_dir / ".last.tmp-abcd" / "state.json").unlink()
    assert main(train_cli(pairs, run_dir)) == 2  # without --resume it is still a run, not a fresh folder
    capsys.readouterr()
    resumed = fit(config(**SETTINGS), pairs, run_dir, resume=True, show_progress=True)
    err = capsys.readouterr().err
    assert f"resuming {run_dir} from epoch 1" in err
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".last")) == []
    for name, tensor in weights(whole / "last").items():
        assert torch.equal(tensor, weights(last)[name]), name
    assert resumed.history[-1].epoch == 2


def test_a_resume_that_finds_no_checkpoint_says_it_starts_from_scratch(pairs, tmp_path, capsys):
    fit(config(num_epochs=1), pairs, tmp_path / "new", resume=True, show_progress=True)
    assert "no checkpoint" in capsys.readouterr().err
