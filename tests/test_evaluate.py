"""Retrieval evaluation with the real tiny open_clip model on real image files, and `eval`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.clip.cli import main
from adapters.clip.manifests import write_manifest
from adapters.clip.pairs import CaptionPair, DataProblem
from adapters.clip.embed import Embedder
from adapters.clip.evaluate import (EvalData, class_embeddings, evaluate_embeddings, evaluate_pairs)
from adapters.clip.metrics import retrieval_metrics, zero_shot_accuracy

from conftest import pattern_image

COLOURS = ("red", "green", "blue")


@pytest.fixture
def pairs(tmp_path) -> list[CaptionPair]:
    """6 images in 3 classes; each has its own caption and shares its class's template caption."""
    out = []
    for n in range(6):
        label = COLOURS[n % 3]
        path = tmp_path / "imgs" / label / f"{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pattern_image(n).save(path)
        out.append(CaptionPair(path, f"picture number {n} in {label}", "validation", label, source=f"m.jsonl:{n}"))
        out.append(CaptionPair(path, f"a photo of a {label}", "validation", label))
    return out


def test_eval_data_groups_images_and_identical_captions(pairs):
    data = EvalData.from_pairs(pairs + [CaptionPair(pairs[0].image, "  A PHOTO of a   red ", "validation", "red")])
    assert len(data.images) == 6 and data.n_pairs == 13
    assert len(data.captions) == 9                   # 6 own captions + 3 shared class captions
    shared = data.captions.index("a photo of a red")
    assert data.caption_images[shared] == [0, 3]     # both red images are correct for it
    fewer = data.without_images({0})
    assert len(fewer.images) == 5 and "picture number 0 in red" not in fewer.captions
    assert fewer.caption_images[fewer.captions.index("a photo of a red")] == [2]  # image 3, re-indexed


def test_evaluate_pairs_equals_metrics_on_embedder_vectors(tiny, pairs):
    result = evaluate_pairs(tiny, pairs, batch_size=4)
    data = EvalData.from_pairs(pairs)
    embedder = Embedder(tiny, batch_size=4)
    images = embedder.embed_images(data.images).vectors
    texts = embedder.embed_texts(data.captions).vectors
    expected = retrieval_metrics(images, texts, data.caption_images)
    assert {k: result[k] for k in expected} == pytest.approx(expected, abs=1e-6)
    classes = class_embeddings(tiny, ["blue", "green", "red"], ["a photo of a {}."])
    labels = [["blue", "green", "red"].index(label) for label in data.image_labels]
    assert result["zero_shot_accuracy"] == pytest.approx(zero_shot_accuracy(images, classes, labels))
    assert (result["images"], result["texts"], result["pairs"], result["failed_images"],
            result["zero_shot_classes"]) == (6, 9, 12, 0, 3)


def test_templates_are_averaged_per_class(tiny):
    one = class_embeddings(tiny, ["cat"], ["a photo of a {}."])
    two = class_embeddings(tiny, ["cat"], ["a photo of a {}.", "a drawing of a {}."])
    texts = Embedder(tiny).embed_texts(["a photo of a cat.", "a drawing of a cat."]).vectors
    mean = texts.mean(axis=0)
    assert np.allclose(two[0], mean / np.linalg.norm(mean), atol=1e-6)
    assert not np.allclose(one, two, atol=1e-3)
    assert np.allclose(np.linalg.norm(two, axis=1), 1.0, atol=1e-6)


def test_images_that_fail_to_load_are_reported_and_excluded(tiny, pairs, tmp_path):
    broken = tmp_path / "imgs" / "broken.png"
    broken.write_bytes(b"not a png at all")
    bad = [CaptionPair(broken, "a caption only the broken image has", "validation", "red", source="m.jsonl:99")]
    problems: list[DataProblem] = []
    result = evaluate_pairs(tiny, pairs + bad, on_problem=problems.append)
    assert [p.source for p in problems] == ["m.jsonl:99"] and "not an image" in problems[0].reason
    assert (result["images"], result["texts"], result["failed_images"]) == (6, 9, 1)
    clean = evaluate_pairs(tiny, pairs)
    assert {k: result[k] for k in clean if k != "failed_images"} == pytest.approx(
        {k: clean[k] for k in clean if k != "failed_images"})


def test_eval_data_keeps_preprocessed_pixels_between_calls(tiny, pairs):
    data = EvalData.from_pairs(pairs)
    first = evaluate_pairs(tiny, data)
    for image in data.images:  # the second call must not need the files any more
        Path(image).unlink()
    assert evaluate_pairs(tiny, data) == first
    with pytest.raises(ValueError, match="all 6 images failed"):
        evaluate_pairs(tiny, data, cache_pixels=False, on_problem=lambda p: None)


def test_evaluate_embeddings_skips_unlabelled_images_for_zero_shot():
    eye = np.eye(4, dtype=np.float32)
    result = evaluate_embeddings(eye, eye, np.arange(4), class_emb=eye[:2], image_labels=[0, 1, -1, -1])
    assert result["t2i_r1"] == 1.0 and result["zero_shot_accuracy"] == 1.0
    assert "zero_shot_accuracy" not in evaluate_embeddings(eye, eye, np.arange(4))


def test_eval_command_compares_models_side_by_side(tiny, pairs, tmp_path, capsys):
    from adapters.clip.models import load_model, save_checkpoint

    manifest = tmp_path / "m.jsonl"
    write_manifest(pairs, manifest)
    other = load_model("tiny", device="cpu")
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(other, tmp_path / "perturbed")
    assert main(["eval", "--model", "tiny", "--model", str(tmp_path / "perturbed"), "--data", str(manifest),
                 "--json", "--workers", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["subset"] == "validation" and list(report["models"]) == ["tiny", str(tmp_path / "perturbed")]
    a, b = report["models"].values()
    assert a["images"] == b["images"] == 6 and "zero_shot_accuracy" in a
    assert a != b  # really two different models
    assert main(["eval", "--model", "tiny", "--model", "tiny", "--data", str(manifest)]) == 0
    table = capsys.readouterr().out
    assert "text->image R@1" in table and "tiny #2" in table and "zero-shot accuracy" in table
    assert main(["eval", "--data", str(manifest)]) == 2
    assert main(["eval", "--model", "tiny", "--data", str(manifest), "--subset", "train"]) == 1
    assert "no pairs in subset 'train'" in capsys.readouterr().err


def test_models_with_the_same_preprocessing_share_cached_pixels(tiny, pairs):
    from adapters.clip.models import load_model

    data = EvalData.from_pairs(pairs)
    evaluate_pairs(tiny, data)
    for image in data.images:
        Path(image).unlink()
    other = load_model("tiny", device="cpu")  # a second model object, same eval transform settings
    assert evaluate_pairs(other, data)["failed_images"] == 0


def test_nothing_to_evaluate_is_a_typed_data_error(tiny):
    from adapters.clip.errors import ClipAdapterError

    with pytest.raises(ClipAdapterError, match="nothing to evaluate: no caption pairs"):
        evaluate_pairs(tiny, [])
