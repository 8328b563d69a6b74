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
    """Measured with the platform suites (docs/platform-tests.md): up to 1.110.3 prepare_data drops
    captions, 1.114.17 to 1.117.6 crash there for an embedding model, and up to 1.117.6 train_model
    refuses a model whose training failed, so a lost pod's training cannot resume."""
    declared = requirement(ROOT / "requirements.txt", "dtlpy").specifier
    assert not any(v in declared for v in ("1.110.3", "1.111.11", "1.114.17", "1.117.6"))
    assert all(v in declared for v in ("1.118.12", "1.121.5", "1.125.6", "1.126.5"))
