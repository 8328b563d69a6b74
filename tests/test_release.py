"""One version number: adapters.clip.__version__, dataloop.json's version, gitTag and runnerImage
tags agree, and scripts/release.py moves them together, checks before it tags, and in a dry run
prints every step without changing anything. Git runs for real, on throwaway repositories."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import dtlpy as dl
import pytest

import adapters.clip

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("release", ROOT / "scripts" / "release.py")
release = sys.modules["release"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(release)


def test_the_version_is_the_same_everywhere():
    found = release.versions()
    assert set(found.values()) == {adapters.clip.__version__}, found
    manifest = json.loads((ROOT / "dataloop.json").read_text())
    # every runnerImage and panel script source is counted
    assert len(found) == 3 + len(manifest["components"]["computeConfigs"]) + len(release.panel_scripts(manifest))
    assert release.panel_scripts(manifest)  # the dataset browser's search panel (issue 13)
    for _, invoke in release.panel_scripts(manifest):
        match = release.RAW_SOURCE.match(invoke["source"])
        assert match.group(1) == manifest["codebase"]["gitUrl"].replace("github.com", "raw.githubusercontent.com") + "/"
        assert (ROOT / match.group(3).lstrip("/")).is_file()  # the script the released tag serves


def test_every_compute_config_runs_one_image_repository_that_is_not_a_placeholder():
    (repository,) = release.runner_images()
    assert "<" not in repository and not repository.startswith("dataloopai/clip-model-adapter")


@pytest.fixture
def copy_of_the_versioned_files(tmp_path):
    for relative in (release.VERSION_FILE, release.MANIFEST):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / relative, tmp_path / relative)
    return tmp_path


def test_set_version_writes_every_place_and_nothing_else(copy_of_the_versioned_files):
    root = copy_of_the_versioned_files
    before = json.loads((root / "dataloop.json").read_text())
    release.set_version("9.8.7", root)
    assert set(release.versions(root).values()) == {"9.8.7"}
    after = json.loads((root / "dataloop.json").read_text())
    assert release.runner_images(root) == release.runner_images()  # the repository stays, only the tag moves
    for manifest in (before, after):
        manifest["version"] = manifest["codebase"]["gitTag"] = None
        for config in manifest["components"]["computeConfigs"]:
            config["runtime"]["runnerImage"] = config["runtime"]["runnerImage"].rsplit(":", 1)[0]
        for _, invoke in release.panel_scripts(manifest):
            invoke["source"] = release.RAW_SOURCE.sub(r"\1\3", invoke["source"])
    assert after == before
    assert (root / "dataloop.json").read_text().endswith("}\n")
    source = (root / release.VERSION_FILE).read_text()
    assert source == (ROOT / release.VERSION_FILE).read_text().replace(
        f'__version__ = "{adapters.clip.__version__}"', '__version__ = "9.8.7"')
    assert dl.Dpk.from_json(json.loads((root / "dataloop.json").read_text()), client_api=dl.client_api).version == "9.8.7"


@pytest.mark.parametrize("bad", ["2.0", "v2.0.1", "2.0.1-rc1", " 2.0.1", ""])
def test_a_version_that_is_not_major_minor_patch_is_refused(bad, copy_of_the_versioned_files):
    with pytest.raises(release.ReleaseError, match="MAJOR.MINOR.PATCH"):
        release.set_version(bad, copy_of_the_versioned_files)
    assert release.main([bad, "--dry-run"]) == 2


def test_dry_run_prints_every_step_in_order_and_changes_nothing(capsys):
    status_before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    versions_before = release.versions()
    assert release.main(["7.7.7", "--dry-run", "--project", "My Project", "--prefetch-models", "ViT-B/32 RN50"]) == 0
    out = capsys.readouterr().out
    (image,) = release.runner_images()
    expected = ["git status --porcelain", "git ls-remote --tags origin refs/tags/7.7.7",
                f"adapters/clip/__init__.py: {adapters.clip.__version__} -> 7.7.7", "-m pytest",
                "git commit --allow-empty -am 'Release 7.7.7'",
                f"docker build --build-arg 'PREFETCH_MODELS=ViT-B/32 RN50' -t {image}:7.7.7 .",
                f"docker push {image}:7.7.7", "git tag -a 7.7.7", "git push origin HEAD 7.7.7",
                "dlp app publish --project-name 'My Project'", "dry run: nothing was changed"]
    positions = [out.find(text) for text in expected]
    assert -1 not in positions, [text for text, at in zip(expected, positions) if at == -1]
    assert positions == sorted(positions)
    assert release.versions() == versions_before
    assert subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout \
        == status_before


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                   capture_output=True)


def test_release_refuses_a_dirty_tree_and_a_tag_that_exists_here_or_on_origin(tmp_path):
    origin, work = tmp_path / "origin.git", tmp_path / "work"
    _git(tmp_path, "init", "-q", "--bare", str(origin))
    _git(tmp_path, "clone", "-q", str(origin), str(work))
    (work / "README.md").write_text("x\n")
    _git(work, "add", "README.md")
    _git(work, "commit", "-qm", "first")
    _git(work, "push", "-q", "origin", "HEAD")

    release.check_tree_and_tag("1.0.0", work)  # clean, tag nowhere: passes

    (work / "README.md").write_text("changed\n")
    with pytest.raises(release.ReleaseError, match="uncommitted changes"):
        release.check_tree_and_tag("1.0.0", work)
    _git(work, "checkout", "README.md")

    _git(work, "tag", "1.0.0")
    with pytest.raises(release.ReleaseError, match="already exists here"):
        release.check_tree_and_tag("1.0.0", work)
    _git(work, "push", "-q", "origin", "1.0.0")
    _git(work, "tag", "-d", "1.0.0")  # gone here, still on origin: a published tag is never moved
    with pytest.raises(release.ReleaseError, match="already exists on origin"):
        release.check_tree_and_tag("1.0.0", work)
