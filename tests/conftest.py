"""Shared fixtures. dtlpy is pointed at a temp folder *before* anything imports it, so a
developer's login is never used and nothing can reach the platform."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_DATALOOP_HOME = tempfile.mkdtemp(prefix="dataloop-test-")
os.environ["DATALOOP_PATH"] = _DATALOOP_HOME
# Exported engines go to a temp cache too (never the developer's ~/.cache); tests may point elsewhere.
os.environ["CLIP_ADAPTER_ENGINES"] = tempfile.mkdtemp(prefix="clip-engines-test-")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """A real (tiny) open_clip CLIP with seeded random weights, on CPU."""
    from adapters.clip.models import load_model
    return load_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def embedder(tiny):
    from adapters.clip.embed import Embedder
    return Embedder(tiny, batch_size=4, num_workers=2)


@pytest.fixture
def make_image(tmp_path):
    """Write an image file and return its path: make_image('a.png', color=(255, 0, 0), size=(64, 48))."""

    def make(name: str = "img.png", color=(200, 30, 30), size=(64, 48), mode="RGB", **save_kwargs) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new(mode, size, color)
        image.save(path, **save_kwargs)
        return path

    return make


def pattern_image(seed: int, size=(64, 64)) -> Image.Image:
    """A deterministic image with structure (embeddings of flat colours are too alike)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ---- the fake Dataloop platform (tests/fake_dataloop, docs/platform-tests.md) --------------------
@pytest.fixture(scope="session")
def fake_dataloop_server():
    """One fake gate per test session, on 127.0.0.1; dtlpy is pointed at it by the `platform` fixture."""
    from fake_dataloop import FakeDataloopServer

    server = FakeDataloopServer().start()
    yield server
    server.stop()


def _fresh_platform(server):
    from fake_dataloop import connect_dtlpy

    state = server.reset()
    connect_dtlpy(server.url)
    return state


def _assert_all_implemented(state) -> None:
    assert not state.unimplemented, f"dtlpy called endpoints the fake platform lacks: {state.unimplemented}"


@pytest.fixture
def platform(fake_dataloop_server, monkeypatch, tmp_path):
    """An empty fake platform with dtlpy logged in to it. Yields its state (seed it, then assert on it).

    The test fails if dtlpy called an endpoint the fake does not implement. The working directory is
    the test's tmp folder: dtlpy's train_model writes to the relative path 'tmp/<model id>'.
    """
    state = _fresh_platform(fake_dataloop_server)
    monkeypatch.chdir(tmp_path)
    yield state
    _assert_all_implemented(state)


@pytest.fixture(scope="module")
def module_platform(fake_dataloop_server):
    """`platform` for a module's shared fixtures (one adapter loaded for every test of the module)."""
    state = _fresh_platform(fake_dataloop_server)
    yield state
    _assert_all_implemented(state)
