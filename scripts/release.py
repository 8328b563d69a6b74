"""Release the app: one version number set everywhere, then test, build, push, tag and publish.

    python scripts/release.py 2.0.1 --dry-run                # print every step; change nothing
    python scripts/release.py 2.0.1 --project "My Project"   # the release itself

The version lives in `adapters/clip/__init__.py` (`__version__`). dataloop.json repeats it as the
app `version`, the codebase `gitTag`, the tag of every compute config's `runnerImage` and the tag in
each panel script's `source` (a raw GitHub URL of the tagged file: the browser loads the script of the
released version); `versions()` reads all of them and tests/test_release.py checks that they agree.

Steps, in order (each printed before it runs; `--dry-run` prints them all and runs none):
 1. the working tree is clean and the tag is new, here and on `origin`;
 2. the version is written everywhere (atomic writes);
 3. the test suite passes;
 4. the version change is committed;
 5. `docker build` the runner image, `docker push` it (needs `docker login` to the image's registry);
 6. `git tag` the version, push the commit and the tag (the platform fetches the code by gitTag);
 7. `dlp app publish` from dtlpy (needs `dlp login`): the manifest as it now stands.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.clip.files import write_text_atomic  # noqa: E402

VERSION_FILE = Path("adapters/clip/__init__.py")
MANIFEST = Path("dataloop.json")
VERSION_LINE = re.compile(r'^__version__ = "([^"]*)"$', re.M)
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")


class ReleaseError(RuntimeError):
    """A check failed; the message says what to do."""


# ---- the version, in every place ---------------------------------------------------------
def versions(root: Path = ROOT) -> dict[str, str]:
    """Where the version is written -> what is written there."""
    found = {str(VERSION_FILE): VERSION_LINE.search((root / VERSION_FILE).read_text()).group(1)}
    manifest = json.loads((root / MANIFEST).read_text())
    found["dataloop.json version"] = manifest["version"]
    found["dataloop.json codebase.gitTag"] = manifest["codebase"]["gitTag"]
    for config in manifest["components"]["computeConfigs"]:
        image = config["runtime"]["runnerImage"]
        found[f"dataloop.json runnerImage of {config['name']}"] = image.rsplit(":", 1)[1] if ":" in image else ""
    for name, invoke in panel_scripts(manifest):
        found[f"dataloop.json script source of panel {name}"] = RAW_SOURCE.match(invoke["source"]).group(2)
    return found


# https://raw.githubusercontent.com/<owner>/<repository>/<tag>/<path>: a panel script at a release's tag.
RAW_SOURCE = re.compile(r"^(https://raw\.githubusercontent\.com/[^/]+/[^/]+/)([^/]+)(/.+)$")


def panel_scripts(manifest: dict) -> list[tuple[str, dict]]:
    """(panel name, its slot's `invoke`) of every panel that runs a script."""
    return [(panel["name"], slot["configuration"]["invoke"]) for panel in manifest["components"].get("panels", [])
            for slot in panel.get("supportedSlots", []) if slot["configuration"]["invoke"].get("type") == "script"]


def runner_images(root: Path = ROOT) -> set[str]:
    """The image repositories (without tag) dataloop.json runs."""
    manifest = json.loads((root / MANIFEST).read_text())
    return {c["runtime"]["runnerImage"].rsplit(":", 1)[0] for c in manifest["components"]["computeConfigs"]}


def set_version(version: str, root: Path = ROOT) -> None:
    """Write `version` in every place `versions()` reads."""
    check_version_format(version)
    source = (root / VERSION_FILE).read_text()
    write_text_atomic(root / VERSION_FILE, VERSION_LINE.sub(f'__version__ = "{version}"', source, count=1))
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["version"] = version
    manifest["codebase"]["gitTag"] = version
    for config in manifest["components"]["computeConfigs"]:
        repository = config["runtime"]["runnerImage"].rsplit(":", 1)[0]
        config["runtime"]["runnerImage"] = f"{repository}:{version}"
    for _, invoke in panel_scripts(manifest):
        invoke["source"] = RAW_SOURCE.sub(lambda m: f"{m.group(1)}{version}{m.group(3)}", invoke["source"])
    write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def check_version_format(version: str) -> None:
    if not SEMVER.match(version):
        raise ReleaseError(f"version {version!r} is not MAJOR.MINOR.PATCH (e.g. 2.0.1)")


# ---- steps ---------------------------------------------------------------------------------
Action = Union[list[str], Callable[[], None]]


@dataclass
class Step:
    title: str
    action: Action
    shows: list[str] = field(default_factory=list)  # what a dry run prints for a Python action

    def describe(self) -> list[str]:
        if isinstance(self.action, list):
            return [" ".join(_quote(word) for word in self.action)]
        return self.shows


def _quote(word: str) -> str:
    return word if re.fullmatch(r"[\w@%+=:,./${}-]+", word) else "'" + word.replace("'", "'\\''") + "'"


def git(*args: str, root: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def check_tree_and_tag(version: str, root: Path = ROOT) -> None:
    """Nothing uncommitted goes into a release; a tag is never moved (the platform fetches by tag)."""
    dirty = git("status", "--porcelain", root=root).strip()
    if dirty:
        raise ReleaseError("the working tree has uncommitted changes; commit or stash them first:\n" + dirty)
    if git("tag", "--list", version, root=root).strip():
        raise ReleaseError(f"tag {version} already exists here; choose a new version")
    remote = subprocess.run(["git", "ls-remote", "--tags", "origin", f"refs/tags/{version}"], cwd=root,
                            capture_output=True, text=True)
    if remote.returncode != 0:
        raise ReleaseError(f"cannot read the tags of 'origin': {remote.stderr.strip()}")
    if remote.stdout.strip():
        raise ReleaseError(f"tag {version} already exists on origin; choose a new version")


def plan(version: str, *, project: Optional[str], prefetch_models: str, root: Path = ROOT) -> list[Step]:
    images = sorted(runner_images(root))
    if len(images) != 1:
        raise ReleaseError(f"dataloop.json runs {len(images)} image repositories ({images}); this script builds one")
    image = f"{images[0]}:{version}"
    publish = ["dlp", "app", "publish"] + (["--project-name", project] if project else [])
    return [
        Step("working tree clean, tag new (here and on origin)", lambda: check_tree_and_tag(version, root),
             ["git status --porcelain  # must be empty", f"git tag --list {version}  # must be empty",
              f"git ls-remote --tags origin refs/tags/{version}  # must be empty"]),
        Step(f"set version {version} everywhere", lambda: set_version(version, root),
             [f"{place}: {old} -> {version}" for place, old in versions(root).items()]),
        Step("test suite", [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]),
        Step("commit the version", ["git", "commit", "--allow-empty", "-am", f"Release {version}"]),
        Step("build the runner image",
             ["docker", "build", "--build-arg", f"PREFETCH_MODELS={prefetch_models}", "-t", image, "."]),
        Step("push the runner image", ["docker", "push", image]),
        Step("tag the release", ["git", "tag", "-a", version, "-m", f"Release {version}"]),
        Step("push the commit and the tag", ["git", "push", "origin", "HEAD", version]),
        Step("publish the app (dtlpy)", publish),
    ]


def run(steps: list[Step], *, dry_run: bool, root: Path = ROOT) -> None:
    for number, step in enumerate(steps, 1):
        print(f"[{number}/{len(steps)}] {step.title}")
        for line in step.describe():
            print(f"    {line}")
        if dry_run:
            continue
        if isinstance(step.action, list):
            subprocess.run(step.action, cwd=root, check=True)
        else:
            step.action()
    if dry_run:
        print("dry run: nothing was changed")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version", help="MAJOR.MINOR.PATCH, e.g. 2.0.1")
    parser.add_argument("--dry-run", action="store_true", help="print every step and run none")
    parser.add_argument("--project", help="Dataloop project to publish from (dlp app publish --project-name)")
    parser.add_argument("--prefetch-models", default="ViT-B/32",
                        help="models whose weights the image bakes in (Dockerfile PREFETCH_MODELS)")
    args = parser.parse_args(argv)
    try:
        check_version_format(args.version)
        run(plan(args.version, project=args.project, prefetch_models=args.prefetch_models), dry_run=args.dry_run)
    except ReleaseError as exc:
        print(f"release: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"release: step failed: {' '.join(map(str, exc.cmd))} (exit {exc.returncode}); edits made so far "
              "stay in the working tree (git status; git checkout -- . undoes an uncommitted version change)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
