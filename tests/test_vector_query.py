"""adapters/clip/vector_query.py: the query vector, DQL and scores search_dataset shares with the local
search (the platform side: tests/test_platform_search*.py)."""
import numpy as np
import pytest

from adapters.clip.errors import InputError
from adapters.clip.exact import exact_search
from adapters.clip.search import parse_query, query_vector
from adapters.clip.vector_query import (DEFAULT_ITEMS_FILTER, MAX_K, check_k, cosine_scores, embed_text_query,
                                        items_filter, not_unit_length, results_json, vector_search_query)


def test_the_query_vector_is_the_local_searchs(embedder):
    for text in ("a red square", "dog + beach - people", "2:cat + dog", "t-shirt", "beach.jpg", "image:x.png"):
        query = embed_text_query(text, embedder)  # every term text, as `search --text` reads it
        np.testing.assert_array_equal(query.vector, query_vector(parse_query(text, images=False), embedder))
        assert query.vector.dtype == np.float32 and abs(np.linalg.norm(query.vector) - 1) < 1e-5
        assert not query.exceeds_context


@pytest.mark.parametrize("text, message", [("", "empty"), ("  \t", "empty"), (None, "no query text"),
                                           (3, "must be a string"), ("dog + ", "ends with an operator"),
                                           ("dog + + cat", "two operators")])
def test_bad_query_texts(embedder, text, message):
    with pytest.raises(InputError, match=message):
        embed_text_query(text, embedder)


def test_a_text_as_long_as_the_context_is_flagged(embedder):
    context = embedder.clip.context_length
    assert embed_text_query(" ".join(["red"] * (context + 10)), embedder).exceeds_context
    assert embed_text_query("red " * 3 + "+ " + "blue " * (context + 10), embedder).exceeds_context
    assert not embed_text_query("red " * (context // 4), embedder).exceeds_context
    assert not embed_text_query(" ".join(["red"] * (context - 2)), embedder).exceeds_context  # exactly full


@pytest.mark.parametrize("k, ok", [(1, True), (MAX_K, True), (50.0, True), (0, False), (MAX_K + 1, False),
                                   (-3, False), (2.5, False), ("5", False), (True, False), (None, False)])
def test_k_is_a_whole_number_from_1_to_the_page_size(k, ok):
    if ok:
        assert check_k(k) == int(k)
    else:
        with pytest.raises(InputError, match="k must be"):
            check_k(k)


def test_filters_are_an_items_query_or_its_filter():
    assert items_filter(None) == items_filter({}) == DEFAULT_ITEMS_FILTER
    assert items_filter({"dir": "/a"}) == {"dir": "/a"}
    assert items_filter({"$and": [{"dir": "/a"}]}) == {"$and": [{"dir": "/a"}]}
    query = {"filter": {"dir": "/a"}, "resource": "items", "page": 3, "pageSize": 7, "sort": {"name": "ascending"}}
    assert items_filter(query) == {"dir": "/a"}  # the distance orders, k sizes the page
    assert items_filter({"filter": {}, "resource": "items"}) == DEFAULT_ITEMS_FILTER
    for bad, message in [([], "JSON object"), ("dir=/a", "JSON object"), ({"resource": "annotations"}, "items query"),
                         ({"filter": {}, "join": {"filter": {}}}, "join"), ({"filter": [1]}, "'filter' must be"),
                         ({"filter": {}, "limit": 3}, "unknown query key")]:
        with pytest.raises(InputError, match=message):
            items_filter(bad)


def test_the_dql_is_the_documented_vector_search():
    query = vector_search_query(np.array([0.6, 0.8], dtype=np.float32), "fs-1", 7, {"dir": "/a"})
    assert query == {"filter": {"dir": "/a"}, "page": 0, "pageSize": 7, "resource": "items",
                     "join": {"on": {"resource": "feature_vectors", "local": "entityId", "forigen": "id"},
                              "filter": {"value": {"$euclid": {"input": pytest.approx([0.6, 0.8]),
                                                               "$euclidSort": {"eu_dist": "ascending"}}},
                                         "featureSetId": "fs-1"}}}
    assert all(type(x) is float for x in query["join"]["filter"]["value"]["$euclid"]["input"])  # JSON numbers


def test_scores_are_cosines_and_the_euclidean_order_is_the_local_order():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((200, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    query = vectors[0] + 0.5 * vectors[1]
    query = (query / np.linalg.norm(query)).astype(np.float32)
    scores = cosine_scores(query, vectors)
    distances = np.linalg.norm(vectors - query, axis=1)
    np.testing.assert_allclose(scores, 1 - distances ** 2 / 2, atol=1e-5)
    rows, local_scores = exact_search(vectors, query, 20)
    assert np.argsort(distances, kind="stable")[:20].tolist() == rows.tolist()
    np.testing.assert_allclose(scores[rows], local_scores, atol=1e-6)
    assert not_unit_length(vectors) == 0 and not_unit_length(vectors * 2) == 200
    np.testing.assert_allclose(cosine_scores(query, vectors * 3), scores, atol=1e-5)  # cosine, whatever the norm


def test_results_json():
    assert results_json({"q": 1}, [("i1", "a.png", np.float32(0.51234567))]) == {
        "query": {"q": 1}, "results": [{"id": "i1", "name": "a.png", "score": 0.512346}]}
