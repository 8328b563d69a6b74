"""The dataset browser's search panel (panels/search.js) is tested in JavaScript (tests/js, `node --test`)
against fixtures of what `search_dataset` gives it. These checks keep the fixtures honest: they are
what the Python side produces, so the panel is tested on real shapes, not on invented ones."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from adapters.clip.vector_query import results_json, vector_search_query
from adapters.platform_search import SearchUnavailable, model_feature_set

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = json.loads((ROOT / "tests" / "js" / "fixtures.json").read_text())
PANEL = (ROOT / "panels" / "search.js").read_text()


def panel_constant(name: str) -> str:
    return re.search(rf"^const {name} = ([^\s]+)", PANEL, re.M).group(1).strip("'")


def test_the_search_output_is_what_search_dataset_returns_for_the_panels_call():
    k = int(panel_constant("RESULTS"))
    query = vector_search_query(FIXTURES["query_vector"], FIXTURES["feature_set_id"], k,
                                {"filter": FIXTURES["browser_filter"]})  # the panel passes the browser's filter
    hits = [(r["id"], r["name"], r["score"]) for r in FIXTURES["search_json"]["results"]]
    assert FIXTURES["search_json"] == results_json(query, hits)


def test_the_not_embedded_message_is_the_adapters():
    fixture = FIXTURES["not_embedded"]
    model = SimpleNamespace(feature_set=None, name=fixture["model"])
    with pytest.raises(SearchUnavailable) as caught:
        model_feature_set(model, 512, SimpleNamespace(id=fixture["dataset_id"]))
    # ClipAdapter.search_dataset prefixes "CLIP adapter: "; the fake platform records an execution's
    # failure as "<exception type>: <message>" (tests/test_platform_search_flows.py sees it so).
    assert fixture["message"] == f"ClipAdapterFailure: CLIP adapter: {caught.value}"


def test_the_panel_searches_this_apps_models_with_the_declared_function():
    manifest = json.loads((ROOT / "dataloop.json").read_text())
    assert panel_constant("CLIP_APP") == manifest["name"]
    functions = {f["name"] for m in manifest["components"]["modules"] for f in m["functions"]}
    assert panel_constant("SEARCH_FUNCTION") in functions
