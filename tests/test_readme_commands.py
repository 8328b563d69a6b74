"""Issue 17: every local command the README shows runs as written, in the README's order, with `tiny`
where pretrained weights would be needed (nothing can be downloaded here).

The commands are read out of README.md (the sections on the local main job, the other commands and
local fine-tuning), so a README edit that breaks one fails here. They run through the command line's
`main`, in a folder laid out as the README assumes (~/Pictures, photos/ with class folders, query.jpg,
a Dataloop export); each must exit 0.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from adapters.clip.cli import main
from conftest import ROOT, pattern_image
from test_data import dtlpy_export
from test_photos import camera_jpeg

SECTIONS = ("## The local main job", "## Fine-tuning and evaluation, locally")
PREFIX = ["python", "-m", "adapters.clip"]


def readme_commands() -> list[list[str]]:
    """The `python -m adapters.clip ...` lines of the README's bash blocks in SECTIONS (until the next ##)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for heading in SECTIONS:
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        for block in re.findall(r"```bash\n(.*?)```", section, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words[:3] == PREFIX:
                    commands.append(words[3:])
    return commands


def offline(argv: list[str]) -> list[str]:
    """Pretrained names -> tiny (the only model without a download), as the README says to try offline;
    commands that would load the default model (ViT-B/32) get `--model tiny`."""
    argv = ["tiny" if word in ("ViT-B/32", "ViT-L/14") else word for word in argv]
    if argv[0] in ("embed", "classify") and "--model" not in argv:
        argv += ["--model", "tiny"]
    return argv


@pytest.fixture
def readers_folder(tmp_path, monkeypatch):
    home = tmp_path / "home"
    for i, (taken, make) in enumerate([("2019:05:01 10:00:00", "Canon"), ("2021:06:15 09:00:00", "Canon"),
                                       ("2022:02:02 12:00:00", "NIKON")]):
        camera_jpeg(home / "Pictures" / f"IMG_{i}.jpg", taken=taken, make=make, model=f"{make} X{i}", seed=i)
    work = tmp_path / "work"
    for i in range(12):
        label = ("cat", "dog", "car")[i % 3]
        (work / "photos" / label).mkdir(parents=True, exist_ok=True)
        pattern_image(100 + i).save(work / "photos" / label / f"{i}.png")
    for name in ("query.jpg", "img1.jpg", "img2.jpg"):
        pattern_image(len(name)).save(work / name)
    dtlpy_export(work / "path" / "to" / "dataloop" / "export")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return work


def test_the_readmes_local_commands_run_as_written(readers_folder, capsys):
    commands = [offline(argv) for argv in readme_commands()]
    names = [argv[0] for argv in commands]
    assert {"index", "search", "check", "models", "embed", "classify", "config", "download", "prepare", "convert",
            "train", "eval"} <= set(names), names
    # the README shows re-indexing with the fine-tuned model before the fine-tuning section: run it after
    reindex = [argv for argv in commands if "--reindex" in argv]
    ordered = [argv for argv in commands if "--reindex" not in argv] + reindex
    # the two manifests written to one path: convert's replaces prepare's, and train reads it; keep
    # prepare's for training (the export has two images) by running convert to its own file
    ordered = [[*argv[:-1], "data/export.jsonl"] if argv[0] == "convert" else argv for argv in ordered]
    for argv in ordered:
        code = main(argv)
        captured = capsys.readouterr()
        assert code == 0, (argv, captured.err[-2000:])
        if argv[0] == "search" and "--json" in argv:
            hits = json.loads(captured.out)
            assert hits and all(h["metadata"]["year"] >= 2020 for h in hits)
    assert Path("photo-store").is_dir() and Path("runs/mine/best").is_dir() and Path("hits.png").is_file()
    assert Path("emb.npy").is_file() and Path("data/manifest.jsonl").is_file()
