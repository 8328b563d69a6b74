"""Issue 17: what a new user sees, driven as they drive it (`python -m adapters.clip ...` in a child process)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, pattern_image


def env_with(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def run(*args: str, cwd=None, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapters.clip", *args], capture_output=True, text=True,
                          cwd=cwd, env=env_with(**extra), timeout=300)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(6):
        pattern_image(i).save(folder / f"img {i}.png")
    return folder


class Lines:
    """A child's stderr read line by line as it comes, each with the seconds since the child started."""

    def __init__(self, args: list[str], **extra: str):
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "adapters.clip", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env_with(**extra),
                                     # Ctrl-C as in a terminal: a test run started in the background
                                     # (`cmd &`) hands its children SIGINT ignored
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines: list[tuple[float, str]] = []
        self.arrived = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self.arrived:
                self.lines.append((time.monotonic() - self.started, line.rstrip("\n")))
                self.arrived.notify_all()

    def wait_for(self, text: str, timeout: float = 120) -> tuple[float, str]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: any(text in line for _, line in self.lines) or
                                         self.proc.poll() is not None, timeout), self.lines
            found = [(t, line) for t, line in self.lines if text in line]
            assert found, (text, self.lines)
            return found[0]

    def finish(self) -> tuple[int, str, str]:
        stdout = self.proc.stdout.read()
        code = self.proc.wait(timeout=300)
        time.sleep(0.1)
        return code, stdout, "\n".join(line for _, line in self.lines)


# ---- 1. a model's first use: progress within 2 s, Ctrl-C says what was kept, the summary counts it all ----
def test_first_index_on_a_new_model_shows_progress_within_2_s_and_ctrl_c_says_how_to_carry_on(photos, tmp_path):
    engines, store = str(tmp_path / "engines"), str(tmp_path / "store")
    args = ["index", str(photos), "--store", store, "--model", "tiny"]
    first = Lines(args, CLIP_ADAPTER_ENGINES=engines)
    arrival, line = first.wait_for("first use")
    assert arrival < 2.0 and line.startswith("[") and "exported to ONNX" in line and "timed" in line
    # Ctrl-C as the model is loaded, before its export (on a quiet machine tiny's export and timing
    # take about 2 s, too short a window to aim at from here)
    first.wait_for("tiny loaded (")
    first.proc.send_signal(signal.SIGINT)
    code, _, stderr = first.finish()
    assert code == 130 and "Traceback" not in stderr
    assert re.search(r"interrupted after [\d.]+ s: the batches committed so far are kept .*rerun the same command",
                     stderr.splitlines()[-1]), stderr

    second = Lines(args + ["--json"], CLIP_ADAPTER_ENGINES=engines)
    arrival, _ = second.wait_for("first use")  # the export was cut short: it starts again, and says so
    assert arrival < 2.0
    code, stdout, stderr = second.finish()
    assert code == 0, stderr
    steps = [line for line in stderr.splitlines() if line.startswith("[")]
    assert [s.split("] ")[1].split(" ")[0] for s in steps] == ["loading", "tiny", "exporting", "timing", "engine:"]
    assert "M parameters); preparing it takes roughly" in steps[1]
    last_stamp = float(steps[-1][1:].split(" s]")[0])
    summary = json.loads(stdout)
    assert summary["added"] == 6 and summary["seconds"] >= last_stamp  # the wait is counted

    third = run(*args, CLIP_ADAPTER_ENGINES=engines)  # prepared now: no first-use lines
    assert third.returncode == 0 and "first use" not in third.stderr and "unchanged 6" in third.stdout


# ---- 2. filters as people write them -----------------------------------------------------------------
TAKEN = {"a.jpg": ("2015:03:01 10:00:00", "Canon", "Canon EOS 5D"), "b.jpg": ("2016:07:04 12:00:00", "NIKON", "D750"),
         "c.jpg": ("2021:06:15 09:30:00", "Canon", "Canon EOS R5"), "d.jpg": ("2021:07:01 08:00:00", "NIKON", "D750"),
         "e.jpg": ("2022:01:01 00:00:01", "Apple", "iPhone 12")}


