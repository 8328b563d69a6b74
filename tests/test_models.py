"""load_model: names, the three checkpoint formats, fingerprints, offline failure."""
import time

import numpy as np
import open_clip
import pytest
import torch

from adapters.clip import models
from adapters.clip.embed import Embedder
from adapters.clip.errors import CheckpointError, ModelLoadError, WeightsUnavailableError
from adapters.clip.models import (OPENAI_MODELS, find_checkpoint, load_model, parse_model_spec,
                                  read_checkpoint_info, save_checkpoint)
from conftest import pattern_image

TEXTS = ["a red square", "a blue circle on the left", "two green triangles"]


def embed_all(clip):
    e = Embedder(clip, batch_size=8, num_workers=0)
    images = [pattern_image(i) for i in range(3)]
    return np.concatenate([e.embed_images(images).vectors, e.embed_texts(TEXTS).vectors])


@pytest.fixture(scope="module")
def trained_like(tiny):
    """The tiny model with perturbed weights, standing in for a fine-tuned one."""
    clip = load_model("tiny", device="cpu")
    with torch.no_grad():
        for p in clip.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    clip.forget_fingerprint()
    return clip


# ---- names -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(OPENAI_MODELS))
def test_openai_names_use_quickgelu_architectures(name):
    spec = parse_model_spec(name)
    assert spec.kind == "pretrained" and spec.weights == "openai"
    assert open_clip.get_model_config(spec.arch)["quick_gelu"] is True


def test_open_clip_pair_with_openai_tag_switches_to_quickgelu():
    # open_clip would only warn and build GELU: quietly wrong embeddings.
    assert parse_model_spec("ViT-B-32:openai").arch == "ViT-B-32-quickgelu"
    assert parse_model_spec("ViT-B-32:laion2b_s34b_b79k").arch == "ViT-B-32"


def test_embedding_dimension_comes_from_the_model():
    dims = {row.name: row.dim for row in models.list_known_models()}
    assert dims["ViT-L/14"] == 768 and dims["ViT-B/32"] == 512 and dims["RN50"] == 1024
    assert dims["RN50x4"] == 640 and dims["tiny"] == 64


def test_vit_b32_random_is_real_architecture_with_quickgelu():
    clip = load_model("ViT-B/32:random", device="cpu")
    assert clip.dim == 512 and clip.image_size == 224 and clip.context_length == 77
    mlp = clip.model.visual.transformer.resblocks[0].mlp
    assert type(mlp.gelu).__name__ == "QuickGELU"


@pytest.mark.parametrize("name,fragment", [
    ("nonsense-arch", "unknown model architecture"),
    ("ViT-B-32", "architecture without weights"),
    ("ViT-B-32:no-such-tag", "unknown pretrained tag"),
    ("./missing/best.pt", "does not exist"),
    ("tiny:/no/such/weights.safetensors", "does not exist"),
    ("vit-b/32", "did you mean 'ViT-B/32'\\? `python -m adapters.clip models` lists"),
    ("ViT-B/33", "did you mean 'ViT-B/32'\\?"),
    ("rn50", "did you mean 'RN50'\\?"),
])
def test_bad_names_give_clear_errors(name, fragment):
    with pytest.raises(ModelLoadError, match=fragment):
        load_model(name, device="cpu")


def test_unavailable_device_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model("tiny", device="cuda")


# ---- checkpoints -------------------------------------------------------------------------
def test_project_checkpoint_round_trip(trained_like, tmp_path):
    target = save_checkpoint(trained_like, tmp_path / "ckpt", config={"learning_rate": 1e-5},
                             metrics={"mean_recall": 0.5})
    info = read_checkpoint_info(target)
    assert info["arch"] == "tiny" and info["embed_dim"] == 64
    assert info["config"] == {"learning_rate": 1e-5} and info["metrics"] == {"mean_recall": 0.5}
    loaded = load_model(str(target), device="cpu")
    assert loaded.fingerprint == trained_like.fingerprint == info["fingerprint"]
    np.testing.assert_array_equal(embed_all(loaded), embed_all(trained_like))
    assert find_checkpoint(target) == target


def test_saving_over_an_existing_checkpoint_replaces_it_whole(tiny, trained_like, tmp_path):
    target = tmp_path / "ckpt"
    save_checkpoint(tiny, target)
    save_checkpoint(trained_like, target)
    assert load_model(str(target)).fingerprint == trained_like.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or backup left


def test_save_into_directory_keeps_other_files(tiny, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    save_checkpoint(tiny, tmp_path, replace_directory=False)
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "model.safetensors").exists()
    assert load_model(str(tmp_path)).fingerprint == tiny.fingerprint


def test_legacy_best_pt_from_earlier_adapter(trained_like, tmp_path):
    # The earlier adapter: torch.save({'model_state_dict': openai_clip.state_dict(), ...}, 'best.pt').
    # open_clip's CLIP uses OpenAI's parameter names, so its state dict stands in for OpenAI's here.
    state = {k: v.clone() for k, v in trained_like.model.state_dict().items()}
    torch.save({"epoch": 7, "model_state_dict": state, "optimizer_state_dict": {"lr": 5e-8}},
               tmp_path / "best.pt")
    loaded = load_model(str(tmp_path), arch="tiny", device="cpu")
    np.testing.assert_allclose(embed_all(loaded), embed_all(trained_like), atol=1e-6)


