"""The command line, run as users run it: `python -m adapters.clip ...` in a subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import pattern_image

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "adapters.clip", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


@pytest.fixture
def folder(tmp_path):
    photos = tmp_path / "my photos"
    (photos / "sub").mkdir(parents=True)
    pattern_image(1).save(photos / "a.png")
    pattern_image(2).save(photos / "sub" / "ümlaut b.jpg")
    (photos / "broken.png").write_bytes(b"nope")
    (photos / "readme.txt").write_text("not collected: not an image suffix")
    return photos


def test_embed_folder_and_texts_writes_npy_and_jsonl(folder, tmp_path):
    out = tmp_path / "out" / "emb"
    result = run("embed", str(folder), "--text", "a red square", "--text", "", "--model", "tiny",
                 "--device", "cpu", "--batch-size", "2", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == {**summary, "embedded": 3, "failed": 2, "dim": 64}
    vectors = np.load(out.with_suffix(".npy"))
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert vectors.shape == (5, 64) and len(rows) == 5
    assert [r["kind"] for r in rows] == ["image"] * 3 + ["text"] * 2
    assert rows[0]["id"].endswith("a.png") and rows[2]["id"].endswith("ümlaut b.jpg")
    assert "not an image" in rows[1]["error"] and rows[4]["error"] == "empty text"
    ok = [i for i, r in enumerate(rows) if not r["error"]]
    np.testing.assert_allclose(np.linalg.norm(vectors[ok], axis=1), 1, atol=1e-5)
    assert np.isnan(vectors[[1, 4]]).all()
    assert "skipped" in result.stderr and "broken.png" in result.stderr


def test_models_lists_openai_names_with_dims():
    result = run("models", "--json")
    assert result.returncode == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["ViT-L/14"]["dim"] == 768 and rows["ViT-L/14"]["arch"] == "ViT-L-14-quickgelu"
    assert rows["ViT-L/14@336px"]["image_size"] == 336


def test_config_validates_and_reports_one_line(tmp_path):
    good = run("config", "--set", "learning_rate=2e-5", "--set", "betas=[0.9,0.95]")
    assert good.returncode == 0 and json.loads(good.stdout)["betas"] == [0.9, 0.95]
    bad = run("config", "--set", "learning_rat=2e-5")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "did you mean 'learning_rate'" in bad.stderr
    legacy = tmp_path / "model.json"
    legacy.write_text(json.dumps({"configuration": {"episilon": 1e-7, "early_stopping": False}}))
    shown = run("config", str(legacy))
    assert shown.returncode == 0 and json.loads(shown.stdout)["epsilon"] == 1e-7
    assert "deprecated" in shown.stderr


@pytest.mark.parametrize("args,code", [
    (["embed", "--model", "tiny"], 2),          # nothing to embed
    (["embed", "x.png", "--batch-size", "0"], 2),
    (["no-such-command"], 2),
    (["embed", "x.png", "--model", "nonsense-arch"], 1),
])
def test_usage_and_model_errors_exit_non_zero_with_one_line(args, code):
    result = run(*args)
    assert result.returncode == code
    assert result.stderr.strip() and "Traceback" not in result.stderr


def test_nothing_to_evaluate_and_an_unwritable_output_are_one_line_errors(folder, tmp_path):
    """Typed library errors and OSErrors about a user's path: exit 1, one line, no traceback."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not an image")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "broken/x.png", "caption": "a cat", "subset": "validation"}) + "\n")
    blocker = tmp_path / "a file"
    blocker.write_text("in the way of the output folder")
    cases = [
        (run("eval", "--model", "tiny", "--device", "cpu", "--data", str(manifest)),
         "error: nothing to evaluate: all 1 images failed to load"),
        (run("embed", str(folder), "--model", "tiny", "--device", "cpu", "--out", str(blocker / "emb")),
         f"error: {blocker}: File exists"),
    ]
    for result, message in cases:
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert [line for line in result.stderr.splitlines() if line.startswith("error")] == [message]
        assert result.stderr.strip().splitlines()[-1] == message
