"""Caption pairs from Dataloop exports (both layouts) and manifests.

The item JSON below is modelled on real Dataloop exports (ids, filename/dir, metadata.system
with mimetype, shebang and description, `free-text` text annotations with promptId). One test
checks the fixtures against dtlpy's own serialisers offline, so they cannot drift from the SDK.
The Dataloop server is never involved: exports are files written here, as prepare_data would.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.clip.cli import main
from adapters.clip.exports import find_export_subsets, prompt_images_to_download, read_export, write_export
from adapters.clip.manifests import convert_export, load_pairs, read_manifest, write_manifest
from adapters.clip.pairs import CaptionPair, DataProblem, PairSet
from adapters.clip.prompt_images import prompt_image_target
from adapters.clip.errors import DataError

from conftest import pattern_image

DATASET_ID = "65f1c0a9e1b2c3d4e5f60718"
IMAGES_DATASET_ID = "65f1c0a9e1b2c3d4e5f60799"


# ---- realistic exported items ------------------------------------------------------------
def image_item(item_id: str, filename: str, description=None, annotations=(), tags=None,
               description_at="top") -> dict:
    """description_at: 'top' (dtlpy 1.126's `description`) or 'system' (`metadata.system.description`,
    what the earlier adapter read)."""
    system = {"originalname": Path(filename).name, "size": 5123, "encoding": "7bit", "mimetype": "image/png",
              "refs": [], "height": 64, "width": 64, "isBinary": True}
    if description is not None and description_at == "system":
        system["description"] = description
    if tags is not None:
        system["tags"] = tags
    extra = {"description": description} if description is not None and description_at == "top" else {}
    return {**extra, "id": item_id, "datasetId": DATASET_ID, "createdAt": "2024-03-13T15:20:41.000Z",
            "dir": str(Path(filename).parent), "filename": filename, "type": "file", "hidden": False,
            "name": Path(filename).name, "metadata": {"system": system, "user": {}},
            "url": f"https://gate.dataloop.ai/api/v1/items/{item_id}",
            "stream": f"https://gate.dataloop.ai/api/v1/items/{item_id}/stream",
            "annotated": bool(annotations), "annotationsCount": len(annotations), "annotations": list(annotations)}


def prompt_item(item_id: str, filename: str, captions=(), tags=None) -> dict:
    item = image_item(item_id, filename, annotations=[free_text(c, f"{item_id[:-4]}a{n:03d}") for n, c in
                                                      enumerate(captions)], tags=tags)
    item["metadata"]["system"].update({"mimetype": "application/json", "shebang": {"dltype": "prompt"}})
    for key in ("height", "width"):
        item["metadata"]["system"].pop(key)
    return item


def free_text(text, annotation_id="65f1c0a9e1b2c3d4e5f6a001", prompt_id="1") -> dict:
    return {"id": annotation_id, "datasetId": DATASET_ID, "itemId": "x", "type": "text", "label": "free-text",
            "attributes": [], "coordinates": text, "metadata": {"system": {"promptId": prompt_id, "automated": False,
                                                                          "attributes": {}}, "user": {}},
            "creator": "annotator@example.com", "createdAt": "2024-03-13T15:22:10.000Z",
            "updatedBy": "annotator@example.com", "updatedAt": "2024-03-13T15:22:10.000Z", "source": "ui",
            "hash": "", "url": f"https://gate.dataloop.ai/api/v1/annotations/{annotation_id}"}


def prompt_file(image_ref: str) -> dict:
    return {"shebang": "dataloop", "metadata": {"dltype": "prompt"},
            "prompts": {"1": [{"mimetype": "image/*", "value": image_ref},
                              {"mimetype": "metadata", "value": {"role": "user"}}]}}


def stream(item_id: str) -> str:
    return f"https://gate.dataloop.ai/api/v1/items/{item_id}/stream"


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def write_png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pattern_image(seed).save(path)
    return path


def dtlpy_export(root: Path) -> Path:
    """dtlpy's default prepare_data layout: <root>/datasets/<id>/<subset>/{items,json}/..."""
    data = root / "datasets" / DATASET_ID
    # train: an image item with a description, and a prompt item with two captions whose image
    # lies in prompt_images/<referenced id>.png (as the adapter's download step leaves it)
    write_png(data / "train/items/cats/cat1.png", 1)
    write_json(data / "train/json/cats/cat1.json",
               image_item("65f1c0a9e1b2c3d4e5f60001", "/cats/cat1.png", description="  a tabby cat on a sofa ",
                          description_at="system"))
    write_json(data / "train/items/prompts/p1.json", prompt_file(stream("65f1c0a9e1b2c3d4e5f6bb01")))
    write_json(data / "train/json/prompts/p1.json",
               prompt_item("65f1c0a9e1b2c3d4e5f60002", "/prompts/p1.json", ["a red circle", "a round red shape"]))
    write_png(data / "prompt_images/65f1c0a9e1b2c3d4e5f6bb01.png", 2)
    # validation: a prompt item whose image is next to it with the same stem (earlier adapter)
    write_json(data / "validation/items/prompts/p2.json", prompt_file(stream("65f1c0a9e1b2c3d4e5f6bb02")))
    write_png(data / "validation/items/prompts/p2.jpg", 3)
    write_json(data / "validation/json/prompts/p2.json",
               prompt_item("65f1c0a9e1b2c3d4e5f60003", "/prompts/p2.json", ["a blue square"]))
    return data


