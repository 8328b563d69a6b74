"""ClipAdapter through dtlpy's real BaseModelAdapter methods.

Faked: only the Dataloop server, by the fake platform (tests/fake_dataloop) the models live on.
Items download for real, from file:// URLs or from the fake; embed_items is dtlpy's own code
calling our prepare_item_func and embed.
"""
import json
import os

import numpy as np
import pytest
import torch

from adapters.clip.embed import Embedder
from adapters.clip_adapter import ClipAdapter, ClipAdapterFailure
from conftest import pattern_image
from dataloop_fakes import file_item, platform_model, prompt_json


@pytest.fixture
def adapter(platform, tmp_path):  # (the CWD is tmp_path: the earlier adapter read a warm-up image there)
    model = platform_model(platform, {"model_name": "tiny", "batch_size": 3, "embeddings_size": 256})
    adapter = ClipAdapter()
    adapter.model_entity = model
    adapter.load(str(tmp_path / "artifacts"))
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
    with caplog.at_level("WARNING", logger="ModelAdapter"):
        vectors = adapter.embed([adapter.prepare_item_func(it) for it in items[3:]])
    assert vectors == [None, None, None, None]
    log = caplog.text
    assert "vid" in log and "unsupported item type 'video/mp4'" in log
    assert "bad" in log and ("not an image" in log or "corrupt" in log)
    assert "gone" in log and "download failed: the platform returned no data" in log
    assert "nop" in log and "neither a text nor an image prompt" in log


def test_a_prompt_item_without_text_is_its_prompts_image(adapter, tmp_path):
    """What utils/prepare_dataset.py makes: the prompt holds only an image (another item, by URL).
    The fetch through the platform: tests/test_platform_flows.py."""
    from adapters.clip.items import PROMPT, PromptImage, decode_payload

    stream = "https://gate.dataloop.ai/api/v1/items/65f1c0a9e1b2c3d4e5f6bb01/stream"
    assert decode_payload(PROMPT, prompt_json("", image_url=stream).encode()) == (PromptImage(stream), None)
    assert decode_payload(PROMPT, prompt_json("a cat", image_url=stream).encode()) == ("a cat", None)
    (tmp_path / "elsewhere.json").write_text(prompt_json("", image_url="https://example.com/cat.png"))
    prepared = adapter.prepare_item_func(file_item("ext", tmp_path / "elsewhere.json", "application/json",
                                                   prompt=True))
    assert prepared.kind == "image" and prepared.data is None
    assert prepared.error == "prompt image 'https://example.com/cat.png' is not a Dataloop item"


def test_load_writes_the_real_embeddings_size(adapter):
    assert adapter.model_entity.configuration["embeddings_size"] == 64
    assert adapter.configuration["embeddings_size"] == 64


def test_save_then_load_gives_identical_embeddings(adapter, items, tmp_path, platform):
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
    # torch on both sides: the weights' round trip is compared exactly (`adapter` is on torch since
    # its weights changed; engines' agreement with torch is tests/test_engines.py's business)
    fresh.model_entity = platform_model(platform, {"model_name": "tiny", "engine": "torch"})
    fresh.load(str(tmp_path / "out"))
    assert fresh.clip.fingerprint == adapter.clip.fingerprint
    after = fresh.embed([fresh.prepare_item_func(it) for it in items[:3]])
    np.testing.assert_allclose(np.array(after), np.array(before), atol=1e-6)


def test_load_reads_the_earlier_adapters_best_pt(adapter, tmp_path, platform):
    artifacts = tmp_path / "legacy"
    artifacts.mkdir()
    torch.save({"model_state_dict": adapter.clip.model.state_dict(), "epoch": 3}, artifacts / "best.pt")
    legacy = ClipAdapter()
    legacy.model_entity = platform_model(platform, {"model_name": "tiny", "early_stopping": True, "episilon": 1e-6})
    legacy.load(str(artifacts))
    assert legacy.clip.fingerprint == adapter.clip.fingerprint
    assert legacy.settings.early_stop is True


def test_load_honours_the_earlier_adapters_weights_filename(adapter, tmp_path, platform):
    artifacts = tmp_path / "legacy"
    artifacts.mkdir()
    torch.save({"model_state_dict": adapter.clip.model.state_dict()}, artifacts / "clip_weights.pth")
    legacy = ClipAdapter()
    legacy.model_entity = platform_model(platform, {"model_name": "tiny", "weights_filename": "clip_weights.pth"})
    legacy.load(str(artifacts))
    assert legacy.clip.fingerprint == adapter.clip.fingerprint
    untrained = ClipAdapter()  # that adapter's untrained models name best.pt but have no artifacts yet
    untrained.model_entity = platform_model(platform, {"model_name": "tiny", "weights_filename": "best.pt"})
    untrained.load(str(tmp_path / "no-artifacts"))
    assert untrained.clip is not None


