"""Issue 17 (4, 5): an installable package with a `clip-adapter` command, and a light set-up whose
dependencies agree with the runner image's requirements.txt.

The install is real: pip builds the package from a copy of the sources (setuptools, no network) into
a folder, and the command it wrote runs from a folder that is not the repository.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys


import pytest

from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_lines(path) -> dict[str, str]:
    """{name: 'name>=x'} from a requirements file (comments and -r lines skipped)."""
    lines = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            lines[re.split(r"[<>=!~\[]", line)[0].lower()] = line
    return lines


def test_the_package_claims_the_same_ranges_as_the_requirements_files():
    runner = requirement_lines(ROOT / "requirements.txt")
    dev = requirement_lines(ROOT / "requirements-dev.txt")
    core = PYPROJECT["project"]["dependencies"]
    extras = PYPROJECT["project"]["optional-dependencies"]
    for line in core + extras["openvino"]:
        assert runner[re.split(r"[<>=!~]", line)[0].lower()] == line
    for line in extras["platform"] + extras["dev"]:
        assert dev[re.split(r"[<>=!~]", line)[0].lower()] == line
    # the light set-up leaves out what only the platform, OpenVINO or the tests need
    assert not {"dtlpy", "openvino", "pytest"} & {re.split(r"[<>=!~]", d)[0] for d in core}
    assert PYPROJECT["project"]["scripts"] == {"clip-adapter": "adapters.clip.cli:main"}


def test_pip_install_gives_a_clip_adapter_command_that_runs_from_any_folder(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "adapters", source / "adapters", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "installed"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                                "--no-index", "--target", str(target), str(source)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    assert (target / "adapters" / "clip" / "model_configs" / "tiny.json").is_file()  # package data included
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)  # what site-packages would be after `pip install .`
    command = [str(target / "bin" / "clip-adapter")]
    helped = subprocess.run(command + ["--help"], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: clip-adapter ")
    configured = subprocess.run(command + ["config", "--set", "learning_rate=2e-5"], capture_output=True, text=True,
                                cwd=elsewhere, env=env, timeout=120)
    assert configured.returncode == 0 and '"learning_rate": 2e-05' in configured.stdout
    mistyped = subprocess.run(command + ["search", "x", "-K", "5"], capture_output=True, text=True, cwd=elsewhere,
                              env=env, timeout=120)
    assert mistyped.returncode == 2 and mistyped.stderr.startswith("usage: clip-adapter search ")