# ---- dtlpy default layout ----------------------------------------------------------------
def test_dtlpy_layout_reads_descriptions_and_prompt_captions(tmp_path):
    data = dtlpy_export(tmp_path)
    result = load_pairs(tmp_path)  # the model_data root: datasets/<id>/... is found
    assert result.problems == []
    got = sorted((p.subset, p.caption, p.image.name) for p in result.pairs)
    assert got == [("train", "a red circle", "65f1c0a9e1b2c3d4e5f6bb01.png"),
                   ("train", "a round red shape", "65f1c0a9e1b2c3d4e5f6bb01.png"),
                   ("train", "a tabby cat on a sofa", "cat1.png"),
                   ("validation", "a blue square", "p2.jpg")]
    assert all(p.image.is_absolute() and p.image.is_file() for p in result.pairs)
    assert len(result.subset("train")) == 3 and {p.image for p in result.subset("train")}.__len__() == 2
    cat = next(p for p in result.pairs if p.image.name == "cat1.png")
    assert cat.metadata["item_id"] == "65f1c0a9e1b2c3d4e5f60001"
    assert "train/json/cats/cat1.json" in cat.source
    # the data_path itself (what ClipAdapter.train receives) reads the same
    assert sorted(p.caption for p in load_pairs(data).pairs) == sorted(p.caption for p in result.pairs)


def model_annotation(annotation: dict, where: str) -> dict:
    """What dtlpy uploads for a model: `metadata.system.model` (predict_items), or `metadata.user.model`
    (PromptItem.add with model_info: a model's reply on a prompt item)."""
    info = {"model_id": "65f1c0a9e1b2c3d4e5f6cc01", "name": "clip-vit-b32", "confidence": 0.9}
    annotation = json.loads(json.dumps(annotation))
    annotation["metadata"].setdefault(where, {})["model"] = info
    return annotation


def zero_shot_class(label: str) -> dict:
    return {"id": "65f1c0a9e1b2c3d4e5f6a0c1", "type": "class", "label": label, "coordinates": None,
            "metadata": {"system": {"model": {"model_id": "65f1c0a9e1b2c3d4e5f6cc01", "name": "clip-vit-b32",
                                              "confidence": 0.61}}, "user": {}}}