def test_unknown_configuration_keys_never_stop_a_deploy(tmp_path, platform, caplog):
    typo = ClipAdapter()
    typo.model_entity = platform_model(platform, {"model_name": "tiny", "learning_rat": 1e-5,
                                                  "a_later_platform_key": 1})
    with caplog.at_level("WARNING", logger="ModelAdapter"):
        typo.load(str(tmp_path))
    assert typo.clip is not None
    warned = [r.getMessage() for r in caplog.records if "unknown configuration key" in r.getMessage()]
    assert len(warned) == 2 and "did you mean 'learning_rate'" in warned[0]


def test_bad_configuration_value_is_one_clear_message(tmp_path, platform):
    bad = ClipAdapter()
    bad.model_entity = platform_model(platform, {"model_name": "tiny", "learning_rate": -1})
    with pytest.raises(ClipAdapterFailure, match="learning_rate"):
        bad.load(str(tmp_path))


def test_embed_before_load_is_a_clear_error():
    with pytest.raises(ClipAdapterFailure, match="no model loaded"):
        ClipAdapter().embed([])


def test_adapter_without_model_entity_uses_defaults_and_given_name(tmp_path):
    adapter = ClipAdapter()
    adapter.configuration  # noqa: B018 - a fresh empty dict each access without an entity
    adapter.settings = adapter.settings.updated(model_name="tiny")
    assert adapter.settings.model_name == "tiny"


def test_convert_from_dtlpy_downloads_the_images_prompt_items_point_to(tmp_path, platform):
    """dtlpy's prepare_data ends with convert_from_dtlpy; prompt images live in other items, here
    on the fake platform."""
    from adapters.clip.exports import prompt_images_to_download
    from adapters.clip.manifests import load_pairs
    from test_data import export_with_bad_records
    from test_platform_contract import png_bytes

    export = tmp_path / "export"
    export_with_bad_records(export)
    missing = prompt_images_to_download(export)
    assert list(missing) == ["65f1c0a9e1b2c3d4e5f6bb99"]
    project = platform.add_project()
    images = platform.add_dataset(project["id"], "elsewhere")
    platform.add_item(images["id"], "/the-image.png", png_bytes(5), "image/png", item_id="65f1c0a9e1b2c3d4e5f6bb99")
    before = {p.caption for p in load_pairs(export).pairs}
    ClipAdapter().convert_from_dtlpy(str(export))
    assert prompt_images_to_download(export) == {}
    assert "GET /items/65f1c0a9e1b2c3d4e5f6bb99" in platform.requests
    after = {p.caption for p in load_pairs(export).pairs}
    assert "no image" in after - before


def test_convert_from_dtlpy_reports_an_image_it_cannot_fetch(tmp_path, platform, caplog):
    from test_data import export_with_bad_records

    export_with_bad_records(tmp_path / "export")  # its prompt image is on no platform: the gate answers 404
    with caplog.at_level("WARNING", logger="ModelAdapter"):
        ClipAdapter().convert_from_dtlpy(str(tmp_path / "export"))  # does not raise: the rest still trains
    assert "prompt image 65f1c0a9e1b2c3d4e5f6bb99" in caplog.text and "NotFound" in caplog.text


def test_evaluate_scores_the_datasets_captioned_items_and_reports_metrics(tmp_path, platform):
    """ClipAdapter.evaluate as dtlpy's evaluate_model calls it, on a caption dataset on the fake
    platform; the metrics it sends are the library's evaluate_pairs of the same pairs."""
    import dtlpy as dl

    from adapters.clip.evaluate import evaluate_pairs
    from adapters.clip.pairs import CaptionPair
    from test_platform_contract import caption_dataset

    dataset_record = caption_dataset(platform, platform.add_project(), n_train=0, n_val=8)
    model = platform_model(platform, {"model_name": "tiny", "batch_size": 4})
    adapter = ClipAdapter()
    adapter.model_entity = model
    adapter.load(str(tmp_path / "no-artifacts"))
    dataset = dl.datasets.get(dataset_id=dataset_record["id"])
    assert adapter.evaluate(model, dataset, filters=None) is model

    pairs = []
    for item in platform.dataset_items(dataset_record["id"]):
        prompt = json.loads(platform.binaries[item["id"]])
        image_id = prompt["prompts"]["1"][0]["value"].split("/items/")[1].split("/")[0]
        image = tmp_path / f"{image_id}.png"
        image.write_bytes(platform.binaries[image_id])
        (caption,) = platform.item_annotations(item["id"])
        pairs.append(CaptionPair(image=image, caption=caption["coordinates"], subset="validation"))
    expected = evaluate_pairs(adapter.clip, pairs)
    reported = {m["figure"].removeprefix("evaluation: "): m["data"] for m in platform.metrics}
    assert expected["pairs"] == 8
    for key in ("t2i_r1", "i2t_r1", "t2i_r5", "mean_recall"):
        assert reported[key] == {"x": 0, "y": pytest.approx(expected[key])}
    assert {(m["modelId"], m["legend"]) for m in platform.metrics} == {(model.id, "caption-prompts")}
