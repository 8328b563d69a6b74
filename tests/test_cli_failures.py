"""Issue 8, problem 6: every failure of the command line is one line, never a traceback.

Driven as users drive it: `python -m adapters.clip ...` in a child process. A full disk is
simulated honestly without root: the child lowers its own RLIMIT_FSIZE (and ignores SIGXFSZ), so
the kernel refuses writes past that size with EFBIG, which SQLite reports as a disk I/O error.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, pattern_image


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "adapters.clip", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def assert_one_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith(("error:", "python -m adapters.clip"))]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(24):
        pattern_image(i).save(folder / f"img {i:02d}.png")
    return folder


def test_a_disk_that_fills_mid_index_is_one_line_and_keeps_what_was_committed(photos, tmp_path):
    store = tmp_path / "store"
    child = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from adapters.clip.cli import main
        import adapters.clip.embed, adapters.clip.indexing, adapters.clip.models  # imported before the limit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # EFBIG instead of a kill, as a full disk gives ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))
        sys.exit(main(["index", {str(photos)!r}, "--store", {str(store)!r}, "--model", "tiny", "--device", "cpu",
                       "--batch-size", "4"]))
    """)
    full = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert full.returncode == 1
    line = assert_one_line(full.stderr)
    assert "disk" in line and "kept" in line
    check = run("check", "--store", str(store), "--json")
    assert check.returncode == 0 and json.loads(check.stdout)["ok"]
    kept = json.loads(check.stdout)["items"]
    assert 0 < kept < 24
    finished = run("index", str(photos), "--store", str(store), "--json")
    assert finished.returncode == 0
    summary = json.loads(finished.stdout)
    assert (summary["unchanged"], summary["added"], summary["items"]) == (kept, 24 - kept, 24)


def test_search_json_into_a_closed_pipe_is_silent(photos, tmp_path):
    store = tmp_path / "store"
    assert run("index", str(photos), "--store", str(store), "--model", "tiny", "--device", "cpu").returncode == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "adapters.clip", "search", "a photo", "--store", str(store),
                             "-k", "24", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # `| head` that has read what it wanted
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and stderr.strip() == ""


def test_writing_where_nothing_can_be_written_is_one_line(photos, tmp_path):
    result = run("embed", str(photos / "img 00.png"), "--model", "tiny", "--device", "cpu", "--out", "/proc/x")
    assert result.returncode == 1
    assert "/proc/x" in assert_one_line(result.stderr)


def test_the_adapter_turns_a_write_failure_into_one_line(platform, tmp_path):
    from adapters.clip_adapter import ClipAdapter, ClipAdapterFailure
    from dataloop_fakes import platform_model

    adapter = ClipAdapter()
    adapter.model_entity = platform_model(platform, {"model_name": "tiny", "device": "cpu"})
    adapter.load(str(tmp_path / "artifacts"))
    with pytest.raises(ClipAdapterFailure) as failure:
        adapter.save("/proc/clip-model")
    assert str(failure.value).startswith("CLIP adapter: /proc/clip-model") and "\n" not in str(failure.value)
