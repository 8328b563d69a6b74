"""ClipAdapter through dtlpy's real BaseModelAdapter methods, offline.

Faked: only the Dataloop server (model.update, see dataloop_fakes). Items download for real
from file:// URLs; embed_items is dtlpy's own code calling our prepare_item_func and embed.
"""
import json
import os

import numpy as np
import pytest
import torch

from adapters.clip.embed import Embedder
from adapters.clip_adapter import ClipAdapter, ClipAdapterFailure
from conftest import pattern_image
from dataloop_fakes import file_item, offline_feature_set, offline_model, prompt_json


@pytest.fixture
def adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the earlier adapter read a warm-up image relative to the CWD
    model = offline_model({"model_name": "tiny", "batch_size": 3, "embeddings_size": 256})
    adapter = ClipAdapter()
    adapter.model_entity = model
    adapter.load(str(tmp_path / "artifacts"))
    adapter._feature_set = offline_feature_set(64)
    return adapter


@pytest.fixture
def items(tmp_path):
    pattern_image(3).save(tmp_path / "photo.png")
    (tmp_path / "caption.txt").write_text("a red square on the left")
    (tmp_path / "prompt.json").write_text(prompt_json("a blue circle", image_url="https://example/stream"))
    (tmp_path / "empty_prompt.json").write_text(prompt_json("   "))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 16)
    return [
        file_item("img", tmp_path / "photo.png", "image/png"),
        file_item("txt", tmp_path / "caption.txt", "text/plain"),
        file_item("prm", tmp_path / "prompt.json", "application/json", prompt=True),
        file_item("vid", tmp_path / "clip.mp4", "video/mp4"),
        file_item("bad", tmp_path / "broken.jpg", "image/jpeg"),
        file_item("gone", tmp_path / "missing.png", "image/png"),
        file_item("nop", tmp_path / "empty_prompt.json", "application/json", prompt=True),
    ]


def test_embed_items_runs_our_embed_for_every_kind(adapter, items, tmp_path):
    returned, vectors = adapter.embed_items(items, upload_features=False)
    assert [it.id for it in returned] == [it.id for it in items]
    lengths = [None if v is None else len(v) for v in vectors]
    assert lengths == [64, 64, 64, None, None, None, None]
    embedder = Embedder(adapter.clip, num_workers=0)
    np.testing.assert_allclose(vectors[0], embedder.embed_images([tmp_path / "photo.png"]).vectors[0], atol=1e-5)
    np.testing.assert_allclose(vectors[1], embedder.embed_texts(["a red square on the left"]).vectors[0], atol=1e-5)
    np.testing.assert_allclose(vectors[2], embedder.embed_texts(["a blue circle"]).vectors[0], atol=1e-5)
    for v in vectors[:3]:
        assert abs(np.linalg.norm(v) - 1) < 1e-5


def test_failures_are_logged_with_reasons(adapter, items, caplog):
    with caplog.at_level("WARNING"):
        vectors = adapter.embed([adapter.prepare_item_func(it) for it in items[3:]])
    assert vectors == [None, None, None, None]
    log = caplog.text
    assert "vid" in log and "unsupported item type 'video/mp4'" in log
    assert "bad" in log and ("not an image" in log or "corrupt" in log)
    assert "gone" in log and "download failed: the platform returned no data" in log
    assert "nop" in log and "no text prompt" in log


def test_load_writes_the_real_embeddings_size(adapter):
    assert adapter.model_entity.configuration["embeddings_size"] == 64
    assert adapter.configuration["embeddings_size"] == 64


def test_save_then_load_gives_identical_embeddings(adapter, items, tmp_path):
    with torch.no_grad():
        for p in adapter.clip.model.parameters():
            p.mul_(1.01)  # stands in for fine-tuning
    adapter.clip.forget_fingerprint()
    before = adapter.embed([adapter.prepare_item_func(it) for it in items[:3]])
    adapter.save(str(tmp_path / "out"))
    assert {"model.safetensors", "clip_config.json"} <= set(os.listdir(tmp_path / "out"))
    saved = json.loads((tmp_path / "out" / "clip_config.json").read_text())
    assert saved["config"]["model_name"] == "tiny"
    fresh = ClipAdapter()
    fresh.model_entity = offline_model({"model_name": "tiny"})
    fresh.load(str(tmp_path / "out"))
    assert fresh.clip.fingerprint == adapter.clip.fingerprint
    after = fresh.embed([fresh.prepare_item_func(it) for it in items[:3]])
    np.testing.assert_allclose(np.array(after), np.array(before), atol=1e-6)


def test_load_reads_the_earlier_adapters_best_pt(adapter, tmp_path):
    artifacts = tmp_path / "legacy"
    artifacts.mkdir()
    torch.save({"model_state_dict": adapter.clip.model.state_dict(), "epoch": 3}, artifacts / "best.pt")
    legacy = ClipAdapter()
    legacy.model_entity = offline_model({"model_name": "tiny", "early_stopping": True, "episilon": 1e-6})
    legacy.load(str(artifacts))
    assert legacy.clip.fingerprint == adapter.clip.fingerprint
    assert legacy.settings.early_stop is True


