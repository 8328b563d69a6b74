"""The engine export cache under faults (issue 16: truncate, zero, swap, delete, read-only, kill
during export, many threads), a torch-free start for `embed` and `index` (issue 18.3) and exports
saved with a checkpoint (18.4). Real exports of the tiny model, real ONNX Runtime, real SIGKILLs."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.clip import engines, export_cache, onnx_export
from adapters.clip.cli import main
from adapters.clip.export_cache import EXPORT_INFO, WORK_PREFIX
from adapters.clip.exported_model import open_exported_model, pil_preprocess
from adapters.clip.models import load_model, save_checkpoint
from adapters.clip.onnx_export import attach_engine, choose_engine, export_towers, probe_inputs
from conftest import ROOT, pattern_image


def fastest(name: str):
    """A timer under which `name` wins auto's measurement (the rest of auto runs for real)."""
    def timer(candidate, run):
        run()
        return 0.1 if candidate == name else 1.0
    return timer


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The tiny model's export with auto's choice (onnxruntime), made once; tests damage copies."""
    root = tmp_path_factory.mktemp("pristine") / "engines"
    clip = load_model("tiny", device="cpu")
    directory = export_towers(clip, root / clip.fingerprint)
    choose_engine(clip, directory, timer=fastest("onnxruntime"))
    return root


@pytest.fixture
def cache(pristine, tmp_path, monkeypatch):
    root = tmp_path / "engines"
    shutil.copytree(pristine, root)
    monkeypatch.setenv(engines.ENGINE_ENV, str(root))
    monkeypatch.setattr(export_cache, "_warned", set())
    return root


def engine_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "engine" in r.getMessage()]


def cosines(a, b):
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def assert_right_vectors(clip, tiny):
    pixels, tokens = probe_inputs(tiny, 6, seed=5)
    assert cosines(clip.encode_images(pixels), tiny.torch_encode_images(pixels)).min() >= 0.99999
    assert cosines(clip.encode_tokens(tokens), tiny.torch_encode_tokens(torch.from_numpy(tokens))).min() >= 0.99999


@contextlib.contextmanager
def read_only(path: Path):
    """Really unwritable, also for root (chattr +i), else skipped; restored afterwards."""
    os.chmod(path, 0o555)
    immutable = False
    if export_cache.writable(path) and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    try:
        if export_cache.writable(path):
            pytest.skip("cannot make a folder read-only here (root without chattr)")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        os.chmod(path, 0o755)


def other_weights_export(tmp_path) -> Path:
    other = load_model("tiny", device="cpu")
    with torch.no_grad():
        for p in other.model.parameters():
            p.mul_(0.9)
    other.forget_fingerprint()
    return export_towers(other, tmp_path / "other" / other.fingerprint)


# ---- each fault ends in correct vectors with one line naming the folder ----------------------------
def truncate(path: Path, _tmp: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def zero(path: Path, _tmp: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.write(b"\0" * size)


def swap(path: Path, tmp: Path) -> None:
    shutil.copyfile(other_weights_export(tmp) / path.name, path)


def delete(path: Path, _tmp: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("fault, victim", [(truncate, "image-fp32.onnx.data"), (zero, "image-int8.onnx"),
                                           (swap, "text-fp32.onnx"), (delete, "text-fp32.onnx.data")])
def test_a_damaged_export_is_rebuilt_with_one_warning(cache, tiny, tmp_path, caplog, fault, victim):
    directory = cache / tiny.fingerprint
    fault(directory / victim, tmp_path)
    with caplog.at_level(logging.WARNING):
        clip = attach_engine(load_model("tiny", device="cpu"), "auto")
    assert clip.engine_name == "onnxruntime"
    warnings = engine_warnings(caplog)
    assert len(warnings) == 1 and str(directory) in warnings[0] and "rebuilding" in warnings[0], warnings
    assert_right_vectors(clip, tiny)
    export_cache.check_export(directory)  # sound again, every file


def test_an_export_json_of_other_weights_is_refused(cache, tiny, tmp_path, caplog):
    directory = cache / tiny.fingerprint
    for path in other_weights_export(tmp_path).iterdir():  # every file of the other model, export.json too
        if path.is_file():
            shutil.copyfile(path, directory / path.name)
    with caplog.at_level(logging.WARNING):
        clip = attach_engine(load_model("tiny", device="cpu"), "onnxruntime")
    assert "belongs to other weights" in engine_warnings(caplog)[0] and len(engine_warnings(caplog)) == 1
    assert_right_vectors(clip, tiny)


def test_a_broken_export_never_stops_the_adapter_from_loading(cache, tiny, platform, tmp_path, caplog):
    from adapters.clip_adapter import ClipAdapter
    from dataloop_fakes import platform_model

    truncate(cache / tiny.fingerprint / "image-fp32.onnx.data", tmp_path)
    with read_only(cache / tiny.fingerprint):  # cannot be rebuilt in place either
        adapter = ClipAdapter()
        adapter.model_entity = platform_model(platform, {"model_name": "tiny", "engine": "onnxruntime"})
        with caplog.at_level(logging.WARNING):
            adapter.load(str(tmp_path / "artifacts"))
            adapter.load(str(tmp_path / "artifacts"))  # and again: never a permanent failure
    assert adapter.clip.engine_name in ("onnxruntime", "torch")
    assert_right_vectors(adapter.clip, tiny)
    assert len([w for w in engine_warnings(caplog) if "damaged" in w]) == 1


def test_a_read_only_cache_keeps_autos_choice_for_the_process_and_says_so_once(cache, tiny, caplog):
    directory = cache / tiny.fingerprint
    for choice in directory.glob("auto-*.json"):
        choice.unlink()
    timer_calls = []

    def timer(name, run):
        timer_calls.append(name)
        return fastest("onnxruntime")(name, run)

    with read_only(directory), caplog.at_level(logging.WARNING):
        first = attach_engine(load_model("tiny", device="cpu"), "auto", timer=timer)
        measured = len(timer_calls)
        second = attach_engine(load_model("tiny", device="cpu"), "auto", timer=timer)
    assert first.engine_name == second.engine_name == "onnxruntime"
    assert measured > 0 and len(timer_calls) == measured  # the second load did not measure again
    warnings = engine_warnings(caplog)
    assert len(warnings) == 1 and "cannot save its choice" in warnings[0] and str(directory) in warnings[0]
    assert_right_vectors(second, tiny)


EMBED = [sys.executable, "-m", "adapters.clip", "embed", "--model", "tiny", "--engine", "onnxruntime",
         "--device", "cpu", "--text", "a red square"]


@pytest.mark.parametrize("point", ["export.files-written", "export.files-renamed"])
def test_a_kill_during_export_leaves_nothing_that_is_used(tmp_path, tiny, monkeypatch, caplog, point):
    """Killed with the towers written in the work folder, or renamed into place with export.json not yet
    written: the next load sweeps the debris and exports again."""
    root = tmp_path / "engines"
    env = {**os.environ, engines.ENGINE_ENV: str(root), "PYTHONPATH": str(ROOT), "CLIP_ADAPTER_KILL_AT": point}
    done = subprocess.run(EMBED + ["--out", str(tmp_path / "killed")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    directory = root / tiny.fingerprint
    assert list(directory.glob(f"{WORK_PREFIX}*")) and not (directory / EXPORT_INFO).exists()
    monkeypatch.setenv(engines.ENGINE_ENV, str(root))
    with caplog.at_level(logging.WARNING):
        clip = attach_engine(load_model("tiny", device="cpu"), "onnxruntime")
    assert clip.engine_name == "onnxruntime" and not engine_warnings(caplog)
    assert_right_vectors(clip, tiny)
    assert not list(directory.glob(f"{WORK_PREFIX}*")) and not list(directory.glob("*.tmp-*"))


def test_concurrent_exports_make_one_export_and_restore_the_attention_fast_path(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv(engines.ENGINE_ENV, str(tmp_path / "engines"))
    exports = []
    real_export = torch.onnx.export

    def counting(*args, **kwargs):
        exports.append(threading.get_ident())
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", counting)
    results, errors = [], []

    def attach():
        try:
            results.append(attach_engine(dataclasses.replace(tiny, engine=None), "onnxruntime"))
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=attach) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and [c.engine_name for c in results] == ["onnxruntime"] * 6
    assert len(exports) == 2  # both towers, once
    assert torch.backends.mha.get_fastpath_enabled()
    assert_right_vectors(results[0], tiny)


# ---- torch-free start -----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(64, 64), (100, 37), (37, 100), (641, 480), (65, 64), (3, 200)])
def test_torch_free_preprocessing_equals_open_clips(tiny, size):
    from adapters.clip.embed import numpy_preprocess
    from PIL import Image

    image = pattern_image(size[0] % 7).resize(size, Image.NEAREST).convert("RGB")
    ours = pil_preprocess(tiny.preprocess_cfg)(image)
    np.testing.assert_allclose(ours, numpy_preprocess(tiny.preprocess)(image).numpy(), atol=1e-6)
    np.testing.assert_allclose(ours, tiny.preprocess(image).numpy(), atol=1e-5)


TORCH_FREE = """
import json, sys
from adapters.clip.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "open_clip": "open_clip" in sys.modules}))
"""


def run_cli(args, root, cwd):
    env = {**os.environ, engines.ENGINE_ENV: str(root), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", TORCH_FREE, *args], env=env, capture_output=True, text=True,
                          cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done


def test_embed_and_index_start_without_torch_once_exports_and_autos_choice_are_cached(tmp_path, tiny, monkeypatch):
    root = tmp_path / "engines"
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(5):
        pattern_image(i).save(folder / f"{i}.png")
    monkeypatch.setenv(engines.ENGINE_ENV, str(root))
    attach_engine(load_model("tiny", device="cpu"), "auto", timer=fastest("onnxruntime"))  # the first load
    embed = ["embed", str(folder), "--model", "tiny", "--text", "a red square", "--out", str(tmp_path / "e")]
    status, _ = run_cli(embed, root, tmp_path)
    assert status == {"code": 0, "torch": False, "open_clip": False}
    assert main(embed[:-1] + [str(tmp_path / "t"), "--engine", "onnxruntime"]) == 0  # with torch loaded
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), np.load(tmp_path / "t.npy"), atol=1e-5)
    status, _ = run_cli(["index", str(folder), "--store", str(tmp_path / "store"), "--model", "tiny"], root, tmp_path)
    assert status == {"code": 0, "torch": False, "open_clip": False}
    assert main(["search", "a red square", "--store", str(tmp_path / "store"), "--engine", "torch"]) == 0


def test_changed_weights_never_run_a_stale_export(tmp_path, tiny, monkeypatch):
    """A checkpoint's exports and identity, then other weights written into it: the torch-free start
    declines (the weights file changed), and loading makes and uses the new weights' own export."""
    monkeypatch.setenv(engines.ENGINE_ENV, str(tmp_path / "engines"))
    checkpoint = save_checkpoint(tiny, tmp_path / "ckpt")
    onnx_export.export_with_checkpoint(load_model(str(checkpoint), device="cpu"), checkpoint,
                                       timer=fastest("onnxruntime"))
    exported = open_exported_model(str(checkpoint), "auto", "cpu")  # exports and auto's choice, beside the weights
    assert exported is not None and exported.engine.directory.parent == checkpoint / "engines"
    other = load_model("tiny", device="cpu")
    with torch.no_grad():
        for p in other.model.parameters():
            p.mul_(0.9)
    other.forget_fingerprint()
    save_checkpoint(other, checkpoint)
    assert open_exported_model(str(checkpoint), "auto", "cpu") is None
    clip = attach_engine(load_model(str(checkpoint), device="cpu"), "onnxruntime")
    assert clip.fingerprint == other.fingerprint != tiny.fingerprint
    pixels, _ = probe_inputs(tiny, 4)
    assert cosines(clip.encode_images(pixels), other.torch_encode_images(pixels)).min() >= 0.99999


