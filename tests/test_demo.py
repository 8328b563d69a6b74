"""`python -m adapters.demo`, shortened to a few epochs: real files, the real tiny model,
ClipAdapter.train with a model entity built offline (its server calls replaced, see demo.py)."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from adapters.clip.manifests import load_pairs
from adapters.clip.models import load_model
from adapters.demo import main


def test_demo_builds_data_trains_through_the_adapter_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    loggers = [logging.getLogger(name) for name in ("dtlpy", "ModelAdapter")]
    before = [(logger.level, logger.propagate) for logger in loggers]
    assert main(["--out", str(out), "--epochs", "3"]) == 0
    printed = capsys.readouterr().out
    # The demo quiets dtlpy while it trains, then gives the process its loggers back as they were
    # (once it left ModelAdapter at ERROR, and every later adapter's warnings in the process were lost).
    assert [(logger.level, logger.propagate) for logger in loggers] == before
    summary = json.loads((out / "demo_summary.json").read_text())
    # The data is a Dataloop export of prompt items that the project's reader understands.
    pairs = load_pairs(out / "data", strict=True)
    assert pairs.counts() == {"train": {"pairs": 192, "images": 192}, "validation": {"pairs": 48, "images": 48}}
    assert (out / "data" / "train" / "json").is_dir() and (out / "data" / "prompt_images").is_dir()
    # Trained through ClipAdapter.train, saved as the adapter uploads it, and better than the start.
    assert "via ClipAdapter.train" in printed
    assert load_model(summary["model"], device="cpu").fingerprint != load_model("tiny", device="cpu").fingerprint
    assert summary["after"]["mean_recall"] > summary["before"]["mean_recall"]
    report = json.loads((out / "model" / "training_report.json").read_text())
    assert report["training"]["epochs_run"] == 3
    assert report["model"]["output"] == summary["model"]  # not training/best, which the adapter removed
    assert f"output `{summary['model']}`" in (out / "model" / "training_report.md").read_text()
    for path in [summary["report"], summary["curves"], *summary["queries"]]:
        assert path in printed
    for path in [summary["curves"], *summary["queries"]]:
        with Image.open(path) as image:
            assert image.format == "PNG"


def test_the_demo_does_not_print_dtlpys_debug_log(tmp_path):
    """Importing dtlpy logs ~30 DEBUG lines about its cookie file; the CLI's handler must not print them."""
    import os
    import subprocess
    import sys

    script = ("import logging; from adapters.clip.cli import main; "
              "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s'); "
              "from adapters.demo import DEMO_CONFIG, _offline_adapter, quiet_dtlpy_logs\n"
              "with quiet_dtlpy_logs():  # as train_with_adapter imports dtlpy\n"
              f"    _offline_adapter(DEMO_CONFIG, __import__('pathlib').Path({str(tmp_path)!r}))")
    env = {**os.environ, "DATALOOP_PATH": str(tmp_path / "dl")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert done.returncode == 0, done.stderr
    assert "DEBUG dtlpy" not in done.stderr and "COOKIE" not in done.stderr


def test_demo_is_its_own_entry_point_and_not_a_library_command():
    """`python -m adapters.demo` (the app's); the library's command line has no `demo` (it never imports the app)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    shown = subprocess.run([sys.executable, "-m", "adapters.demo", "--help"], capture_output=True, text=True,
                           cwd=root, env=env, timeout=120)
    assert shown.returncode == 0 and "--out" in shown.stdout and "--epochs" in shown.stdout
    refused = subprocess.run([sys.executable, "-m", "adapters.demo", "--epochs", "0"], capture_output=True,
                             text=True, cwd=root, env=env, timeout=120)
    assert refused.returncode == 2 and "must be >= 1" in refused.stderr and "Traceback" not in refused.stderr
    library = subprocess.run([sys.executable, "-m", "adapters.clip", "--help"], capture_output=True, text=True,
                             cwd=root, env=env, timeout=120)
    assert library.returncode == 0 and "train" in library.stdout and "demo" not in library.stdout