def test_model_annotations_are_never_captions_or_labels(tmp_path):
    human = free_text("a red circle", "65f1c0a9e1b2c3d4e5f6a011")
    reply = model_annotation(free_text("the model says: a pie", "65f1c0a9e1b2c3d4e5f6a012"), "user")
    predicted = model_annotation(free_text("a predicted caption", "65f1c0a9e1b2c3d4e5f6a013"), "system")
    # PromptItem.add without model_info writes metadata.user.model = None: still a human caption
    unattributed = free_text("a round red shape", "65f1c0a9e1b2c3d4e5f6a014")
    unattributed["metadata"]["user"]["model"] = None
    prompt = prompt_item("65f1c0a9e1b2c3d4e5f60002", "/prompts/p1.json")
    prompt["annotations"] = [reply, human, predicted, unattributed]
    write_json(tmp_path / "train/items/prompts/p1.json", prompt_file(stream("65f1c0a9e1b2c3d4e5f6bb01")))
    write_json(tmp_path / "train/json/prompts/p1.json", prompt)
    write_png(tmp_path / "prompt_images/65f1c0a9e1b2c3d4e5f6bb01.png", 2)
    # an image whose only class annotation is the zero-shot class a model just wrote
    write_png(tmp_path / "train/items/cats/cat1.png", 1)
    write_json(tmp_path / "train/json/cats/cat1.json",
               image_item("65f1c0a9e1b2c3d4e5f60001", "/cats/cat1.png", description="a tabby cat",
                          annotations=[zero_shot_class("dog")]))
    pairs = load_pairs(tmp_path).pairs
    assert sorted(p.caption for p in pairs) == ["a red circle", "a round red shape", "a tabby cat"]
    cat = next(p for p in pairs if p.caption == "a tabby cat")
    assert cat.label is None  # not the model's "dog"


def test_prompt_image_found_through_an_exported_image_item_with_the_referenced_id(tmp_path):
    # The prompt points at item ...0001, which is exported (as an image item) in this same folder.
    write_png(tmp_path / "train/items/cats/cat1.png", 1)
    write_json(tmp_path / "train/json/cats/cat1.json",
               image_item("65f1c0a9e1b2c3d4e5f60001", "/cats/cat1.png", description="a cat"))
    write_json(tmp_path / "validation/items/p.json", prompt_file(stream("65f1c0a9e1b2c3d4e5f60001")))
    write_json(tmp_path / "validation/json/p.json", prompt_item("65f1c0a9e1b2c3d4e5f60002", "/p.json", ["a cat again"]))
    result = read_export(tmp_path)
    prompt_pair = next(p for p in result.pairs if p.subset == "validation")
    assert prompt_pair.image.name == "cat1.png" and result.problems == []


def test_prompt_image_as_file_url_and_relative_path(tmp_path):
    image = write_png(tmp_path / "elsewhere/photo.png", 4)
    write_json(tmp_path / "train/items/a.json", prompt_file(image.as_uri()))
    write_json(tmp_path / "train/json/a.json", prompt_item("65f1c0a9e1b2c3d4e5f60010", "/a.json", ["via url"]))
    write_json(tmp_path / "train/items/b.json", prompt_file("../../elsewhere/photo.png"))
    write_json(tmp_path / "train/json/b.json", prompt_item("65f1c0a9e1b2c3d4e5f60011", "/b.json", ["via path"]))
    result = read_export(tmp_path)
    assert result.problems == []
    assert {p.image for p in result.pairs} == {image.resolve()}


def test_several_prompts_map_each_caption_to_its_prompt_image(tmp_path):
    a, b = write_png(tmp_path / "imgs/a.png", 1), write_png(tmp_path / "imgs/b.png", 2)
    prompt = {"shebang": "dataloop", "metadata": {"dltype": "prompt"},
              "prompts": {"1": [{"mimetype": "image/*", "value": a.as_uri()}],
                          "2": [{"mimetype": "image/*", "value": b.as_uri()}]}}
    write_json(tmp_path / "train/items/two.json", prompt)
    item = prompt_item("65f1c0a9e1b2c3d4e5f60020", "/two.json")
    item["annotations"] = [free_text("first image", prompt_id="1"), free_text("second image", prompt_id="2")]
    write_json(tmp_path / "train/json/two.json", item)
    got = {p.caption: p.image.name for p in read_export(tmp_path).pairs}
    assert got == {"first image": "a.png", "second image": "b.png"}