# ---- exports saved with the checkpoint --------------------------------------------------------------
def test_a_saved_checkpoint_carries_its_exports_and_its_first_load_only_opens_them(tmp_path, platform, monkeypatch):
    """ClipAdapter.save (what dtlpy uploads) writes the exports; a fresh load of the downloaded copy
    exports nothing. (auto's choice saved with them: test_changed_weights_never_run_a_stale_export.)"""
    from adapters.clip_adapter import ClipAdapter
    from dataloop_fakes import platform_model

    monkeypatch.setenv(engines.ENGINE_ENV, str(tmp_path / "engines"))
    adapter = ClipAdapter()
    adapter.model_entity = platform_model(platform, {"model_name": "tiny", "engine": "onnxruntime"})
    adapter.load(str(tmp_path / "artifacts"))
    with torch.no_grad():
        for p in adapter.clip.model.parameters():
            p.mul_(1.01)  # stands in for fine-tuning
    adapter.clip.forget_fingerprint()
    adapter.save(str(tmp_path / "out"))
    info = json.loads((tmp_path / "out" / "engines" / adapter.clip.fingerprint / EXPORT_INFO).read_text())
    assert info["fingerprint"] == adapter.clip.fingerprint and "image-fp32.onnx.data" in info["files"]
    shutil.rmtree(tmp_path / "engines")
    uploaded = tmp_path / "downloaded"
    shutil.copytree(tmp_path / "out", uploaded)  # new files, as a pod's artifact download makes them

    def refuse(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    fresh = ClipAdapter()
    fresh.model_entity = platform_model(platform, {"model_name": "tiny", "engine": "onnxruntime"})
    fresh.load(str(uploaded))
    assert fresh.clip.fingerprint == adapter.clip.fingerprint and fresh.clip.engine_name == "onnxruntime"
    assert fresh.clip.engine.directory == uploaded / "engines" / adapter.clip.fingerprint
    assert_right_vectors(fresh.clip, adapter.clip)


def test_a_choice_made_under_earlier_rules_is_measured_again(cache, caplog):
    """auto's probe changed (rules 2: photo-like images, under which int8 and bf16 stopped passing on
    random weights); a cached choice without the current rules must not keep an engine the new rules
    would reject."""
    clip = load_model("tiny", device="cpu")
    directory = engines.export_dir(clip.name, clip.fingerprint)
    path = engines.choice_file(directory)
    old = json.loads(path.read_text())
    assert old["rules"] == engines.AUTO_RULES
    path.write_text(json.dumps({**{k: v for k, v in old.items() if k != "rules"}, "engine": "onnxruntime-int8"}))
    assert engines.read_choice(directory) is None
    attach_engine(clip, "auto", timer=fastest("onnxruntime"))
    assert clip.engine_name == "onnxruntime"
    assert json.loads(path.read_text())["rules"] == engines.AUTO_RULES
