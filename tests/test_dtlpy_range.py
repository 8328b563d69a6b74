"""The dtlpy range the app claims is the range CI tests, and the platform's own dtlpy is left alone.

requirements-dev.txt claims it; its minimum is the version .ci/run installs for the second run of
the platform suites (the first runs the newest), and the adapter's DTLPY_MINIMUM. requirements.txt,
what the agent installs at service start, names no dtlpy (docs/platform-tests.md, "What the agent
installs"). The adapter checks the dtlpy it is imported on: run for real, in a fresh interpreter.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from adapters import clip_adapter

ROOT = Path(__file__).resolve().parents[1]


def requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def requirement(path: Path, name: str) -> Requirement:
    found = [r for r in requirements(path) if r.name == name]
    assert found, f"{path.name} has no {name} line"
    return found[0]


def test_the_runtime_requirements_never_name_dtlpy():
    """The agent installs the codebase's requirements at start: a dtlpy line there could up- or
    downgrade the agent's own dtlpy (and break its pins)."""
    runtime = requirements(ROOT / "requirements.txt")
    assert len(runtime) > 10  # parsed: the file is there and read
    assert [r.name for r in runtime if r.name.lower() == "dtlpy"] == []
    assert not any(line.strip().startswith("-") for line in (ROOT / "requirements.txt").read_text().splitlines())


def test_ci_tests_the_minimum_that_requirements_dev_declares_and_the_adapter_checks():
    declared = requirement(ROOT / "requirements-dev.txt", "dtlpy").specifier
    (pin,) = requirement(ROOT / ".ci" / "dtlpy-min.txt", "dtlpy").specifier
    minimum = Version(pin.version)
    assert pin.operator == "==" and minimum in declared
    lower_bounds = [Version(s.version) for s in declared if s.operator == ">="]
    assert lower_bounds == [minimum]
    assert Version(clip_adapter.DTLPY_MINIMUM) == minimum


def test_the_versions_known_to_fail_are_excluded():
    """Measured with the platform suites (docs/platform-tests.md): up to 1.110.3 prepare_data drops
    captions, 1.114.17 to 1.117.6 crash there for an embedding model, and up to 1.117.6 train_model
    refuses a model whose training failed, so a lost pod's training cannot resume."""
    declared = requirement(ROOT / "requirements-dev.txt", "dtlpy").specifier
    assert not any(v in declared for v in ("1.110.3", "1.111.11", "1.114.17", "1.117.6"))
    assert all(v in declared for v in ("1.118.12", "1.121.5", "1.125.6", "1.126.5"))


@pytest.mark.parametrize("version, says", [
    ("1.126.5", None), ("1.118.12", None), ("2.0.0", None),
    ("1.117.6", "training does not"), ("1.111.11", "training does not"), ("1.93.11", "training does not"),
    ("1.92.0", "cannot load it"),
])
def test_the_adapter_says_in_one_line_what_it_needs(version, says):
    problem = clip_adapter.dtlpy_problem(version)
    if says is None:
        assert problem is None
    else:
        assert says in problem and f"dtlpy>={clip_adapter.DTLPY_MINIMUM}" in problem and version in problem
        assert "\n" not in problem


def _import_adapter_on(version: str) -> subprocess.CompletedProcess:
    """Import the adapter in a fresh interpreter whose dtlpy reports `version` (the real dtlpy,
    its version string replaced before the adapter reads it)."""
    code = ("import dtlpy; dtlpy.__version__ = %r\n"
            "import adapters.clip_adapter\nprint('imported')" % version)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                              os.environ.get("PYTHONPATH"), str(ROOT)]))})


def test_importing_on_an_old_dtlpy_warns_once_and_still_loads():
    done = _import_adapter_on("1.111.11")
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "CLIP adapter: needs dtlpy" in line]
    assert len(lines) == 1 and "1.111.11" in lines[0]


def test_importing_on_a_dtlpy_too_old_to_load_fails_with_that_line():
    done = _import_adapter_on("1.90.0")
    assert done.returncode != 0 and "imported" not in done.stdout
    assert "ImportError: CLIP adapter: needs dtlpy>=" in done.stderr