# ---- the earlier adapter's layout ----------------------------------------------------------
def test_legacy_layout_reads_export_lists(tmp_path):
    for subset, seed in (("train", 1), ("validation", 2)):
        write_png(tmp_path / f"{subset}/images/shapes/s{seed}.png", seed)
        write_json(tmp_path / f"{subset}/images/prompts/q{seed}.json", prompt_file(stream("65f1c0a9e1b2c3d4e5f6cc0" + str(seed))))
        write_png(tmp_path / f"{subset}/images/prompts/q{seed}.png", 10 + seed)  # downloaded next to its prompt
        write_json(tmp_path / f"{subset}/json/export.json", [
            image_item(f"65f1c0a9e1b2c3d4e5f6000{seed}", f"/shapes/s{seed}.png", description=f"shape {seed}",
                       description_at="system"),
            prompt_item(f"65f1c0a9e1b2c3d4e5f6100{seed}", f"/prompts/q{seed}.json", [f"prompt caption {seed}"]),
        ])
    result = read_export(tmp_path)
    assert result.problems == []
    assert sorted((p.subset, p.caption, p.image.name) for p in result.pairs) == [
        ("train", "prompt caption 1", "q1.png"), ("train", "shape 1", "s1.png"),
        ("validation", "prompt caption 2", "q2.png"), ("validation", "shape 2", "s2.png")]
    assert "export.json[1]" in next(p for p in result.pairs if p.caption == "prompt caption 1").source


def test_plain_download_takes_subsets_from_ml_subset_tags(tmp_path):
    for n, tags in enumerate([{"train": True, "validation": None, "test": None},
                              {"train": None, "validation": True, "test": None}, {}]):
        write_png(tmp_path / f"items/x{n}.png", n)
        write_json(tmp_path / f"json/x{n}.json",
                   image_item(f"65f1c0a9e1b2c3d4e5f6000{n}", f"/x{n}.png", description=f"caption {n}", tags=tags))
    assert find_export_subsets(tmp_path) == [(tmp_path, None)]
    result = read_export(tmp_path)
    assert [(p.caption, p.subset) for p in sorted(result.pairs, key=lambda p: p.caption)] == [
        ("caption 0", "train"), ("caption 1", "validation")]
    assert len(result.problems) == 1 and "no subset" in result.problems[0].reason


# ---- bad records -------------------------------------------------------------------------
def export_with_bad_records(root: Path) -> Path:
    write_png(root / "train/items/good.png", 1)
    write_json(root / "train/json/good.json", image_item("65f1c0a9e1b2c3d4e5f60001", "/good.png", "a good one"))
    # missing image file
    write_json(root / "train/json/gone.json", image_item("65f1c0a9e1b2c3d4e5f60002", "/gone.png", "lost image"))
    # empty caption (blank description, no annotations)
    write_png(root / "train/items/blank.png", 2)
    write_json(root / "train/json/blank.json", image_item("65f1c0a9e1b2c3d4e5f60003", "/blank.png", "   "))
    # a prompt item with one annotation without text and one good caption
    write_json(root / "train/items/p.json", prompt_file(stream("65f1c0a9e1b2c3d4e5f6bb01")))
    write_png(root / "prompt_images/65f1c0a9e1b2c3d4e5f6bb01.png", 3)
    item = prompt_item("65f1c0a9e1b2c3d4e5f60004", "/p.json", ["kept caption"])
    item["annotations"].append(free_text("", "65f1c0a9e1b2c3d4e5f6dead"))
    write_json(root / "train/json/p.json", item)
    # a prompt whose image was never downloaded
    write_json(root / "validation/items/q.json", prompt_file(stream("65f1c0a9e1b2c3d4e5f6bb99")))
    write_json(root / "validation/json/q.json", prompt_item("65f1c0a9e1b2c3d4e5f60005", "/q.json", ["no image"]))
    # an unknown subset folder, and a file that is not JSON
    write_png(root / "trian/items/typo.png", 4)
    write_json(root / "trian/json/typo.json", image_item("65f1c0a9e1b2c3d4e5f60006", "/typo.png", "typo subset"))
    (root / "validation/json/broken.json").write_text("{not json")
    return root


def test_bad_records_are_reported_with_their_source_and_the_rest_loads(tmp_path):
    result = load_pairs(export_with_bad_records(tmp_path))
    assert sorted(p.caption for p in result.pairs) == ["a good one", "kept caption"]
    reasons = {p.source: p.reason for p in result.problems}
    assert len(result.problems) == 6, reasons

    def reason_for(fragment):
        return next(r for s, r in reasons.items() if fragment in s)

    assert "image file missing" in reason_for("gone.json")
    assert "65f1c0a9e1b2c3d4e5f60002" in next(s for s in reasons if "gone.json" in s)
    assert "no caption" in reason_for("blank.json")
    assert "without text" in reason_for("65f1c0a9e1b2c3d4e5f6dead")
    assert "65f1c0a9e1b2c3d4e5f6bb99" in reason_for("q.json") and "prompt_images" in reason_for("q.json")
    assert "unknown subset 'trian'" in reason_for("typo.json")
    assert "JSON" in reason_for("broken.json")


