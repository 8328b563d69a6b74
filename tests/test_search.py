"""Search: exact vs a naive reference, ANN recall, filters with exact and ANN, query arithmetic, CLI.

Real SQLite, real FAISS, the real tiny open_clip model; synthetic vectors are clustered (like
embeddings), not uniform noise.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.clip.cli import main
from adapters.clip.errors import InputError
from adapters.clip.models import load_model, save_checkpoint
from adapters.clip.ann import AnnIndex, ann_state, refresh_ann
from adapters.clip.exact import exact_search, exact_search_batch
from adapters.clip.search import Filters, Searcher, Term, parse_query, query_vector
from adapters.clip.sheets import contact_sheet
from adapters.clip.store import ModelBinding, Store
from conftest import pattern_image

DIM = 32
COLORS = ("red", "green", "blue", "teal")


def clustered(n: int, dim: int = DIM, clusters: int = 60, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres with a shared component, like embeddings of one modality."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    shared = rng.standard_normal(dim)
    shared /= np.linalg.norm(shared)
    noise = rng.standard_normal((n, dim))
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x = 0.8 * shared + centres[rng.integers(0, clusters, n)] + rng.uniform(0.5, 1.0, (n, 1)) * noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """20k clustered vectors with subsets, metadata and paths, and a built ANN index."""
    n = 20000
    vectors = clustered(n)
    root = tmp_path_factory.mktemp("synthetic") / "store"
    paths = [f"/photos/{COLORS[i % 4]}/{i:05d}.{'png' if i % 3 else 'jpg'}" for i in range(n)]
    metadata = [{"color": COLORS[i % 4], "year": 2000 + i % 25, "rare": i % 1000 == 0} for i in range(n)]
    store = Store.open(root, create=ModelBinding("synthetic", "0" * 32, DIM))
    store.add_vectors(paths[: n // 2], vectors[: n // 2], metadata=metadata[: n // 2], subset="train")
    store.add_vectors(paths[n // 2:], vectors[n // 2:], metadata=metadata[n // 2:], subset="validation")
    assert "built" in refresh_ann(store, build=True)
    yield store, vectors, paths, metadata
    store.close()


def fresh_queries(count: int, seed: int = 11) -> np.ndarray:
    """Queries from the same mixture as the data, not stored vectors: two items' sum plus noise."""
    data = clustered(20000)
    rng = np.random.default_rng(seed)
    picks = data[rng.integers(0, len(data), (count, 2))].sum(axis=1) + 0.3 * rng.standard_normal((count, DIM))
    return (picks / np.linalg.norm(picks, axis=1, keepdims=True)).astype(np.float32)


# ---- exact --------------------------------------------------------------------------------------
def test_exact_search_matches_a_full_sort():
    vectors = clustered(5000, seed=3)
    for query in fresh_queries(5):
        rows, scores = exact_search(vectors, query, 10)
        reference = np.argsort(-(vectors @ query), kind="stable")[:10]
        assert rows.tolist() == reference.tolist()
        np.testing.assert_allclose(scores, (vectors @ query)[reference], rtol=1e-6)
    allowed = np.zeros(5000, dtype=bool)
    allowed[::7] = True
    rows, _ = exact_search(vectors, query, 10, allowed)  # sparse mask: gathered rows
    assert rows.tolist() == [i for i in np.argsort(-(vectors @ query)) if i % 7 == 0][:10]
    batch = exact_search_batch(vectors, fresh_queries(4), 10, chunk=777)
    for q, row in zip(fresh_queries(4), batch):
        assert row.tolist() == exact_search(vectors, q, 10)[0].tolist()


# ---- ANN ----------------------------------------------------------------------------------------
def test_ann_recall_against_exact_on_a_small_set(synthetic):
    store, vectors, _, _ = synthetic
    snapshot = store.snapshot()
    ann = AnnIndex.load(store.data_dir)
    assert ann is not None and ann.nprobe < ann.nlist  # it really is approximate
    queries = fresh_queries(50)
    recalls = []
    for query in queries:
        truth = set(exact_search(snapshot.vectors, query, 10)[0].tolist())
        found = set(ann.search(snapshot.vectors, query, 10, None)[0].tolist())
        recalls.append(len(truth & found) / 10)
    assert np.mean(recalls) >= 0.95
    assert Searcher(store, ann="on").search(queries[0], k=10).method == "ann"


FILTERS = [
    Filters(subsets=["validation"]),
    Filters(where=["color=green"]),
    Filters(where=["year>=2020", "color!=red"]),
    Filters(path_glob="*.jpg"),
    Filters(path_glob="/photos/teal/*", subsets=["train"]),
    Filters(where=["rare=true"]),                 # 20 items: exact over just those rows
    Filters(where=["color~gr*"], min_score=0.5),
]


