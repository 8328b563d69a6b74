"""Zero-shot predict: the library's classifier against the model's own forward pass, and
ClipAdapter.predict through dtlpy's real `predict_items` against the fake platform
(tests/fake_dataloop): items download from it, the annotations (with the prediction metadata
dtlpy's own `_update_predictions_metadata` fills in) land on it and are read back from it.
"""
from __future__ import annotations

import json

import dtlpy as dl
import numpy as np
import pytest
import torch

from adapters.clip.classify import ZeroShotClassifier, logit_scale_of, parse_labels
from adapters.clip.cli import main
from adapters.clip.embed import Embedder
from adapters.clip.errors import InputError
from adapters.clip_adapter import ClipAdapter, ClipAdapterFailure
from conftest import pattern_image
from dataloop_fakes import platform_model

LABELS = ["red square", "green circle", "blue sky", "a dog"]


# ---- the classifier -----------------------------------------------------------------------------
def test_probabilities_are_the_models_own_softmax_of_scaled_logits(tiny, tmp_path):
    """One template: CLIP's forward pass gives image/text features and the logit scale directly."""
    images = [pattern_image(i) for i in range(3)]
    classifier = ZeroShotClassifier(Embedder(tiny, num_workers=0), LABELS, ["a photo of a {}."])
    results = classifier.classify(images, top_k=len(LABELS))
    pixels = torch.stack([tiny.preprocess(image) for image in images])
    tokens = tiny.tokenizer([f"a photo of a {label}." for label in LABELS])
    with torch.no_grad():
        image_features, text_features, scale = tiny.model(pixels, tokens)
        reference = (scale * image_features @ text_features.T).softmax(dim=-1).numpy()
    for result, row in zip(results, reference):
        got = {s.label: s.score for s in result.labels}
        np.testing.assert_allclose([got[label] for label in LABELS], row, atol=1e-5)
        assert [s.score for s in result.labels] == sorted(got.values(), reverse=True)
    assert logit_scale_of(tiny) == pytest.approx(float(scale))


def test_templates_are_averaged_into_one_class_vector(tiny):
    embedder = Embedder(tiny, num_workers=0)
    templates = ["a photo of a {}.", "a drawing of a {}.", "{}"]
    classifier = ZeroShotClassifier(embedder, ["cat", "dog"], templates)
    prompts = embedder.embed_texts([t.format("dog") for t in templates]).vectors
    expected = prompts.mean(axis=0) / np.linalg.norm(prompts.mean(axis=0))
    np.testing.assert_allclose(classifier.class_vectors[1], expected, atol=1e-6)


def test_unreadable_images_get_an_error_not_a_label(tiny, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"no image here")
    results = ZeroShotClassifier(Embedder(tiny, num_workers=0), "cat,dog").classify([pattern_image(0), broken])
    assert results[0].ok and len(results[0].labels) == 1
    assert not results[1].ok and results[1].labels == [] and "image" in results[1].error


@pytest.mark.parametrize("labels, message", [("cat,,dog", "non-empty"), ("cat,dog,cat", "duplicate")])
def test_bad_labels_are_clear_errors(labels, message):
    with pytest.raises(InputError, match=message):
        parse_labels(labels)


# ---- the adapter through dtlpy --------------------------------------------------------------------
def make_adapter(platform, configuration: dict, labels=None) -> ClipAdapter:
    """An adapter as a deployed service builds it: from a model on the platform (load_from_model)."""
    model = platform_model(platform, {"model_name": "tiny", "device": "cpu", "batch_size": 3, **configuration},
                           labels=labels, output_type="class")
    return ClipAdapter(model_entity=model)


