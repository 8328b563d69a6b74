"""Issue 17 (7): utils/prepare_dataset.py as a user runs it, against the fake Dataloop platform.

The script runs in a child process with the test's DATALOOP_PATH, where the `platform` fixture logged
dtlpy in to the fake (tests/fake_dataloop: only the server is fake; dtlpy runs unmodified).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

from conftest import ROOT
from test_platform_contract import png_bytes

SCRIPT = str(ROOT / "utils" / "prepare_dataset.py")


def prepare(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, env={**os.environ, **env})


def test_without_a_login_it_is_one_line_at_once():
    result = prepare("--project", "P", "--dataset", "D", DATALOOP_PATH=tempfile.mkdtemp(prefix="no-login-"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == ('error: not logged in to Dataloop (or the login expired): run python -c "import '
                             'dtlpy as dl; dl.login()" once, then rerun\n')


def test_help_gives_defaults_and_what_it_needs():
    result = prepare("--help")
    assert result.returncode == 0
    text = result.stdout
    assert "(default: a photo of a {})" in text and "(default: 0.2)" in text and "(default: 0)" in text
    assert "dl.login()" in text and "train and validation" in text.replace("\n  ", " ")


def test_it_assigns_subsets_itself_and_reports_each(platform):
    project = platform.add_project("ux-prepare")
    images = platform.add_dataset(project["id"], "holiday photos")
    for i in range(10):
        folder = ("beach", "mountains")[i % 2]
        platform.add_item(images["id"], f"/{folder}/{i:02d}.png", png_bytes(i), "image/png",
                          description="a kite over the sea" if i == 0 else None)
    platform.add_item(images["id"], "/notes/readme.txt", b"not an image", "text/plain")

    result = prepare("--project", "ux-prepare", "--dataset", "holiday photos", "--val", "0.2")
    assert result.returncode == 0, result.stderr
    assert "DEBUG" not in result.stderr and "Traceback" not in result.stderr
    last = result.stdout.strip().splitlines()[-1]  # above it: dtlpy's own progress bars (its setting, left alone)
    summary = re.fullmatch(r"made 10 prompt items in dataset 'holiday photos prompt items' \((\w+)\): train 8, "
                           r"validation 2; captions: 1 from descriptions, 9 from folder names; 1 skipped "
                           r"\(1 not an image item\)", last)
    assert summary, result.stdout
    prompts = platform.dataset_items(summary.group(1))
    subsets = {p["filename"]: [s for s, on in p["metadata"]["system"]["tags"].items() if on] for p in prompts}
    assert sorted(s for (s,) in subsets.values()) == ["train"] * 8 + ["validation"] * 2
    for folder in ("beach", "mountains"):  # stratified: one of each folder's five in validation
        assert [s for name, (s,) in subsets.items() if name.startswith(f"/{folder}/")].count("validation") == 1

    unsplit = prepare("--project", "ux-prepare", "--dataset", "holiday photos", "--val", "0", "--name", "unsplit")
    assert unsplit.returncode == 0, unsplit.stderr
    assert ": no subset 10;" in unsplit.stdout and "warning: training needs prompt items in both the train and " \
                                                 "validation subsets; rerun with --val 0.2" in unsplit.stdout
