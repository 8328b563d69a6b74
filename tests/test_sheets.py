"""Contact sheets: search and classify share one grid; tiles tell same-named files apart."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from adapters.clip.cli import main
from adapters.clip.sheets import MAX_COLUMNS, distinct_names, grid_sheet
from conftest import pattern_image

THUMB, PAD = 160, 8


def test_distinct_names_keep_just_enough_of_the_path():
    paths = ["/p/trips/2019/china.jpg", "/p/trips/2021/china.jpg", "/p/dogs/rex.jpg", "/q/dogs/rex.jpg",
             "/p/cat.jpg"]
    assert distinct_names(paths) == ["2019/china.jpg", "2021/china.jpg", "p/dogs/rex.jpg", "q/dogs/rex.jpg",
                                     "cat.jpg"]
    assert distinct_names(["/a/x.png", "/a/x.png"]) == ["/a/x.png", "/a/x.png"]  # the same file twice: all of it


def test_grid_wraps_into_rows_about_as_wide_as_tall(tmp_path):
    image = tmp_path / "a.png"
    pattern_image(0).save(image)
    for n, (columns, rows) in {1: (1, 1), 20: (5, 4), 50: (MAX_COLUMNS, 7)}.items():
        out = grid_sheet([(image, f"{i}. 0.5\nfolder/a.png") for i in range(n)], tmp_path / f"{n}.png", title="q")
        with Image.open(out) as sheet:
            assert sheet.width == PAD + columns * (THUMB + PAD)
            assert rows * THUMB < sheet.height < rows * (THUMB + 80) + 60


def test_search_sheet_is_a_grid_whose_tiles_name_the_folder(tmp_path, capsys):
    folder = tmp_path / "photos"
    for i in range(12):
        sub = folder / ("2019" if i % 2 else "2021")
        sub.mkdir(parents=True, exist_ok=True)
        pattern_image(i).save(sub / f"china {i // 2}.png")  # each name twice, in two folders
    store = str(tmp_path / "store")
    assert main(["index", str(folder), "--store", store, "--model", "tiny", "--device", "cpu"]) == 0
    capsys.readouterr()
    sheet = tmp_path / "hits.png"
    assert main(["search", "china", "--store", store, "-k", "12", "--sheet", str(sheet), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 12
    with Image.open(sheet) as drawn:
        assert drawn.width == PAD + 4 * (THUMB + PAD) and drawn.height > 3 * THUMB  # 4 x 3, not 12 x 1
    classify_sheet = tmp_path / "labels.png"
    assert main(["classify", str(folder), "--labels", "cat,dog", "--model", "tiny", "--device", "cpu",
                 "--sheet", str(classify_sheet), "--json"]) == 0
    with Image.open(classify_sheet) as drawn:
        assert drawn.width == PAD + 4 * (THUMB + PAD)  # the same layout as search's
        assert np.asarray(drawn).std() > 0
