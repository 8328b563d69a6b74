"""The dtlpy range requirements.txt claims is the range CI tests: its minimum is the version
.ci/run installs for the second run of the platform contract suite, and the newest is allowed."""
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def requirement(path: Path, name: str) -> Requirement:
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and Requirement(line).name == name:
            return Requirement(line)
    raise AssertionError(f"{path.name} has no {name} line")


def test_ci_tests_the_minimum_that_requirements_declare():
    declared = requirement(ROOT / "requirements.txt", "dtlpy").specifier
    (pin,) = requirement(ROOT / ".ci" / "dtlpy-min.txt", "dtlpy").specifier
    minimum = Version(pin.version)
    assert pin.operator == "==" and minimum in declared
    lower_bounds = [Version(s.version) for s in declared if s.operator == ">="]
    assert lower_bounds == [minimum]


def test_the_versions_known_to_fail_are_excluded():
    """1.110.3 drops captions in prepare_data; 1.114.17 to 1.117.6 crash there for an embedding model
    (the contract suite's train_model test, docs/platform-tests.md)."""
    declared = requirement(ROOT / "requirements.txt", "dtlpy").specifier
    assert not any(v in declared for v in ("1.107.8", "1.110.3", "1.114.17", "1.115.44", "1.116.6", "1.117.6"))
    assert all(v in declared for v in ("1.111.11", "1.118.12", "1.126.5"))
