"""Dataset preparation: the local `prepare` command (folder -> manifest with a split by image) and
utils/prepare_dataset.py's pure part (image items -> prompt items with captions and subsets).

The platform calls of utils/prepare_dataset.py (upload, annotate) need a Dataloop server and are
not run here; what they upload is built and checked by the pure functions tested below, against
dtlpy's own serialisers offline.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.clip.cli import main
from adapters.clip.exports import read_export
from adapters.clip.folders import prepare_folder
from adapters.clip.items import caption_annotation_json
from adapters.clip.manifests import load_pairs
from adapters.clip.splits import split_by_image
from adapters.clip.errors import DataError
from utils.prepare_dataset import (PromptItemPlan, caption_for_item, directory_name, plan_prompt_item,
                                   plan_prompt_items)

from conftest import pattern_image


def make_folder(root: Path, classes: dict[str, int]) -> Path:
    seed = 0
    for name, count in classes.items():
        for i in range(count):
            path = root / name / f"img{i:02d}.png" if name else root / f"img{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pattern_image(seed, size=(16, 16)).save(path)
            seed += 1
    return root


# ---- local folders -----------------------------------------------------------------------
def test_captions_from_sidecars_csv_and_directory_template(tmp_path):
    root = make_folder(tmp_path / "photos", {"golden_retriever": 3, "tabby-cat": 2})
    pattern_image(99, size=(16, 16)).save(root / "tabby-cat" / "unique.png")
    (root / "golden_retriever/img00.txt").write_text("a dog on grass\n\n  a golden dog  \n")
    (tmp_path / "captions.csv").write_text(
        "filename,description\ngolden_retriever/img01.png,a dog fetching a ball\nunique.png,a sleeping cat\n"
        "tabby-cat/img01.png,a cat on a wall\ntabby-cat/img01.png,a striped cat\n"
        "img00.png,ambiguous name\nmissing.png,no such image\n")
    result = prepare_folder(root, val=0.0, captions_csv=tmp_path / "captions.csv", template="a picture of {}")
    got = {(p.source, p.caption) for p in result.pairs}
    assert got == {
        ("golden_retriever/img00.png", "a dog on grass"),                  # sidecar, one caption per line
        ("golden_retriever/img00.png", "a golden dog"),
        ("golden_retriever/img01.png", "a dog fetching a ball"),           # CSV by relative path
        ("golden_retriever/img02.png", "a picture of golden retriever"),   # directory through the template
        ("tabby-cat/img00.png", "a picture of tabby cat"),
        ("tabby-cat/unique.png", "a sleeping cat"),                        # CSV by a unique file name
        ("tabby-cat/img01.png", "a cat on a wall"), ("tabby-cat/img01.png", "a striped cat"),
    }
    assert {p.label for p in result.pairs} == {"golden_retriever", "tabby-cat"}
    assert all(p.subset == "train" for p in result.pairs)
    problems = {p.source: p.reason for p in result.problems}
    assert "matches 2 images" in problems["captions.csv: img00.png"]
    assert "matches no image" in problems["captions.csv: missing.png"]


def test_split_is_by_image_deterministic_and_stratified(tmp_path):
    root = make_folder(tmp_path / "f", {"a": 10, "b": 5, "c": 2, "d": 1})
    for i in range(10):  # several captions per image must never straddle the split
        (root / f"a/img{i:02d}.txt").write_text("one\ntwo\nthree\n")
    first = prepare_folder(root, val=0.2, seed=0)
    again = prepare_folder(root, val=0.2, seed=0)
    other = prepare_folder(root, val=0.2, seed=1)
    assign = {p.source: p.subset for p in first.pairs}
    assert assign == {p.source: p.subset for p in again.pairs}
    assert assign != {p.source: p.subset for p in other.pairs}
    subsets_per_image: dict[str, set] = {}
    for p in first.pairs:
        subsets_per_image.setdefault(p.source, set()).add(p.subset)
    assert all(len(s) == 1 for s in subsets_per_image.values())
    val_per_dir = {d: sum(1 for s, sub in assign.items() if s.startswith(d + "/") and sub == "validation")
                   for d in "abcd"}
    assert val_per_dir == {"a": 2, "b": 1, "c": 1, "d": 0}   # round(n*0.2), >= 1 when n >= 2, never all


def test_split_does_not_depend_on_listing_order_and_adding_images_moves_few():
    images = {f"cls/{i}.png": "cls" for i in range(200)}
    forward = split_by_image(images, val=0.25, seed=3)
    backward = split_by_image(dict(reversed(list(images.items()))), val=0.25, seed=3)
    assert forward == backward
    assert sum(v == "validation" for v in forward.values()) == 50
    grown = split_by_image({**images, **{f"cls/new{i}.png": "cls" for i in range(10)}}, val=0.25, seed=3)
    moved = sum(forward[k] != grown[k] for k in images)
    assert moved <= 10


def test_existing_train_and_validation_folders_are_kept(tmp_path):
    root = make_folder(tmp_path / "f", {"train/cat": 3, "train/dog": 2, "val/cat": 1, "validation/dog": 1})
    result = prepare_folder(root, val=0.5, seed=0)
    assert sorted((p.source, p.subset, p.label, p.caption) for p in result.pairs)[:2] == [
        ("train/cat/img00.png", "train", "cat", "a photo of a cat"),
        ("train/cat/img01.png", "train", "cat", "a photo of a cat")]
    assert sorted(p.source for p in result.subset("validation")) == ["val/cat/img00.png", "validation/dog/img00.png"]


def test_images_without_any_caption_are_reported(tmp_path):
    root = make_folder(tmp_path / "f", {"": 2, "cat": 2})
    (root / "img00.txt").write_text("a caption from a sidecar")
    result = prepare_folder(root, val=0.0)
    assert [p.source for p in result.problems] == ["img01.png"]
    assert "no caption" in result.problems[0].reason
    assert len(result.pairs) == 3
    with pytest.raises(DataError, match="validation fraction"):
        prepare_folder(root, val=1.5)
    with pytest.raises(DataError, match="no images"):
        (tmp_path / "empty").mkdir()
        prepare_folder(tmp_path / "empty", val=0.2)
    with pytest.raises(DataError, match="not a folder"):
        prepare_folder(tmp_path / "missing", val=0.2)


def test_broken_images_are_reported_and_left_out(tmp_path):
    root = make_folder(tmp_path / "f", {"cat": 4, "dog": 4})
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "notes.jpg").write_text("this is text, not a photo")
    whole = (root / "dog" / "img00.png").read_bytes()
    (root / "dog" / "cut.png").write_bytes(whole[:len(whole) // 2])
    result = prepare_folder(root, val=0.25)
    reasons = {p.source: p.reason for p in result.problems}
    assert set(reasons) == {"cat/empty.jpg", "cat/notes.jpg", "dog/cut.png"}
    assert "empty" in reasons["cat/empty.jpg"] and "not an image" in reasons["cat/notes.jpg"]
    assert "truncated" in reasons["dog/cut.png"]
    assert len(result.pairs) == 8 and not {p.source for p in result.pairs} & set(reasons)


def test_byte_identical_copies_stay_on_one_side_of_the_split(tmp_path):
    root = make_folder(tmp_path / "f", {"cat": 6, "dog": 6})
    for i in range(6):  # the same photos again, under other names and in the other class
        (root / "dog" / f"copy{i}.png").write_bytes((root / "cat" / f"img{i:02d}.png").read_bytes())
    for seed in range(8):
        subsets = {p.source: p.subset for p in prepare_folder(root, val=0.3, seed=seed).pairs}
        assert "validation" in subsets.values()
        for i in range(6):
            assert subsets[f"dog/copy{i}.png"] == subsets[f"cat/img{i:02d}.png"], (seed, i)
    fixed = make_folder(tmp_path / "g", {"train/cat": 2, "validation/cat": 1})
    (fixed / "validation" / "cat" / "leak.png").write_bytes((fixed / "train" / "cat" / "img00.png").read_bytes())
    result = prepare_folder(fixed)
    assert [(p.source, p.reason) for p in result.problems] == [
        ("validation/cat/leak.png", "the same bytes as train/cat/img00.png, in another subset: left out")]


def test_prepare_command_writes_a_manifest_that_loads(tmp_path, capsys):
    root = make_folder(tmp_path / "f", {"red": 5, "blue": 5})
    out = tmp_path / "out" / "manifest.jsonl"
    assert main(["prepare", str(root), "--out", str(out), "--val", "0.2", "--seed", "0",
                 "--template", "a {} shape"]) == 0
    assert "wrote 10 pairs" in capsys.readouterr().out
    first_line = json.loads(out.read_text().splitlines()[0])
    assert first_line["image"].startswith("../f/") and first_line["caption"] in ("a red shape", "a blue shape")
    loaded = load_pairs(out)
    assert loaded.counts() == {"train": {"pairs": 8, "images": 8}, "validation": {"pairs": 2, "images": 2}}
    assert main(["prepare", str(root), "--out", str(out), "--template", "no slot"]) == 2
    assert main(["prepare", str(root), "--out", str(out), "--val", "1"]) == 2
    (root / "stray.png").write_bytes(b"")  # an image with no directory and no caption
    assert main(["prepare", str(root), "--out", str(tmp_path / "s.jsonl"), "--strict"]) == 1
    assert "stray.png" in capsys.readouterr().err


# ---- utils/prepare_dataset.py: image items -> prompt items -------------------------------
def exported_image(item_id, filename, description=None, subset=None) -> dict:
    item = {"id": item_id, "name": Path(filename).name, "filename": filename, "dir": str(Path(filename).parent),
            "type": "file", "datasetId": "65f1c0a9e1b2c3d4e5f60718",
            "stream": f"https://gate.dataloop.ai/api/v1/items/{item_id}/stream",
            "metadata": {"system": {"mimetype": "image/jpeg", "originalname": Path(filename).name, "size": 2048}}}
    if description is not None:
        item["description"] = description
    if subset:
        item["metadata"]["system"]["tags"] = {"train": None, "validation": None, "test": None, subset: True}
    return item


def test_caption_from_description_else_directory_name():
    assert caption_for_item(exported_image("a" * 24, "/cats/x.jpg", "A cat asleep")) == ("A cat asleep", "description")
    assert caption_for_item(exported_image("a" * 24, "/pets/golden_retriever/x.jpg"), "a photo of a {}") == (
        "a photo of a golden retriever", "directory")
    assert caption_for_item(exported_image("a" * 24, "/x.jpg")) == (None, "")
    assert directory_name(exported_image("a" * 24, "/pets/dogs/x.jpg")) == "dogs"


def test_plan_builds_the_prompt_item_dtlpy_would_and_keeps_the_subset():
    import dtlpy as dl

    source = exported_image("65f1c0a9e1b2c3d4e5f60001", "/cats/cat 1.jpg", subset="validation")
    # round-trip through the real SDK entity, as the platform function hands us item.to_json()
    item_json = dl.Item.from_json(_json=source, client_api=dl.client_api, is_fetched=False).to_json()
    plan = plan_prompt_item(item_json)
    expected = dl.PromptItem(name="cat 1.json")
    expected.add(message={"content": [{"mimetype": dl.PromptType.IMAGE, "value": source["stream"]}]})
    assert plan.prompt == expected.to_json()
    assert (plan.name, plan.remote_path, plan.caption, plan.caption_source, plan.subset) == (
        "cat 1.json", "/cats", "a photo of a cats", "directory", "validation")
    assert plan.metadata["system"]["tags"] == {"train": None, "validation": True, "test": None}
    assert plan.metadata["user"]["label"] == "cats"


def test_plan_many_reports_non_images_and_renames_clashes():
    items = [exported_image("65f1c0a9e1b2c3d4e5f60001", "/cats/x.jpg", "first"),
             exported_image("65f1c0a9e1b2c3d4e5f60002", "/cats/x.png", "second"),
             {**exported_image("65f1c0a9e1b2c3d4e5f60003", "/docs/readme.txt"),
              "metadata": {"system": {"mimetype": "text/plain"}}},
             exported_image("65f1c0a9e1b2c3d4e5f60004", "/root.jpg")]
    plans, problems = plan_prompt_items(items)
    assert [p.name for p in plans] == ["x.json", "x-65f1c0a9e1b2c3d4e5f60002.json"]
    assert [(p.source, p.reason) for p in problems] == [
        ("item 65f1c0a9e1b2c3d4e5f60003 (/docs/readme.txt)", "not an image item"),
        ("item 65f1c0a9e1b2c3d4e5f60004 (/root.jpg)", "no description and no directory name to caption it with")]


def test_prompt_items_as_exported_after_upload_train_with_their_captions(tmp_path):
    """Close the loop: what prepare_dataset uploads, exported by prepare_data, reads back for training."""
    images = [exported_image(f"65f1c0a9e1b2c3d4e5f6000{i}", f"/shapes/s{i}.jpg", f"shape number {i}",
                             "train" if i < 3 else "validation") for i in range(4)]
    plans, problems = plan_prompt_items(images)
    assert problems == []
    for n, plan in enumerate(plans):
        subset = plan.subset
        rel = f"{plan.remote_path.strip('/')}/{plan.name}"
        (tmp_path / subset / "items" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / subset / "items" / rel).write_text(json.dumps(plan.prompt))
        exported = {"id": f"65f1c0a9e1b2c3d4e5f6100{n}", "name": plan.name, "filename": "/" + rel,
                    "dir": plan.remote_path, "type": "file",
                    "metadata": {"system": {"mimetype": "application/json", "shebang": {"dltype": "prompt"},
                                            **plan.metadata.get("system", {})}, "user": plan.metadata["user"]},
                    "annotations": [caption_annotation_json(plan.caption, "1")], "annotationsCount": 1}
        (tmp_path / subset / "json" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / subset / "json" / rel).write_text(json.dumps(exported))
        # the referenced image, where the adapter's download step puts it
        (tmp_path / "prompt_images").mkdir(exist_ok=True)
        pattern_image(n, size=(16, 16)).save(tmp_path / "prompt_images" / f"{plan.source_item_id}.jpg")
    result = read_export(tmp_path)
    assert result.problems == []
    assert sorted((p.subset, p.caption, p.label) for p in result.pairs) == [
        ("train", "shape number 0", "shapes"), ("train", "shape number 1", "shapes"),
        ("train", "shape number 2", "shapes"), ("validation", "shape number 3", "shapes")]
    assert isinstance(plans[0], PromptItemPlan)
