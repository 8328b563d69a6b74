"""A text query against vectors kept elsewhere: Dataloop's feature sets.

The same query embedding as the local search (`search.parse_query` + `search.query_vector`: arithmetic,
weights, one normalised vector) and the same scoring (cosine, what `exact.exact_search` ranks by), so
one model gives the same order locally and on the platform. What differs is who ranks: the platform
answers the documented vector-search DQL, a join of the items on their `feature_vectors` in one feature
set with `value: {$euclid: {input, $euclidSort: {eu_dist: "ascending"}}}` (dtlpy-documentation,
tutorials/data_management/feature_vectors/chapter.md). For unit vectors the Euclidean order is the
cosine order: d^2 = 2 - 2 cos, so cos = 1 - d^2 / 2.

Pure JSON and numpy: the library never imports dtlpy (the adapter sends the query).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from .errors import InputError
from .search import parse_query, query_vector

if TYPE_CHECKING:
    from .embed import Embedder

DEFAULT_K = 50
MAX_K = 1000            # one page of the platform's item query (pageSize up to 1000)
# The items a dataset browser lists by default (the documentation's vector-search example).
DEFAULT_ITEMS_FILTER: dict = {"$and": [{"hidden": False}, {"type": "file"}]}
UNIT_TOLERANCE = 1e-3   # a stored vector whose norm is further from 1 was not made by this adapter


@dataclass(frozen=True)
class TextQuery:
    text: str
    vector: np.ndarray          # (D,) float32, unit length
    exceeds_context: bool        # a term is longer than the model's token context: its end is ignored


def embed_text_query(text: object, embedder: "Embedder") -> TextQuery:
    """`text` (query arithmetic allowed: "dog + beach - people") as one unit vector of `embedder`'s model.

    Every term is text (`search --text`): a platform service has no local image files to read, and
    "beach.jpg" typed in a search box means those words.
    """
    if text is None:
        raise InputError("no query text: give the words to search for (input 'text')")
    if not isinstance(text, str):
        raise InputError(f"the query text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InputError("the query text is empty: give the words to search for")
    terms = parse_query(text, images=False)
    return TextQuery(text, query_vector(terms, embedder), any(exceeds_context(t.value, embedder) for t in terms))


def exceeds_context(text: str, embedder: "Embedder") -> bool:
    """True when the model reads only the start of `text`: its tokens (with the start and end ones)
    exceed the context (77 for OpenAI's CLIP), the rule the command line warns by. A tokenizer without
    `encode` is asked for the tokens: CLIP's pad with 0, so a filled last position tells."""
    tokenizer = embedder.clip.tokenizer
    context = getattr(tokenizer, "context_length", None)
    encode = getattr(tokenizer, "encode", None)
    if context and encode is not None:
        return len(encode(text.strip())) + 2 > context
    tokens = np.asarray(tokenizer([text.strip()]))
    return bool(tokens.shape[-1] and tokens[0, -1] != 0)


def check_k(k: object) -> int:
    """k as an int (JSON may carry 50.0), or an error saying the range."""
    whole = isinstance(k, (int, np.integer)) or (isinstance(k, float) and k.is_integer())
    if isinstance(k, bool) or not whole:
        raise InputError(f"k must be a whole number from 1 to {MAX_K}, got {k!r}")
    if not 1 <= int(k) <= MAX_K:
        raise InputError(f"k must be from 1 to {MAX_K}, got {k}")
    return int(k)


def items_filter(filters: object) -> dict:
    """The `filter` of the caller's items query (the whole query or just its filter), or the default.

    A join is refused: DQL has one join per query, and the vector search needs it; so is a query of
    another resource, a page or a sort (the distance orders the results, k sizes the page).
    """
    if filters is None or filters == {}:
        return copy.deepcopy(DEFAULT_ITEMS_FILTER)
    if not isinstance(filters, dict):
        raise InputError(f"filters must be an items DQL query (a JSON object), got {type(filters).__name__}")
    query_keys = {"filter", "resource", "join", "sort", "page", "pageSize"}
    if not set(filters) & query_keys or set(filters) & {"$and", "$or"}:
        filters = {"filter": filters}  # just the filter part
    resource = filters.get("resource", "items")
    if resource != "items":
        raise InputError(f"filters must be an items query, got a query of resource {resource!r}")
    if filters.get("join"):
        raise InputError("filters with a join (on annotations, say) cannot be combined with the vector search, "
                         "which joins the items with their feature vectors: filter on item fields only")
    unknown = sorted(set(filters) - query_keys)
    if unknown:
        raise InputError(f"filters: unknown query key(s) {', '.join(map(repr, unknown))}")
    inner = filters.get("filter")
    if inner is None or inner == {}:
        return copy.deepcopy(DEFAULT_ITEMS_FILTER)
    if not isinstance(inner, dict):
        raise InputError(f"filters: 'filter' must be a JSON object, got {type(inner).__name__}")
    return copy.deepcopy(inner)


def vector_search_query(vector: Sequence[float], feature_set_id: str, k: int, filters: object = None) -> dict:
    """The items DQL query for the k items whose vectors in `feature_set_id` are nearest to `vector`,
    among those `filters` selects: the documented vector search (module docstring), one page of k."""
    return {
        "filter": items_filter(filters),
        "page": 0,
        "pageSize": check_k(k),
        "resource": "items",
        "join": {
            "on": {"resource": "feature_vectors", "local": "entityId", "forigen": "id"},
            "filter": {
                "value": {"$euclid": {"input": [float(x) for x in vector],
                                      "$euclidSort": {"eu_dist": "ascending"}}},
                "featureSetId": feature_set_id,
            },
        },
    }


def cosine_scores(query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(N,) cosine similarity of each row of `vectors` with the unit `query`: the dot product the local
    search ranks by, divided by each row's norm (1 for what this adapter stores)."""
    vectors = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), len(query))
    norms = np.linalg.norm(vectors, axis=1)
    return (vectors @ np.asarray(query, dtype=np.float32)) / np.where(norms > 0, norms, 1.0)


def not_unit_length(vectors: np.ndarray) -> int:
    """How many rows are not unit vectors (their Euclidean order is not the cosine order)."""
    norms = np.linalg.norm(np.asarray(vectors, dtype=np.float64), axis=-1).reshape(-1)
    return int(np.count_nonzero(np.abs(norms - 1.0) > UNIT_TOLERANCE))


def results_json(query: dict, hits: Sequence[tuple[str, Optional[str], float]]) -> dict[str, Any]:
    """`search_dataset`'s JSON output: the query it ran and the hits (id, name, score), best first."""
    return {"query": query, "results": [{"id": i, "name": n, "score": round(float(s), 6)} for i, n, s in hits]}
