"""Issue 17: what a new user sees, driven as they drive it (`python -m adapters.clip ...` in a child process)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, pattern_image


def env_with(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def run(*args: str, cwd=None, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapters.clip", *args], capture_output=True, text=True,
                          cwd=cwd, env=env_with(**extra), timeout=300)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(6):
        pattern_image(i).save(folder / f"img {i}.png")
    return folder


class Lines:
    """A child's stderr read line by line as it comes, each with the seconds since the child started."""

    def __init__(self, args: list[str], **extra: str):
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "adapters.clip", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env_with(**extra))
        self.lines: list[tuple[float, str]] = []
        self.arrived = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self.arrived:
                self.lines.append((time.monotonic() - self.started, line.rstrip("\n")))
                self.arrived.notify_all()

    def wait_for(self, text: str, timeout: float = 120) -> tuple[float, str]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: any(text in line for _, line in self.lines) or
                                         self.proc.poll() is not None, timeout), self.lines
            found = [(t, line) for t, line in self.lines if text in line]
            assert found, (text, self.lines)
            return found[0]

    def finish(self) -> tuple[int, str, str]:
        stdout = self.proc.stdout.read()
        code = self.proc.wait(timeout=300)
        time.sleep(0.1)
        return code, stdout, "\n".join(line for _, line in self.lines)


# ---- 1. a model's first use: progress within 2 s, Ctrl-C says what was kept, the summary counts it all ----
def test_first_index_on_a_new_model_shows_progress_within_2_s_and_ctrl_c_says_how_to_carry_on(photos, tmp_path):
    engines, store = str(tmp_path / "engines"), str(tmp_path / "store")
    args = ["index", str(photos), "--store", store, "--model", "tiny"]
    first = Lines(args, CLIP_ADAPTER_ENGINES=engines)
    arrival, line = first.wait_for("first use")
    assert arrival < 2.0 and line.startswith("[") and "exported to ONNX" in line and "timed" in line
    first.wait_for("exporting tiny's image and text towers to ONNX")
    first.proc.send_signal(signal.SIGINT)
    code, _, stderr = first.finish()
    assert code == 130 and "Traceback" not in stderr
    assert re.search(r"interrupted after [\d.]+ s: the batches committed so far are kept .*rerun the same command",
                     stderr.splitlines()[-1]), stderr

    second = Lines(args + ["--json"], CLIP_ADAPTER_ENGINES=engines)
    arrival, _ = second.wait_for("first use")  # the export was cut short: it starts again, and says so
    assert arrival < 2.0
    code, stdout, stderr = second.finish()
    assert code == 0, stderr
    steps = [line for line in stderr.splitlines() if line.startswith("[")]
    assert [s.split("] ")[1].split(" ")[0] for s in steps] == ["loading", "tiny", "exporting", "timing", "engine:"]
    assert "M parameters); preparing it takes roughly" in steps[1]
    last_stamp = float(steps[-1][1:].split(" s]")[0])
    summary = json.loads(stdout)
    assert summary["added"] == 6 and summary["seconds"] >= last_stamp  # the wait is counted

    third = run(*args, CLIP_ADAPTER_ENGINES=engines)  # prepared now: no first-use lines
    assert third.returncode == 0 and "first use" not in third.stderr and "unchanged 6" in third.stdout