def test_strict_mode_makes_bad_records_fatal_and_lists_them(tmp_path):
    export_with_bad_records(tmp_path)
    with pytest.raises(DataError, match=r"6 bad data record\(s\).*gone.json"):
        load_pairs(tmp_path, strict=True)
    with pytest.raises(DataError):
        convert_export(tmp_path, tmp_path / "m.jsonl", strict=True)
    assert not (tmp_path / "m.jsonl").exists()


def test_prompt_images_to_download_lists_only_missing_ones(tmp_path):
    export_with_bad_records(tmp_path)
    missing = prompt_images_to_download(tmp_path)
    assert missing == {"65f1c0a9e1b2c3d4e5f6bb99": stream("65f1c0a9e1b2c3d4e5f6bb99")}
    # once "downloaded" where the helper says, the record loads
    write_png(prompt_image_target(tmp_path, "65f1c0a9e1b2c3d4e5f6bb99", ".PNG"), 9)
    assert prompt_images_to_download(tmp_path) == {}
    assert "no image" in [p.caption for p in read_export(tmp_path).pairs]


def test_not_an_export_or_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not a Dataloop export"):
        read_export(tmp_path)
    with pytest.raises(DataError, match="no such manifest"):
        load_pairs(tmp_path / "nope.jsonl")


def test_fixtures_agree_with_dtlpy_serialisers():
    """Our prompt JSON / annotation shapes are what the real SDK produces and parses (offline)."""
    import dtlpy as dl
    from adapters.clip.items import caption_annotation_json, prompt_item_json

    prompt = dl.PromptItem(name="p.json")
    prompt.add(message={"content": [{"mimetype": dl.PromptType.IMAGE, "value": stream("65f1c0a9e1b2c3d4e5f6bb01")}]})
    assert prompt.to_json() == prompt_item_json(stream("65f1c0a9e1b2c3d4e5f6bb01")) == prompt_file(
        stream("65f1c0a9e1b2c3d4e5f6bb01"))
    sdk = dl.Annotation.new(annotation_definition=dl.FreeText(text="a red circle"),
                            metadata={"system": {"promptId": "1"}}).to_json()
    ours = caption_annotation_json("a red circle")
    assert {k: sdk[k] for k in ("type", "label", "coordinates")} == {k: ours[k] for k in ("type", "label", "coordinates")}
    assert sdk["metadata"]["system"]["promptId"] == ours["metadata"]["system"]["promptId"]
    item = dl.Item.from_json(_json=prompt_item("65f1c0a9e1b2c3d4e5f60002", "/prompts/p1.json", ["x"]),
                             client_api=dl.client_api, is_fetched=False)
    assert item.system["shebang"]["dltype"] == "prompt" and item.dir == "/prompts"
    image = dl.Item.from_json(_json=image_item("65f1c0a9e1b2c3d4e5f60001", "/cats/cat1.png", "a cat"),
                              client_api=dl.client_api, is_fetched=False)
    assert image.description == "a cat" and image.mimetype == "image/png"
    annotation = dl.Annotation.from_json(_json=free_text("a cat"))
    assert annotation.label == "free-text" and annotation.type == "text" and annotation.coordinates == "a cat"


