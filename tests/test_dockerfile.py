"""The runner image follows Dataloop's runner-image guidance. Docker cannot run here, so the
Dockerfile is read, and the one shell step that decides what gets installed is run for real.

Guidance (README of github.com/dataloop-ai/dtlpy-runner-images): build on a Dataloop runner
image, no fixed USER, install with `${DL_PYTHON_EXECUTABLE} -m pip`, leave HOME alone. And from
issue 10: never reinstall dtlpy over the agent's own; any model's weights bakeable by build
argument, into a cache any user can read.
"""
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from adapters.clip.models import parse_model_spec

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PIP = "${DL_PYTHON_EXECUTABLE} -m pip"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, comments dropped and continuation lines joined."""
    logical, current = [], ""
    for line in DOCKERFILE.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            logical.append(current)
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


def args_of(kind: str) -> list[str]:
    return [args for instruction, args in instructions() if instruction == kind]


def build_arg_default(name: str) -> str:
    for args in args_of("ARG"):
        key, _, value = args.partition("=")
        if key == name:
            return value.strip('"')
    raise AssertionError(f"no ARG {name}")


def test_builds_on_dataloops_gpu_pytorch_runner_image():
    assert args_of("FROM") == ["${BASE_IMAGE}"]
    # The same image runs the GPU training config, so the GPU variant (CUDA and torch inside).
    assert build_arg_default("BASE_IMAGE") == "hub.dataloop.ai/dtlpy-runner-images/gpu:python3.10_cuda11.8_pytorch2"


def test_no_fixed_user_and_home_left_to_the_base_image():
    assert args_of("USER") == []
    assert not any(re.search(r"(^|\s)HOME=", args) for args in args_of("ENV"))


def test_every_install_runs_through_dl_python_executable_without_user_site():
    runs = args_of("RUN")
    installs = [run for run in runs if "install" in run]
    assert installs, "nothing is installed?"
    for run in runs:
        for command in re.split(r"&&|;|\|\|", run):
            words = command.split()
            if "pip" in " ".join(words) and "install" in words:
                assert command.strip().startswith(PIP + " install"), command
                assert "--user" not in words, command
            assert not (words and words[0] in {"pip", "pip3", "python", "python3", "sudo"}), command


def test_dtlpy_is_never_installed_over_the_agents_own(tmp_path):
    run = next(run for run in args_of("RUN") if "requirements.txt" in run)
    filter_command, install_command = (part.strip() for part in run.split("&&"))
    target = shlex.split(filter_command)[-1]
    assert install_command == f"{PIP} install --no-cache-dir -r {target}"
    # requirements.txt names no dtlpy (tests/test_dtlpy_range.py); the filter stays, should one come back.
    requirements = (ROOT / "requirements.txt").read_text()
    # The filter as the build runs it, on requirements.txt plus the spellings it must get right.
    (tmp_path / "requirements.txt").write_text(requirements + "dtlpy>=1.118.12\n  DTLPY==1.126.5\n"
                                               "dtlpy-metrics>=1.0\n")
    subprocess.run(["bash", "-c", filter_command], cwd=tmp_path, check=True)
    kept = (tmp_path / target).read_text().splitlines()
    assert kept == requirements.splitlines() + ["dtlpy-metrics>=1.0"]
    for run in args_of("RUN"):  # and nothing names dtlpy in an install command
        for command in run.split("&&"):
            if " install " in command:
                assert not re.search(r"(^|\s)['\"]?dtlpy\b(?!-)", command.split(" install ", 1)[1]), command


def test_any_models_weights_bake_in_by_build_argument_into_a_cache_any_user_reads():
    default_models = build_arg_default("PREFETCH_MODELS").split()
    assert default_models == ["ViT-B/32"]  # the default model of dataloop.json
    for name in default_models:
        parse_model_spec(name)  # a name the library knows, not a typo that fails the build late
    env = " ".join(args_of("ENV"))
    cache = re.search(r"HF_HOME=(\S+)", env).group(1)
    assert cache.startswith("/opt/") and not cache.startswith("/tmp")
    bake = next(run for run in args_of("RUN") if "adapters.clip download" in run)
    steps = [step.strip() for step in bake.split("&&")]
    assert steps[0] == "${DL_PYTHON_EXECUTABLE} -m adapters.clip download ${PREFETCH_MODELS}"
    cache_root = "/" + cache.strip("/").split("/")[0] + "/" + cache.strip("/").split("/")[1]
    # after the download, so it covers the weights; the exports are only readable (issue 16)
    assert steps[-2:] == [f"chmod -R a+rwX {Path(cache)}", f"chmod -R a+rX,go-w {cache_root}/engines"]


@pytest.mark.parametrize("name", ["ViT-L/14", "RN50", "ViT-B-32:laion2b_s34b_b79k"])
def test_other_models_are_valid_build_arguments(name):
    parse_model_spec(name)


def test_baked_models_are_exported_for_the_cpu_engines_into_the_same_readable_cache():
    """A pod's first load with engine `auto` reuses the image's ONNX exports instead of exporting."""
    env = " ".join(args_of("ENV"))
    engines = re.search(r"CLIP_ADAPTER_ENGINES=(\S+)", env).group(1)
    cache = re.search(r"HF_HOME=(\S+)", env).group(1)
    assert Path(engines).parent == Path(cache).parent
    bake = next(run for run in args_of("RUN") if "adapters.clip download" in run)
    steps = [step.strip() for step in bake.split("&&")]
    export = next(i for i, step in enumerate(steps) if "--engine auto" in step)
    assert 'for model in ${PREFETCH_MODELS}' in steps[export] and '--model "$model"' in steps[export]
    assert export < len(steps) - 2 and steps[-1] == f"chmod -R a+rX,go-w {engines}"  # readable, not writable