@pytest.fixture(scope="module")
def dated_store(tmp_path_factory, embedder):
    """A store of photos with EXIF dates and cameras, indexed through the library (the filters are SQL)."""
    from adapters.clip.indexing import IndexOptions, index
    from adapters.clip.onnx_export import export_towers
    from test_photos import camera_jpeg

    folder = tmp_path_factory.mktemp("dated")
    for seed, (name, (taken, make, model)) in enumerate(TAKEN.items()):
        camera_jpeg(folder / name, taken=taken, make=make, model=model, seed=seed)
    root = tmp_path_factory.mktemp("dated-store") / "store"
    index(root, embedder, [folder], IndexOptions(show_progress=False, ann="off"))
    export_towers(embedder.clip)  # text searches then run as users' do: the exported text tower, no torch
    return root


@pytest.mark.parametrize("where,expected", [
    ("taken>=2021", "cde"), ("taken<2016", "a"), ('taken<"2016"', "a"), ("taken=2021", "cd"),
    ("taken=2021-06", "c"), ("taken>2021-06", "de"), ("taken<=2016-07", "ab"), ("taken!=2021", "abe"),
    ("taken>=2021-06-15", "cde"), ("year>=2021", "cde"), ("camera~canon*", "ac"), ("camera~*D750", "bd"),
    ("camera~*IPHONE*", "e"), ("taken~2021-06*", "c"),
])
def test_where_reads_dates_and_globs_as_people_write_them(dated_store, where, expected):
    from adapters.clip.search import Filters, Searcher
    from adapters.clip.store import Store

    with Store.open(dated_store, readonly=True) as store:
        result = Searcher(store).search(store.snapshot().vectors[0], k=10, filters=Filters(where=[where]))
    assert "".join(sorted(Path(hit.path).stem for hit in result.hits)) == expected
    assert result.candidates == len(expected)


def test_search_explains_no_results_by_what_stopped_them_and_warns_of_a_truncated_query(dated_store):
    long_query = "a photo of a dog on the beach at sunset " * 50
    result = run("search", long_query, "--store", str(dated_store), "--min-score", "0.99")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"no results: 5 of 5 items passed the filters, but none scored >= 0\.99 "
                        r"\(the best scored -?[\d.]+\)\n", result.stdout), result.stdout
    assert re.search(r"warning: the query text 'a photo of a dog.*' is longer than the model's 32-token context; "
                     r"it reads the start and ignores the rest", result.stderr)
    filtered = run("search", "dog", "--store", str(dated_store), "--where", "camera~leica*")
    assert filtered.stdout == "no results: none of the 5 items passed the filters\n"


# ---- 3. a query that names an image file -------------------------------------------------------------
def test_an_image_path_query_is_an_image_search_and_a_mistyped_one_an_error(dated_store, tmp_path):
    image = next(p for p in Path(dated_store).parent.parent.glob("dated*/c.jpg"))
    found = run("search", str(image), "--store", str(dated_store), "-k", "1", "--json")
    assert found.returncode == 0, found.stderr
    top = json.loads(found.stdout)[0]
    assert top["path"] == str(image) and top["score"] > 0.999  # the image itself: an image query
    typo = str(tmp_path / "nc" / "qeury.jpg")
    mistyped = run("search", typo, "--store", str(dated_store))
    assert mistyped.returncode == 1 and mistyped.stdout == ""
    assert mistyped.stderr == f"error: {typo}: no such image file (to search for these words as text, add --text)\n"
    forced = run("search", typo, "--text", "--store", str(dated_store), "--json")
    assert forced.returncode == 0 and len(json.loads(forced.stdout)) == 5