# ---- manifests ---------------------------------------------------------------------------
def sample_pairs(tmp_path: Path) -> list[CaptionPair]:
    a, b = write_png(tmp_path / "imgs/a.png", 1), write_png(tmp_path / "imgs/sub/b.png", 2)
    return [CaptionPair(a.resolve(), "a first caption", "train", "cat", {"k": 1}),
            CaptionPair(a.resolve(), "a second caption for a", "train", "cat", {}),
            CaptionPair(b.resolve(), "b, with \"quotes\", and commas", "validation", None, {"note": "é"})]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_manifest_round_trip_with_relative_paths(tmp_path, suffix):
    pairs = sample_pairs(tmp_path)
    out = tmp_path / "out" / f"manifest{suffix}"
    assert write_manifest(pairs, out) == 3
    text = out.read_text()
    assert "../imgs/a.png" in text and str(tmp_path) not in text
    back = read_manifest(out)
    assert back.problems == []
    assert [(p.image, p.caption, p.subset, p.label, p.metadata) for p in back.pairs] == [
        (p.image, p.caption, p.subset, p.label, p.metadata) for p in pairs]
    # moving the folder with its images keeps the manifest valid
    moved = tmp_path.rename(tmp_path.with_name(tmp_path.name + "-moved"))
    assert len(read_manifest(moved / "out" / f"manifest{suffix}").pairs) == 3


def test_manifest_bad_lines_are_reported_by_line(tmp_path):
    write_png(tmp_path / "a.png")
    lines = [{"image": "a.png", "caption": "ok", "subset": "train", "metadata": {}},
             {"image": "missing.png", "caption": "x", "subset": "train"},
             {"image": "a.png", "caption": "  ", "subset": "train"},
             {"image": "a.png", "caption": "x", "subset": "trainn"},
             ["not", "an", "object"]]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n{broken\n")
    result = read_manifest(path)
    assert len(result.pairs) == 1
    assert [(p.source, p.reason.split(":")[0].split(" for ")[0]) for p in result.problems] == [
        ("m.jsonl:2", "image file missing"), ("m.jsonl:3", "empty caption"), ("m.jsonl:4", "unknown subset 'trainn'"),
        ("m.jsonl:5", "not a JSON object"), ("m.jsonl:7", "not valid JSON (Expecting property name enclosed in double quotes")]


def test_csv_manifest_extra_columns_become_metadata_and_missing_columns_fail(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("image,caption,subset,label,photographer\na.png,a caption,validation,cat,Ann\n")
    pair = read_manifest(tmp_path / "m.csv").pairs[0]
    assert (pair.label, pair.metadata, pair.subset) == ("cat", {"photographer": "Ann"}, "validation")
    (tmp_path / "bad.csv").write_text("path,text\na.png,x\n")
    with pytest.raises(DataError, match="lacks column"):
        read_manifest(tmp_path / "bad.csv")


def test_pairset_summary_and_counts():
    pairs = [CaptionPair(Path("/a.png"), "x", "train"), CaptionPair(Path("/a.png"), "y", "train"),
             CaptionPair(Path("/b.png"), "z", "validation")]
    result = PairSet(pairs, [DataProblem("m.jsonl:3", "empty caption")])
    assert result.counts() == {"train": {"pairs": 2, "images": 1}, "validation": {"pairs": 1, "images": 1}}
    assert result.summary() == "train: 2 pairs / 1 images; validation: 1 pairs / 1 images; 1 records skipped"


# ---- export writer and converter ---------------------------------------------------------
@pytest.mark.parametrize("layout", ["dtlpy", "legacy"])
def test_write_export_round_trips_through_read_export(tmp_path, layout):
    pairs = sample_pairs(tmp_path)
    root = write_export(pairs, tmp_path / "export", layout=layout)
    back = read_export(root)
    assert back.problems == []
    assert sorted((p.caption, p.subset, p.label) for p in back.pairs) == sorted(
        (p.caption, p.subset, p.label) for p in pairs)
    # the two captions of image a stay on one image
    assert len({p.image for p in back.pairs if p.caption.startswith("a ")}) == 1


def test_convert_command_writes_a_manifest_and_reports_skips(tmp_path, capsys):
    export_with_bad_records(tmp_path / "export")
    out = tmp_path / "m.jsonl"
    assert main(["convert", str(tmp_path / "export"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "wrote 2 pairs" in captured.out and captured.err.count("skipped") == 6
    assert sorted(p.caption for p in load_pairs(out).pairs) == ["a good one", "kept caption"]
    assert main(["convert", str(tmp_path / "export"), "--out", str(tmp_path / "s.jsonl"), "--strict"]) == 1
    assert "bad data record" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nothing"), "--out", str(out)]) == 2
