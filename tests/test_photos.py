"""Photo metadata: typed EXIF fields read at index time, used by --where, --json and --sheet."""
from __future__ import annotations

import json
import logging
import os
import time

import pytest
from PIL import ExifTags, Image

from adapters.clip.cli import main
from adapters.clip.images import load_image
from adapters.clip.photos import photo_metadata
from conftest import pattern_image


def camera_jpeg(path, *, taken=None, make="Canon", model="Canon EOS 5D", gps=None, orientation=None, size=(64, 48),
                seed=0):
    """A JPEG as a camera writes it: DateTimeOriginal in the EXIF IFD, make/model, optional GPS."""
    exif = Image.Exif()
    if make:
        exif[ExifTags.Base.Make] = make
    if model:
        exif[ExifTags.Base.Model] = model
    if orientation:
        exif[ExifTags.Base.Orientation] = orientation
    if taken:
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = taken
    if gps:
        (lat, lat_ref), (lon, lon_ref) = gps
        ifd = exif.get_ifd(ExifTags.IFD.GPSInfo)
        ifd[ExifTags.GPS.GPSLatitudeRef], ifd[ExifTags.GPS.GPSLatitude] = lat_ref, lat
        ifd[ExifTags.GPS.GPSLongitudeRef], ifd[ExifTags.GPS.GPSLongitude] = lon_ref, lon
    path.parent.mkdir(parents=True, exist_ok=True)
    pattern_image(seed, size).save(path, exif=exif)
    return path


def test_exif_fields_are_typed(tmp_path):
    path = camera_jpeg(tmp_path / "a.jpg", taken="2021:05:03 10:11:12",
                       gps=(((33.0, 52.0, 4.2), "S"), ((151.0, 12.0, 36.0), "E")), orientation=6)
    meta = photo_metadata(path)
    assert meta == {"taken": "2021-05-03T10:11:12", "taken_from": "exif", "year": 2021, "month": 5,
                    "camera": "Canon EOS 5D", "width": 48, "height": 64,  # orientation 6: shown rotated
                    "latitude": pytest.approx(-33.867833), "longitude": pytest.approx(151.21)}
    assert isinstance(meta["year"], int) and isinstance(meta["latitude"], float)


def test_without_exif_the_file_time_is_taken(tmp_path):
    path = tmp_path / "plain.png"
    pattern_image(1).save(path)
    stamp = time.mktime((2019, 7, 4, 12, 0, 0, 0, 0, -1))
    os.utime(path, (stamp, stamp))
    meta = photo_metadata(path)
    assert meta == {"taken": "2019-07-04T12:00:00", "taken_from": "file", "year": 2019, "month": 7,
                    "width": 64, "height": 64}
    placeholder = camera_jpeg(tmp_path / "zero.jpg", taken="0000:00:00 00:00:00", make="NIKON",
                              model="COOLPIX P7000")
    meta = photo_metadata(placeholder)
    assert meta["taken_from"] == "file" and meta["camera"] == "NIKON COOLPIX P7000"


def test_unreadable_file_still_gets_its_file_time(tmp_path):
    path = tmp_path / "text.jpg"
    path.write_text("not a jpeg")
    meta = photo_metadata(path)
    assert meta["taken_from"] == "file" and "width" not in meta


def test_corrupt_exif_is_reported_with_the_file_name(tmp_path, caplog, recwarn):
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Canon"
    exif[ExifTags.Base.Model] = "X" * 100
    path = tmp_path / "broken exif.jpg"
    pattern_image(2).save(path, exif=exif.tobytes()[:-60])  # the model string's bytes cut off
    with caplog.at_level(logging.WARNING):
        assert load_image(path).size == (64, 64)
    assert any(str(path) in r.getMessage() and "corrupt EXIF" in r.getMessage() for r in caplog.records)
    assert not [w for w in recwarn if "EXIF" in str(w.message)]  # PIL's raw warning is not passed on


@pytest.fixture
def camera_folder(tmp_path):
    folder = tmp_path / "DCIM"
    years = {2017: "a", 2019: "b", 2020: "c", 2021: "d", 2024: "e"}
    for n, (year, name) in enumerate(years.items()):
        camera_jpeg(folder / f"IMG_{name}.jpg", taken=f"{year}:0{n + 1}:15 09:30:00", seed=n)
    old = folder / "scan.png"  # no EXIF: its file time (2015) counts
    pattern_image(9).save(old)
    stamp = time.mktime((2015, 1, 1, 0, 0, 0, 0, 0, -1))
    os.utime(old, (stamp, stamp))
    return folder


def test_where_year_finds_exactly_the_photos_from_2020_on(camera_folder, tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["index", str(camera_folder), "--store", store, "--model", "tiny", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["search", "a photo", "--store", store, "-k", "20", "--where", "year>=2020", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert sorted(os.path.basename(h["path"]) for h in hits) == ["IMG_c.jpg", "IMG_d.jpg", "IMG_e.jpg"]
    assert all(h["metadata"]["camera"] == "Canon EOS 5D" and h["metadata"]["year"] >= 2020 for h in hits)
    assert main(["search", "a photo", "--store", store, "-k", "20", "--where", "taken<2018-01-01", "--json"]) == 0
    assert sorted(os.path.basename(h["path"]) for h in json.loads(capsys.readouterr().out)) == ["IMG_a.jpg",
                                                                                                "scan.png"]


def test_stores_indexed_before_photo_metadata_get_it_on_the_next_run(camera_folder, tmp_path, capsys):
    from adapters.clip.embed import Embedder
    from adapters.clip.indexing import IndexOptions, index
    from adapters.clip.models import load_model
    from adapters.clip.store import Store

    store = tmp_path / "store"
    embedder = Embedder(load_model("tiny", device="cpu"), batch_size=4)
    index(store, embedder, [camera_folder], IndexOptions(photo_metadata=False, show_progress=False))
    with Store.open(store) as opened:
        assert not any("year" in record.metadata for record in opened.iter_items())
    summary = index(store, embedder, [camera_folder], IndexOptions(show_progress=False))
    assert summary.unchanged == 6 and summary.embedded == 0
    with Store.open(store) as opened:
        years = sorted(record.metadata["year"] for record in opened.iter_items())
    assert years == [2015, 2017, 2019, 2020, 2021, 2024]