def _passes(filters: Filters, path: str, meta: dict, subset: str, score: float) -> bool:
    import fnmatch
    ok = not filters.subsets or subset in filters.subsets
    for condition in filters.conditions():
        value = meta.get(condition.key)
        ok &= {"=": value == condition.value, "!=": value != condition.value,
               ">=": value is not None and value >= condition.value,
               "~": fnmatch.fnmatchcase(str(value), str(condition.value))}[condition.op]
    if filters.path_glob:
        pattern = filters.path_glob if "/" in filters.path_glob else "*/" + filters.path_glob
        ok &= fnmatch.fnmatchcase(path, pattern)
    if filters.min_score is not None:
        ok &= score >= filters.min_score
    return ok


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: repr(f)[8:60])
def test_filters_return_k_matching_results_with_exact_and_ann(synthetic, filters):
    store, vectors, paths, metadata = synthetic
    query = fresh_queries(1, seed=5)[0]
    scores = vectors @ query
    subset = ["train" if i < len(paths) // 2 else "validation" for i in range(len(paths))]
    matching = [i for i in range(len(paths)) if _passes(filters, paths[i], metadata[i], subset[i], scores[i])]
    truth = [paths[i] for i in sorted(matching, key=lambda i: -scores[i])[:10]]
    assert matching, "the filter must select something for the test to mean anything"
    exact = Searcher(store, ann="off").search(query, k=10, filters=filters)
    approximate = Searcher(store, ann="on").search(query, k=10, filters=filters)
    assert [h.path for h in exact.hits] == truth
    assert len(approximate.hits) == min(10, len(matching))  # k results whenever k items match
    for hit in approximate.hits:
        i = paths.index(hit.path)
        assert _passes(filters, hit.path, metadata[i], subset[i], scores[i])
    assert len(set(h.path for h in approximate.hits) & set(truth)) >= 0.8 * len(truth)
    if filters.subsets == ["validation"]:  # half the store: far more than one search probes
        assert approximate.method == "ann"


def test_filtered_ann_that_comes_up_short_falls_back_to_exact(tmp_path):
    """The matching items are the 6000 farthest from the query: the lists ANN probes hold few of them."""
    vectors = clustered(20000, seed=6)
    query = fresh_queries(1, seed=3)[0]
    scores = vectors @ query
    far = np.zeros(len(vectors), dtype=bool)
    far[np.argsort(scores)[:6000]] = True
    with Store.open(tmp_path / "store", create=ModelBinding("synthetic", "2" * 32, DIM)) as store:
        store.add_vectors([f"/p/{i}.png" for i in range(len(vectors))], vectors,
                          metadata=[{"far": bool(f)} for f in far])
        refresh_ann(store, build=True)
        result = Searcher(store, ann="on").search(query, k=10, filters=Filters(where=["far=true"]))
    truth = sorted(np.flatnonzero(far), key=lambda i: -scores[i])[:10]
    assert result.method == "ann+exact" and result.candidates == 6000
    assert [h.path for h in result.hits] == [f"/p/{i}.png" for i in truth]


def test_ann_sees_rows_added_after_it_was_built_and_never_returns_removed_ones(tmp_path):
    vectors = clustered(6000, seed=4)
    store = Store.open(tmp_path / "store", create=ModelBinding("synthetic", "1" * 32, DIM))
    store.add_vectors([f"/a/{i}.png" for i in range(5000)], vectors[:5000])
    refresh_ann(store, build=True)
    store.add_vectors([f"/b/{i}.png" for i in range(1000)], vectors[5000:])   # not in the index yet
    with store.transaction() as txn:                                          # removed after the build
        txn.delete(store.item_by_path("/a/7.png").id)
    searcher = Searcher(store, ann="on")
    assert searcher.search(vectors[5500], k=3).hits[0].path == "/b/500.png"
    hits = searcher.search(vectors[7], k=20).hits
    assert "/a/7.png" not in [h.path for h in hits] and len(hits) == 20
    assert "extended by 1000" in refresh_ann(store)
    store.close()


# ---- queries ------------------------------------------------------------------------------------
def test_query_arithmetic_matches_hand_computed_vectors(embedder, tmp_path):
    image = tmp_path / "beach photo.png"
    pattern_image(1).save(image)
    terms = parse_query("2:cat + dog - people")
    assert terms == [Term(2.0, "text", "cat"), Term(1.0, "text", "dog"), Term(-1.0, "text", "people")]
    cat, dog, people = embedder.embed_texts(["cat", "dog", "people"]).vectors
    expected = 2 * cat + dog - people
    np.testing.assert_allclose(query_vector(terms, embedder), expected / np.linalg.norm(expected), atol=1e-6)

    mixed = parse_query(f'image:{image} + 0.5:a t-shirt - "sunset - orange"')
    assert [t.kind for t in mixed] == ["image", "text", "text"]
    assert mixed[1] == Term(0.5, "text", "a t-shirt") and mixed[2] == Term(-1.0, "text", "sunset - orange")
    photo = embedder.embed_images([image]).vectors[0]
    shirt, sunset = embedder.embed_texts(["a t-shirt", "sunset - orange"]).vectors
    expected = photo + 0.5 * shirt - sunset
    np.testing.assert_allclose(query_vector(mixed, embedder), expected / np.linalg.norm(expected), atol=1e-6)
    assert parse_query(str(image))[0] == Term(1.0, "image", str(image))  # an existing image file name


@pytest.mark.parametrize("text, message", [("dog +", "ends with an operator"), ('"dog', "unbalanced"),
                                           ("dog + - cat", "two operators"), ("  ", "empty query")])
def test_malformed_queries_are_clear_errors(text, message):
    with pytest.raises(InputError, match=message):
        parse_query(text)


def test_terms_that_cancel_out_are_an_error(embedder):
    with pytest.raises(InputError, match="cancel out"):
        query_vector(parse_query("cat - cat"), embedder)


# ---- command line and contact sheets -------------------------------------------------------------
@pytest.fixture
def indexed(tmp_path, embedder, capsys):
    folder = tmp_path / "pics ü"
    folder.mkdir()
    for i in range(6):
        pattern_image(i).save(folder / f"pic {i}.png")
    Image.new("RGB", (64, 64), (250, 10, 10)).save(folder / "red.png")
    store = tmp_path / "store"
    assert main(["index", str(folder), "--store", str(store), "--model", "tiny", "--device", "cpu",
                 "--subset", "train", "--meta", "camera=\"x\"", "--json"]) == 0
    return folder, store, json.loads(capsys.readouterr().out)


def test_cli_index_then_search_by_text_and_image_with_json_and_sheet(indexed, capsys, tmp_path):
    folder, store, summary = indexed
    assert (summary["added"], summary["failed"], summary["model"]) == (7, 0, "tiny")
    sheet = tmp_path / "hits.png"
    assert main(["search", "a red square", "--store", str(store), "-k", "3", "--json", "--sheet", str(sheet)]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and {"path", "score", "subset", "metadata"} <= set(hits[0])
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert hits[0]["subset"] == "train" and hits[0]["metadata"]["camera"] == "x"  # --meta wins over EXIF
    assert hits[0]["metadata"]["width"] == 64 and isinstance(hits[0]["metadata"]["year"], int)
    with Image.open(sheet) as drawn:
        assert drawn.width == 8 + 2 * (160 + 8) and drawn.height > 2 * 160  # 3 hits: a 2 x 2 grid
    assert main(["search", "--image", str(folder / "pic 2.png"), "--store", str(store), "-k", "1"]) == 0
    table = capsys.readouterr().out
    assert str(folder / "pic 2.png") in table and "1.000" in table
    assert main(["search", "anything", "--store", str(store), "--where", "camera=y", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_cli_search_with_another_model_names_the_stores_model(indexed, capsys, tmp_path):
    _, store, _ = indexed
    clip = load_model("tiny", device="cpu")
    with torch.no_grad():
        clip.model.logit_scale.add_(1.0)  # any weight change is another model
    other = save_checkpoint(clip, tmp_path / "other")
    capsys.readouterr()
    assert main(["search", "dog", "--store", str(store), "--model", str(other)]) == 1
    err = capsys.readouterr().err
    assert "'tiny'" in err and "index --reindex" in err
    assert main(["search", "--store", str(store)]) == 2  # usage: nothing to search for


def test_contact_sheet_survives_unreadable_images(tmp_path):
    good = tmp_path / "good.png"
    pattern_image(0).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    out = contact_sheet([("a very long query " * 10, [(good, "0.91 good.png"), (broken, "0.50 broken.png")]),
                         ("second row ü", [(tmp_path / "missing.png", "gone", False), (good, "ok", True)])],
                        tmp_path / "sheets" / "sheet.png", thumb=96, title="test sheet")
    with Image.open(out) as image:
        assert image.size[1] > 2 * 96 and image.mode == "RGB"
        pixels = np.asarray(image)
    assert (pixels == [215, 215, 215]).all(axis=2).sum() > 1000  # grey tiles for the unreadable ones


def test_searcher_loads_the_ann_index_once_per_store_and_refresh_drops_it(tmp_path):
    vectors = clustered(3000, seed=5)
    with Store.open(tmp_path / "store", create=ModelBinding("synthetic", "3" * 32, DIM)) as store:
        store.add_vectors([f"/c/{i}.png" for i in range(2500)], vectors[:2500])
        refresh_ann(store, build=True)
        key = ann_state(store.data_dir)["file"]
        assert store.cached_search_index(key) is None
        assert Searcher(store, ann="on").search(vectors[3], k=3).method == "ann"
        loaded = store.cached_search_index(key)
        assert isinstance(loaded, AnnIndex)
        Searcher(store, ann="on").search(vectors[4], k=3)
        assert store.cached_search_index(key) is loaded  # a second searcher reuses it
        store.add_vectors([f"/d/{i}.png" for i in range(500)], vectors[2500:])
        assert "extended by 500" in refresh_ann(store)
        assert store.cached_search_index(ann_state(store.data_dir)["file"]) is None