# ---- 10. the smaller points ------------------------------------------------------------------------
def test_a_mistyped_option_gets_its_commands_usage_and_a_suggestion(dated_store):
    result = run("search", "dog", "--store", str(dated_store), "-K", "5")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: python -m adapters.clip search ")
    assert result.stderr.strip().endswith("error: unrecognized arguments: -K 5 (did you mean -k?)")


def test_a_mistyped_model_name_gets_did_you_mean_and_the_offline_names():
    result = run("embed", "x.png", "--model", "tiyn")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "did you mean 'tiny'?" in result.stderr and "'ViT-B/32:random'" in result.stderr
    listed = run("models")
    assert "ViT-B/32:random" in listed.stdout and re.search(r"^tiny .*random \(test model\)", listed.stdout, re.M)


def test_index_names_unreadable_photo_kinds_empty_folders_and_removed_files(tmp_path):
    photos, elsewhere, empty = tmp_path / "photos", tmp_path / "elsewhere", tmp_path / "empty"
    for folder in (photos, elsewhere, empty):
        folder.mkdir()
    for i in range(3):
        pattern_image(i).save(photos / f"p{i}.png")
    (photos / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (photos / "IMG_0002.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    store = str(tmp_path / "store")
    first = run("index", str(photos), "--store", store, "--model", "tiny")
    assert first.returncode == 0, first.stderr
    assert "added 3," in first.stdout
    assert ("note: skipped 2 .heic file(s): not a type read here (supported: bmp, gif, jpeg, jpg, png, tif, tiff, "
            "webp); convert them (to JPEG, say) to index them") in first.stderr
    (photos / "p2.png").rename(elsewhere / "p2.png")  # the only copy leaves the indexed folders
    second = run("index", "--store", store)
    assert "removed 1," in second.stdout
    assert (f"note: removed 1 item(s) whose files are gone from the indexed folders ({photos / 'p2.png'}); a file "
            f"moved to a folder outside them is found again by indexing that folder too") in second.stderr
    nothing = run("index", str(empty), "--store", str(tmp_path / "empty-store"), "--model", "tiny")
    assert nothing.returncode == 0 and f"note: no image files found in {empty} (supported: bmp," in nothing.stderr
    searched = run("search", "dog", "--store", str(tmp_path / "empty-store"))
    assert searched.returncode == 1 and searched.stderr == (
        f"error: the store {tmp_path / 'empty-store'} holds no items yet: index a folder into it first "
        f"(python -m adapters.clip index FOLDER --store {tmp_path / 'empty-store'})\n")


def test_a_store_without_current_or_with_a_moved_checkpoint_says_what_to_do(tmp_path, tiny):
    from adapters.clip.models import save_checkpoint

    photos = tmp_path / "photos"
    photos.mkdir()
    pattern_image(0).save(photos / "a.png")
    save_checkpoint(tiny, tmp_path / "mine")
    store = tmp_path / "store"
    assert run("index", str(photos), "--store", str(store), "--model", str(tmp_path / "mine"),
               "--engine", "torch").returncode == 0
    (tmp_path / "mine").rename(tmp_path / "moved")
    moved = run("index", "--store", str(store))
    assert moved.returncode == 1 and "Traceback" not in moved.stderr
    assert (f"error: the store's model {tmp_path / 'mine'} is not there any more; if the checkpoint moved, pass "
            f"--model NEWPATH") in moved.stderr
    again = run("search", str(photos / "a.png"), "--store", str(store), "--model", str(tmp_path / "moved"), "--json")
    assert again.returncode == 0 and json.loads(again.stdout)[0]["score"] > 0.999
    (store / "CURRENT").unlink()
    damaged = run("index", str(photos), "--store", str(store))  # no --model: the store's, which is damaged
    assert damaged.returncode == 1
    assert damaged.stderr.strip().endswith(f"run `python -m adapters.clip check --store {store} --repair`")
    assert "weights" not in damaged.stderr and "loading" not in damaged.stderr


def test_a_damaged_matrix_warns_once_and_an_empty_text_is_named(dated_store, tmp_path):
    import shutil
    copy = tmp_path / "store"
    shutil.copytree(dated_store, copy)
    vectors = next(copy.glob("data-*/vectors.f32"))
    data = bytearray(vectors.read_bytes())
    data[8:40] = b"\xff" * 32
    vectors.write_bytes(bytes(data))
    result = run("search", "dog", "--store", str(copy), "-k", "1")
    assert result.returncode == 0
    warnings = [line for line in result.stderr.splitlines() if "does not match its checksums" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: store ")
    embedded = run("embed", "--text", "", "--text", "a dog", "--model", "tiny", "--out", str(tmp_path / "e"))
    assert embedded.returncode == 0
    assert "skipped --text '': empty text (its row 0 is NaN)" in embedded.stderr


# ---- 6. contact sheets -------------------------------------------------------------------------------
def test_a_tile_shows_the_whole_shortest_unique_path_however_deep():
    from adapters.clip.sheets import distinct_names, tile_lines

    paths = ["/home/me/photos/drawings/IMG_0003.png", "/home/me/photos/backup/drawings/IMG_0003.png",
             "/home/me/photos/a-very-long-folder-name-that-will-not-fit-on-one-tile-line/IMG_0004.png"]
    names = distinct_names(paths)
    assert names == ["photos/drawings/IMG_0003.png", "backup/drawings/IMG_0003.png", "IMG_0004.png"]
    for name in names:
        lines = tile_lines(f"1. 0.912  2021-06-01\n{name}")
        assert "".join(lines[1:]) == name and not any("…" in line for line in lines)
    deep = tile_lines("1. 0.5\n" + "/".join(["folder"] * 20) + "/x.png")
    assert deep[-1].endswith("…") and len(deep) == 4  # more than fits: cut at the end, with an ellipsis


def test_sheet_is_written_in_the_format_its_extension_names(dated_store, tmp_path):
    from PIL import Image

    for name, expected in (("hits.jpg", "JPEG"), ("hits.webp", "WEBP"), ("hits.png", "PNG")):
        result = run("search", "a photo", "--store", str(dated_store), "-k", "3", "--sheet", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        with Image.open(tmp_path / name) as sheet:
            assert sheet.format == expected
    wrong = run("search", "a photo", "--store", str(dated_store), "--sheet", str(tmp_path / "hits.txt"))
    assert wrong.returncode == 1 and wrong.stdout == "" and not (tmp_path / "hits.txt").exists()
    assert wrong.stderr.startswith(f"error: {tmp_path / 'hits.txt'}: a contact sheet is written as the image type")


# ---- 9. prepare warns of captions that say little ----------------------------------------------------
def test_prepare_warns_of_captions_from_years_and_storage_folder_names(tmp_path):
    library = tmp_path / "library"
    for i, folder in enumerate(["2015", "2015", "2016-06", "drawings", "golden_retriever", "golden_retriever"]):
        (library / folder).mkdir(parents=True, exist_ok=True)
        pattern_image(i).save(library / folder / f"{i}.png")
    (library / "drawings" / "3.txt").write_text("a pencil drawing of a cat\n")  # a sidecar: not from the name
    result = run("prepare", str(library), "--out", str(tmp_path / "m.jsonl"))
    assert result.returncode == 0, result.stderr
    (warning,) = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warning.startswith("warning: captions from folder names that say little about the images: "
                              "'a photo of a 2015' (2 images), 'a photo of a 2016 06' (1 image). Write captions in "
                              "sidecar <image>.txt files or a --captions CSV, or give a --template")
    assert "golden" not in warning and "drawings" not in warning
    good = tmp_path / "good"
    (good / "golden_retriever").mkdir(parents=True)
    pattern_image(0).save(good / "golden_retriever" / "a.png")
    pattern_image(1).save(good / "golden_retriever" / "b.png")
    quiet = run("prepare", str(good), "--out", str(tmp_path / "g.jsonl"))
    assert quiet.returncode == 0 and "warning" not in quiet.stderr
