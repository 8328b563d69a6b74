"""Issue 8, problem 9: names inside an export never lead outside it, and manifests never make the
tool write outside the folder it was given.

An export item with `filename: "/../../../../etc/hostname"` made `convert` and `train` read a file
outside the export. Real files and real exports (read_export, write_export, the CLI) throughout.
"""
from __future__ import annotations

import json
from pathlib import Path

from adapters.clip.cli import main
from adapters.clip.exports import read_export, write_export
from adapters.clip.pairs import CaptionPair
from conftest import pattern_image


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def image_item(item_id: str, filename: str, caption: str) -> dict:
    return {"id": item_id, "name": Path(filename).name, "filename": filename, "type": "file",
            "metadata": {"system": {"mimetype": "image/png", "tags": {}}, "description": {"text": caption}},
            "annotations": []}


def test_an_export_filename_climbing_out_is_skipped_not_read(tmp_path, capsys):
    secret = tmp_path / "secret.png"           # outside the export, exactly where the climb lands
    pattern_image(9).save(secret)
    export = tmp_path / "deep" / "er" / "export"
    pattern_image(1).save(_mk(export / "train" / "items" / "ok.png"))
    write_json(export / "train" / "json" / "ok.json", image_item("65f1c0a9e1b2c3d4e5f60001", "/ok.png", "a fine photo"))
    climb = "/../../../../../secret.png"
    assert (export / "train" / "items" / climb.lstrip("/")).resolve() == secret.resolve()
    write_json(export / "train" / "json" / "evil.json", image_item("65f1c0a9e1b2c3d4e5f60002", climb, "stolen"))
    result = read_export(export)
    assert [p.caption for p in result.pairs] == ["a fine photo"]
    assert any("outside the export" in problem.reason for problem in result.problems)
    assert main(["convert", str(export), "--out", str(tmp_path / "m.jsonl")]) == 0
    assert "secret.png" not in (tmp_path / "m.jsonl").read_text()
    assert "outside the export" in capsys.readouterr().err


def test_a_prompt_referencing_a_file_outside_the_export_is_skipped(tmp_path):
    outside = tmp_path / "outside.png"
    pattern_image(2).save(outside)
    export = tmp_path / "export"
    prompt = {"shebang": "dataloop", "metadata": {"dltype": "prompt"},
              "prompts": {"1": [{"mimetype": "image/*", "value": outside.as_uri()}]}}
    write_json(export / "train" / "items" / "p.json", prompt)
    item = {"id": "65f1c0a9e1b2c3d4e5f60003", "name": "p.json", "filename": "/p.json", "type": "file",
            "metadata": {"system": {"mimetype": "application/json", "shebang": {"dltype": "prompt"}}},
            "annotations": [{"type": "text", "label": "free-text", "coordinates": "a caption",
                             "metadata": {"system": {"promptId": "1"}}}]}
    write_json(export / "train" / "json" / "p.json", item)
    result = read_export(export)
    assert result.pairs == [] and "outside the export" in result.problems[0].reason


def test_a_manifest_label_never_makes_write_export_leave_its_folder(tmp_path):
    image = tmp_path / "photo.png"
    pattern_image(3).save(image)
    root = tmp_path / "a" / "export"
    pairs = [CaptionPair(image=image, caption="a photo", subset="train", label="../../../escaped")]
    write_export(pairs, root)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != image]
    assert written and all(root in p.parents for p in written), written
    assert [p.caption for p in read_export(root).pairs] == ["a photo"]


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
