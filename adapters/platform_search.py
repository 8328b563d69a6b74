"""Text search of a dataset on Dataloop with a model's own text tower: `ClipAdapter.search_dataset`.

App level (dtlpy): the query vector, the DQL and the scores come from the library
(`adapters.clip.vector_query`, shared with `python -m adapters.clip search`); this module asks the
platform. The model's feature set is the one dtlpy's `embed_items` fills (`model.feature_set`: the set
whose `modelId` is the model's); the platform ranks with the documented `$euclid` join; the scores are
computed here from the vectors the platform stores, so they are the cosine the local search reports.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Optional

import dtlpy as dl
import numpy as np

from adapters.clip.embed import Embedder
from adapters.clip.vector_query import (DEFAULT_K, check_k, cosine_scores, embed_text_query, items_filter,
                                        not_unit_length, results_json, vector_search_query)

EMBED_FIRST = "embed the dataset first: model.embed_datasets(dataset_ids=[{dataset_id!r}])"


class SearchUnavailable(RuntimeError):
    """What the user must do before searching (embed the dataset, re-embed with this model)."""


@dataclass
class SearchOutcome:
    items: list            # dl.Item, best first
    json: dict[str, Any]   # {"query": <the DQL it ran>, "results": [{"id", "name", "score"}]}


def search_dataset(model: dl.Model, embedder: Embedder, dataset: dl.Dataset, text: object,
                   k: Optional[int] = DEFAULT_K, filters: object = None,
                   logger: Optional[logging.Logger] = None) -> SearchOutcome:
    """The k items of `dataset` (among those `filters` selects) nearest to `text`, best first."""
    log = logger or logging.getLogger(__name__)
    k = check_k(DEFAULT_K if k is None else k)
    if isinstance(filters, dl.Filters):
        filters = filters.prepare()
    items_filter(filters)  # a bad filter fails before anything is embedded or asked
    feature_set = model_feature_set(model, embedder.dim, dataset)
    query = embed_text_query(text, embedder)
    if query.exceeds_context:
        log.warning(f"the query is longer than the model's {context_length(embedder)}-token context: "
                    "it reads the first tokens and ignores the rest")
    dql = vector_search_query(query.vector, feature_set.id, k, filters)
    found = dataset.items.list(filters=dl.Filters(custom_filter=copy.deepcopy(dql), resource=dl.FiltersResource.ITEM))
    items = list(found.items)[:k]
    if not items:
        require_embedded(feature_set, dataset)
        log.info(f"no embedded item of dataset {dataset.name!r} passes the filters")
    vectors = stored_vectors(feature_set, [item.id for item in items])
    kept = [item for item in items if item.id in vectors]
    if len(kept) < len(items):
        log.warning(f"{len(items) - len(kept)} result(s) lost their vector meanwhile (re-embedded or deleted): left out")
    matrix = np.asarray([vectors[item.id] for item in kept], dtype=np.float32).reshape(len(kept), embedder.dim)
    if not_unit_length(matrix):
        log.warning(f"feature set {feature_set.name!r} holds vectors that are not unit length (another "
                    "adapter's?): the platform ranks by Euclidean distance, which then is not the cosine order; "
                    "re-embed the dataset with this model")
    scores = cosine_scores(query.vector, matrix)
    hits = [(item.id, item.name, float(score)) for item, score in zip(kept, scores)]
    return SearchOutcome(kept, results_json(dql, hits))


def context_length(embedder: Embedder) -> int:
    return int(getattr(embedder.clip.tokenizer, "context_length", 77))


def model_feature_set(model: dl.Model, dim: int, dataset: dl.Dataset) -> dl.FeatureSet:
    """The feature set dtlpy's embed_items fills for `model`, checked against the model's dimension."""
    feature_set = model.feature_set
    if feature_set is None:
        raise SearchUnavailable(f"model {model.name!r} has no feature set yet: "
                                + EMBED_FIRST.format(dataset_id=dataset.id))
    if feature_set.size is not None and int(feature_set.size) != dim:
        raise SearchUnavailable(
            f"feature set {feature_set.name!r} holds {feature_set.size}-d vectors but model {model.name!r} makes "
            f"{dim}-d ones: they were not made by this model; create a new model (a new feature set) and "
            "embed the dataset with it")
    return feature_set


def require_embedded(feature_set: dl.FeatureSet, dataset: dl.Dataset) -> None:
    """Nothing came back: an error when the dataset has no vector in the set (an empty result of the
    filters is an answer, an unembedded dataset is a mistake to fix)."""
    filters = dl.Filters(resource=dl.FiltersResource.FEATURE, field="datasetId", values=dataset.id, page_size=1)
    if feature_set.features.list(filters=filters).items_count == 0:
        raise SearchUnavailable(f"feature set {feature_set.name!r} has no vector of dataset {dataset.name!r}: "
                                + EMBED_FIRST.format(dataset_id=dataset.id))


def stored_vectors(feature_set: dl.FeatureSet, item_ids: list[str]) -> dict[str, list[float]]:
    """{item id: its vector in `feature_set`} for the given items (one query)."""
    if not item_ids:
        return {}
    filters = dl.Filters(resource=dl.FiltersResource.FEATURE, field="entityId", values=item_ids,
                         operator=dl.FiltersOperations.IN, page_size=len(item_ids))
    page = feature_set.features.list(filters=filters).items  # one page: at most MAX_K ids, no progress bar
    return {feature.entity_id: list(feature.value) for feature in page}