def test_legacy_best_pt_saved_in_fp16_with_module_prefix(trained_like, tmp_path):
    state = {f"module.{k}": v.half() for k, v in trained_like.model.state_dict().items()}
    torch.save({"model_state_dict": state}, tmp_path / "best.pt")
    loaded = load_model(str(tmp_path / "best.pt"), arch="tiny")
    assert next(loaded.model.parameters()).dtype == torch.float32
    np.testing.assert_allclose(embed_all(loaded), embed_all(trained_like), atol=2e-2)


def test_legacy_best_pt_needs_the_architecture(trained_like, tmp_path):
    torch.save({"model_state_dict": trained_like.model.state_dict()}, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match="does not say its architecture"):
        load_model(str(tmp_path / "best.pt"))


def test_mismatched_architecture_names_the_file(trained_like, tmp_path):
    torch.save({"model_state_dict": trained_like.model.state_dict()}, tmp_path / "best.pt")
    with pytest.raises(CheckpointError) as info:
        load_model(str(tmp_path), arch="ViT-B/32")
    message = str(info.value)
    assert "best.pt" in message and "ViT-B-32-quickgelu" in message and "shape mismatches" in message


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_state_dict_with_architecture(trained_like, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in trained_like.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 1}, path)
    loaded = load_model(f"tiny:{path}", device="cpu")
    np.testing.assert_array_equal(embed_all(loaded), embed_all(trained_like))


def test_files_that_are_not_what_they_claim(tmp_path):
    garbage = tmp_path / "best.pt"
    garbage.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(CheckpointError, match="best.pt: not a readable weights file"):
        load_model(str(garbage), arch="tiny")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_model(f"tiny:{empty}")
    no_tensors = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "note": "no weights"}, no_tensors)
    with pytest.raises(CheckpointError, match="holds no model weights"):
        load_model(str(no_tensors), arch="tiny")
    bad_json = tmp_path / "ckpt"
    bad_json.mkdir()
    (bad_json / "clip_config.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not a clip-adapter-checkpoint"):
        load_model(str(bad_json))


class _Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"model_state_dict": {}, "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_model(str(path), arch="tiny")


# ---- fingerprints ------------------------------------------------------------------------
def test_fingerprint_changes_with_weights_and_architecture(tiny):
    same = load_model("tiny")
    assert same.fingerprint == tiny.fingerprint
    changed = load_model("tiny")
    with torch.no_grad():
        changed.model.logit_scale.add_(1e-3)
    changed.forget_fingerprint()
    assert changed.fingerprint != tiny.fingerprint
    assert models.fingerprint_state("other", tiny.model.state_dict()) != tiny.fingerprint


# ---- offline -----------------------------------------------------------------------------
def test_offline_pretrained_weights_fail_fast_and_clearly(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants
    # Port 9 on loopback refuses at once: the test never reaches a real hub, online or not.
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("ViT-B/32", cache_dir=str(tmp_path / "hub"), device="cpu")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "ViT-B/32" in message and str(tmp_path / "hub") in message
    assert "ARCH:/path/to/weights.safetensors" in message


def test_offline_error_tells_each_edge_how_to_pass_a_checkpoint(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hf_constants

    from adapters.clip.cli import main
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    assert main(["embed", "--text", "a dog", "--model", "ViT-B/32", "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert "use `--model PATH`" in err and "model_name" not in err
    with pytest.raises(WeightsUnavailableError) as info:  # the library's (and the adapter's) wording
        load_model("ViT-B/32", device="cpu")
    assert "set model_name to a checkpoint directory" in str(info.value)


def test_network_probe_has_a_hard_deadline(monkeypatch):
    # A DNS lookup or connect that hangs (as on some offline networks) must not hold the load.
    import socket

    def hang(*args, **kwargs):
        time.sleep(5)
        raise OSError("gave up")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.monotonic()
    assert models.host_reachable("example.invalid", 443, timeout=0.5) is False
    assert time.monotonic() - start < 2


def test_loading_a_model_leaves_logging_unconfigured():
    """open_clip logs with `logging.info`, which configures a root handler when there is none; the process
    then printed dtlpy's whole DEBUG log on stderr (a model service's log). In a fresh process: loading
    adds no root handler, and a dtlpy-style DEBUG record afterwards prints nothing."""
    import subprocess
    import sys

    from conftest import ROOT

    script = ("import logging\n"
              "from adapters.clip.models import load_model\n"
              "load_model('tiny', device='cpu')\n"
              "assert logging.getLogger().handlers == [], logging.getLogger().handlers\n"
              "chatty = logging.getLogger('dtlpy-like'); chatty.setLevel(logging.DEBUG)\n"
              "chatty.debug('COOKIE.read: key: project')\n"
              "print('quiet')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "quiet"
    assert "COOKIE.read" not in done.stderr