def test_bad_configuration_is_one_clear_message(tmp_path):
    bad = ClipAdapter()
    bad.model_entity = offline_model({"model_name": "tiny", "learning_rat": 1e-5})
    with pytest.raises(ClipAdapterFailure, match="did you mean 'learning_rate'"):
        bad.load(str(tmp_path))


def test_embed_before_load_is_a_clear_error():
    with pytest.raises(ClipAdapterFailure, match="no model loaded"):
        ClipAdapter().embed([])


def test_adapter_without_model_entity_uses_defaults_and_given_name(tmp_path):
    adapter = ClipAdapter()
    adapter.configuration  # noqa: B018 - a fresh empty dict each access without an entity
    adapter.settings = adapter.settings.updated(model_name="tiny")
    assert adapter.settings.model_name == "tiny"


def test_convert_from_dtlpy_downloads_the_images_prompt_items_point_to(tmp_path, monkeypatch):
    """dtlpy's prepare_data ends with convert_from_dtlpy; prompt images live in other items.

    Faked: `dl.items.get` (a server call) returns a real dl.Item whose binary is a local file."""
    import dtlpy as dl

    from adapters.clip.exports import prompt_images_to_download
    from adapters.clip.manifests import load_pairs
    from test_data import export_with_bad_records

    export_with_bad_records(tmp_path)
    missing = prompt_images_to_download(tmp_path)
    assert list(missing) == ["65f1c0a9e1b2c3d4e5f6bb99"]
    source = tmp_path / "elsewhere" / "the-image.png"
    source.parent.mkdir()
    pattern_image(5).save(source)
    fetched = []

    def get(item_id=None, **kwargs):
        fetched.append(item_id)
        return file_item(item_id, source, "image/png")

    monkeypatch.setattr(dl.items, "get", get)
    before = {p.caption for p in load_pairs(tmp_path).pairs}
    ClipAdapter().convert_from_dtlpy(str(tmp_path))
    assert fetched == ["65f1c0a9e1b2c3d4e5f6bb99"]
    assert prompt_images_to_download(tmp_path) == {}
    after = {p.caption for p in load_pairs(tmp_path).pairs}
    assert "no image" in after - before


def test_convert_from_dtlpy_reports_an_image_it_cannot_fetch(tmp_path, monkeypatch, caplog):
    import dtlpy as dl

    from test_data import export_with_bad_records

    export_with_bad_records(tmp_path)

    def get(item_id=None, **kwargs):
        raise dl.exceptions.NotFound("404", "item not found")

    monkeypatch.setattr(dl.items, "get", get)
    with caplog.at_level("WARNING"):
        ClipAdapter().convert_from_dtlpy(str(tmp_path))  # does not raise: the rest still trains
    assert "prompt image 65f1c0a9e1b2c3d4e5f6bb99" in caplog.text and "NotFound" in caplog.text


def test_evaluate_scores_the_datasets_captioned_items_and_reports_metrics(tmp_path, monkeypatch):
    """ClipAdapter.evaluate as dtlpy's evaluate_model calls it.

    Faked, being server calls: the dataset's download (it copies an export written here, in dtlpy's
    items/ + json/ layout), `dl.items.get` for prompt images, and `model.metrics.create` (recorded)."""
    import shutil

    import dtlpy as dl

    from adapters.clip.manifests import load_pairs
    from adapters.clip.evaluate import evaluate_pairs
    from test_train import write_default_layout_export

    export = tmp_path / "export"
    write_default_layout_export(export, n_train=0, n_val=8)
    images = export / "prompt_images"
    model = offline_model({"model_name": "tiny", "batch_size": 4})
    plots = []
    model.metrics.create = lambda samples, dataset_id=None: plots.extend(samples) or True
    dataset = dl.Dataset.from_json(project=None, _json={"id": "dataset-9", "name": "captions"},
                                   client_api=dl.client_api)

    def download(local_path=None, filters=None, annotation_options=None, **kwargs):
        assert annotation_options == dl.ViewAnnotationOptions.JSON
        shutil.copytree(export / "validation", local_path)

    monkeypatch.setattr(dataset.items, "download", download)
    monkeypatch.setattr(dl.items, "get", lambda item_id=None, **k: file_item(item_id, images / f"{item_id}.png",
                                                                             "image/png"))
    adapter = ClipAdapter()
    adapter.model_entity = model
    adapter.load(str(tmp_path / "no-artifacts"))
    assert adapter.evaluate(model, dataset, filters=None) is model

    expected = evaluate_pairs(adapter.clip, load_pairs(export).subset("validation"))
    reported = {s.figure.removeprefix("evaluation: "): s.y for s in plots}
    assert expected["pairs"] == 8
    for key in ("t2i_r1", "i2t_r1", "t2i_r5", "mean_recall"):
        assert reported[key] == pytest.approx(expected[key])
    assert {s.legend for s in plots} == {"captions"}