@pytest.fixture
def items(platform, tmp_path):
    """Three images, a text and a broken JPEG on the platform (the images also in tmp_path)."""
    for i in range(3):
        pattern_image(i).save(tmp_path / f"photo {i}.png")
    files = [(tmp_path / "photo 0.png", "image/png"), (tmp_path / "note.txt", "text/plain"),
             (tmp_path / "photo 1.png", "image/png"), (tmp_path / "broken.jpg", "image/jpeg"),
             (tmp_path / "photo 2.png", "image/png")]
    (tmp_path / "note.txt").write_text("a caption, not an image")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    dataset = platform.add_dataset(platform.add_project()["id"], "predict")
    return [dl.items.get(item_id=platform.add_item(dataset["id"], "/" + path.name, path.read_bytes(), mimetype)["id"])
            for path, mimetype in files]


IMAGES = (0, 2, 4)  # the positions of the three images in `items`


def test_predict_items_labels_each_image_from_the_model_labels(platform, tmp_path, items):
    adapter = make_adapter(platform, {}, labels=LABELS)
    returned, annotations = adapter.predict_items(items)
    assert [it.id for it in returned] == [it.id for it in items]
    assert [len(platform.item_annotations(it.id)) for it in items] == [1, 0, 1, 0, 1]
    assert len(annotations) == 3
    expected = ZeroShotClassifier(adapter.embedder, LABELS).classify(
        [tmp_path / f"photo {i}.png" for i in range(3)])
    for position, reference in zip(IMAGES, expected):
        (annotation,) = platform.item_annotations(items[position].id)
        assert annotation["type"] == "class" and annotation["label"] == reference.labels[0].label
        model = annotation["metadata"]["system"]["model"]  # filled in by dtlpy's own code
        assert model["name"] == adapter.model_entity.name
        assert model["confidence"] == pytest.approx(reference.labels[0].score)
        assert annotation["metadata"]["user"]["model"]["confidence"] == pytest.approx(reference.labels[0].score)


def test_configuration_labels_and_top_k_when_the_entity_has_none(platform, items):
    adapter = make_adapter(platform, {"labels": ["cat", "dog", "car"], "top_k": 2,
                                      "prompt_templates": ["a photo of a {}.", "a picture of a {}."]})
    adapter.predict_items(items)
    for position in IMAGES:
        labels = platform.item_annotations(items[position].id)
        assert len(labels) == 2 and {a["label"] for a in labels} <= {"cat", "dog", "car"}
        confidences = [a["metadata"]["system"]["model"]["confidence"] for a in labels]  # in upload order
        assert confidences == sorted(confidences, reverse=True) and sum(confidences) <= 1.0 + 1e-6


def test_predict_without_any_labels_gives_no_annotations_and_one_warning(platform, items, caplog):
    """dtlpy's evaluate_model predicts before it evaluates: a model without labels (every model in
    dataloop.json) must come through with nothing predicted, not a failed batch."""
    adapter = make_adapter(platform, {})
    caplog.clear()
    with caplog.at_level("WARNING", logger="ModelAdapter"):
        first, second = adapter.predict(items[:3]), adapter.predict(items[3:])
    assert [len(c) for c in first + second] == [0] * len(items)
    assert all(isinstance(c, dl.AnnotationCollection) for c in first + second)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "'labels' configuration key" in warned[0]


# ---- the command line ------------------------------------------------------------------------------
def test_classify_command_prints_json_and_draws_a_sheet(tmp_path, capsys):
    good = [tmp_path / f"p{i}.png" for i in range(2)]
    for i, path in enumerate(good):
        pattern_image(i).save(path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    sheet = tmp_path / "labels.png"
    code = main(["classify", str(good[0]), str(good[1]), str(broken), "--labels", "red, green,blue",
                 "--model", "tiny", "--device", "cpu", "-k", "2", "--json", "--sheet", str(sheet)])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows] == [str(p) for p in good + [broken]]
    for row in rows[:2]:
        assert row["error"] is None and len(row["labels"]) == 2
        assert {entry["label"] for entry in row["labels"]} <= {"red", "green", "blue"}
    assert rows[2]["labels"] == [] and rows[2]["error"]
    assert sheet.stat().st_size > 0
    assert main(["classify", str(good[0]), "--labels", "a,a", "--model", "tiny"]) == 1
    assert "duplicate labels" in capsys.readouterr().err
