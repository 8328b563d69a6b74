"""Issue 8, problem 3: `--where` on numbers that arrived as text (CSV columns, quoted JSON, --meta).

A CSV manifest's `year` column used to be stored as text, and SQLite orders any text above any
number: `year>=2020` returned every item, `year=2019` none. Numbers are now numbers whatever their
source, comparisons are numeric whenever both sides are numbers (also on stores written before),
and a condition on a key no item has says so.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from adapters.clip.cli import main
from adapters.clip.search import Filters, Searcher
from adapters.clip.filters import Condition, typed_value
from adapters.clip.store import ModelBinding, Store
from conftest import pattern_image

DIM = 8
YEARS = [2015 + i // 2 for i in range(20)]  # 2015..2024, two items each


def matching_years(store: Store, *where: str) -> list[int]:
    query = np.ones(DIM, np.float32) / np.sqrt(DIM)
    hits = Searcher(store, ann="off").search(query, k=100, filters=Filters(where=list(where))).hits
    return sorted(hit.metadata["year"] for hit in hits)


@pytest.fixture
def year_store(tmp_path):
    """20 items whose `year` is text, as a CSV manifest delivers it."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((20, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = Store.open(tmp_path / "store", create=ModelBinding("synthetic", "a" * 32, DIM))
    store.add_vectors([f"/photos/{i}.jpg" for i in range(20)], vectors,
                      metadata=[{"year": str(y), "camera": "Canon", "rating": f"{i % 5}.5"} for i, y in enumerate(YEARS)])
    yield store
    store.close()


@pytest.mark.parametrize("where,expected", [
    ("year>=2020", [2020, 2020, 2021, 2021, 2022, 2022, 2023, 2023, 2024, 2024]),
    ("year=2019", [2019, 2019]),
    ('year="2019"', [2019, 2019]),
    ("year<2016", [2015, 2015]),
    ("year!=2015", YEARS[2:]),
])
def test_numeric_conditions_on_csv_numbers(year_store, where, expected):
    assert matching_years(year_store, where) == expected


def test_numbers_from_text_are_stored_as_numbers(year_store):
    record = year_store.item_by_path("/photos/3.jpg")
    assert record.metadata == {"year": 2016, "camera": "Canon", "rating": 3.5}


def test_stores_written_before_typing_compare_numerically_too(year_store):
    year_store.conn.execute("UPDATE items SET metadata = json_set(metadata, '$.year', CAST(json_extract(metadata, "
                            "'$.year') AS TEXT))")  # as an older version stored a CSV column
    assert year_store.conn.execute("SELECT json_type(metadata, '$.year') FROM items LIMIT 1").fetchone()[0] == "text"
    assert matching_years(year_store, "year>=2023") == [2023, 2023, 2024, 2024]
    assert matching_years(year_store, "year=2019") == [2019, 2019]


@pytest.mark.parametrize("text,value", [("2019", 2019), ("-3.5", -3.5), ("1e3", 1000.0), ("007", "007"),
                                         ("NaN", "NaN"), ("Infinity", "Infinity"), ("1,5", "1,5"), ("", "")])
def test_what_counts_as_a_number(text, value):
    assert typed_value(text) == value and type(typed_value(text)) is type(value)


def test_a_condition_on_a_key_no_item_has_says_so(year_store):
    query = np.ones(DIM, np.float32) / np.sqrt(DIM)
    result = Searcher(year_store, ann="off").search(query, k=5, filters=Filters(where=["yeer>=2020"]))
    assert result.hits == [] and len(result.warnings) == 1
    assert "'yeer'" in result.warnings[0] and "'year'" in result.warnings[0]
    result = Searcher(year_store, ann="off").search(query, k=5, filters=Filters(where=["year>=2090"]))
    assert result.hits == [] and result.warnings == []  # the key exists: no results is the answer


def test_glob_conditions_stay_text():
    assert Condition.parse("camera~Can*").value == "Can*"
    assert Condition.parse("serial~20*").value == "20*"


def test_cli_csv_manifest_and_meta_filter_numerically(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption", "subset", "year"])
        for i, year in enumerate([2015, 2019, 2020, 2024]):
            pattern_image(i).save(folder / f"{i}.png")
            writer.writerow([f"photos/{i}.png", f"photo {i}", "train", year])
    store = tmp_path / "store"
    assert main(["index", str(folder), "--store", str(store), "--model", "tiny", "--device", "cpu",
                 "--manifest", str(manifest), "--meta", "rating=4", "--json"]) == 0
    capsys.readouterr()
    assert main(["search", "photo", "--store", str(store), "--where", "year>=2020", "--where", "rating>3",
                 "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert sorted(h["metadata"]["year"] for h in hits) == [2020, 2024]
    assert main(["search", "photo", "--store", str(store), "--where", "camera=Canon"]) == 0
    err = capsys.readouterr().err
    assert "no item has the metadata key 'camera'" in err and len(err.strip().splitlines()) == 1
