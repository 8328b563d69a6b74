"""Near-duplicates and diverse samples of a dataset on Dataloop: `ClipAdapter.find_duplicates` and
`ClipAdapter.sample_diverse`.

App level (dtlpy); the decisions are the library's (`adapters.clip.duplicates`, `adapters.clip.sampling`,
shared with `python -m adapters.clip duplicates|sample`). The vectors are the ones the model's
`embed_items`/`embed_dataset` put in its feature set (`model.feature_set`, the set whose `modelId` is
the model's), read in pages of PAGE_SIZE through dtlpy's public `feature_set.features.list`, never
re-embedded. Memory: the selected items' ids and creation times, one float32 matrix of their vectors,
and one page of JSON at a time.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import dtlpy as dl
import numpy as np

from adapters.clip.duplicates import DEFAULT_THRESHOLD, check_threshold, find_duplicate_groups
from adapters.clip.errors import ClipAdapterError, InputError
from adapters.clip.sampling import check_sample_size, diverse_sample

PAGE_SIZE = 1000
GROUP_KEY = "duplicate_group"          # metadata.user.clip.duplicate_group = the kept item's id
UPDATE_THREADS = 8                     # item updates wait on the network, not the CPU


class NoVectors(ClipAdapterError):
    """The model has no feature set (or no vectors of this dataset): embed the dataset first."""


def embed_first(dataset: dl.Dataset) -> str:
    return f"embed the dataset first: model.embed_datasets(dataset_ids=[{dataset.id!r}])"


# ---- reading -------------------------------------------------------------------------------------
def items_filters(filters: Any, what: str = "filters") -> dl.Filters:
    """An items query as the platform passes it (a DQL dict, {"filter": ...}), or all items."""
    if filters is None or filters == {}:
        return dl.Filters(page_size=PAGE_SIZE)
    if isinstance(filters, dl.Filters):
        filters.page_size = PAGE_SIZE
        return filters
    if not isinstance(filters, dict):
        raise InputError(f"{what} must be an items query (a JSON object such as {{\"filter\": {{\"dir\": "
                         f"\"/photos\"}}}}), got {type(filters).__name__}")
    query = dl.Filters(custom_filter=filters)
    query.page_size = PAGE_SIZE
    return query


@dataclass
class Selection:
    """The items a query selects: ids sorted, their creation times, their current duplicate group."""
    ids: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    groups: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, dataset: dl.Dataset, filters: Any, what: str = "filters") -> "Selection":
        rows: list[tuple[str, str, Optional[str]]] = []
        for page in dataset.items.list(filters=items_filters(filters, what)):
            for item in page:
                user = (item.metadata or {}).get("user") or {}
                group = (user.get("clip") or {}).get(GROUP_KEY) if isinstance(user.get("clip"), dict) else None
                rows.append((item.id, item.created_at or "", group))
        rows.sort()
        return cls([r[0] for r in rows], [r[1] for r in rows], {r[0]: r[2] for r in rows if r[2] is not None})


def model_feature_set(model: dl.Model, dataset: dl.Dataset) -> dl.FeatureSet:
    feature_set = model.feature_set
    if feature_set is None:
        raise NoVectors(f"model {model.name!r} has no feature set: {embed_first(dataset)}")
    return feature_set


def read_vectors(feature_set: dl.FeatureSet, dataset: dl.Dataset, ids: list[str],
                 logger: logging.Logger) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, has_vector): row i is the vector of ids[i] in the feature set (zeros when it has none)."""
    rows = {item_id: row for row, item_id in enumerate(ids)}
    dim = int(feature_set.size) if feature_set.size else None
    matrix: Optional[np.ndarray] = np.zeros((len(ids), dim), np.float32) if dim else None
    found = np.zeros(len(ids), dtype=bool)
    wrong = 0
    query = dl.Filters(resource=dl.FiltersResource.FEATURE, field="datasetId", values=dataset.id)
    query.page_size = PAGE_SIZE
    for page in feature_set.features.list(filters=query):
        for feature in page:
            row = rows.get(feature.entity_id)
            if row is None:
                continue
            value = np.asarray(feature.value, dtype=np.float32).reshape(-1)
            if matrix is None:
                matrix = np.zeros((len(ids), len(value)), np.float32)
            if value.shape[0] != matrix.shape[1]:
                wrong += 1
                continue
            matrix[row], found[row] = value, True
    if wrong:
        logger.warning(f"{wrong} vectors in feature set {feature_set.name!r} do not have its size: left out")
    if matrix is None:
        matrix = np.zeros((len(ids), 1), np.float32)
    return matrix, found


# ---- find_duplicates -----------------------------------------------------------------------------
def group_changes(groups: list[list[str]], selection: Selection) -> dict[str, Optional[str]]:
    """{item id: the kept id it must carry, or None to lose the field}: only items whose field differs."""
    wanted = {item_id: group[0] for group in groups for item_id in group}
    changes: dict[str, Optional[str]] = {i: kept for i, kept in wanted.items() if selection.groups.get(i) != kept}
    changes.update({i: None for i in selection.groups if i not in wanted})
    return changes


def apply_group_changes(dataset: dl.Dataset, changes: dict[str, Optional[str]], logger: logging.Logger) -> int:
    """Set or remove metadata.user.clip.duplicate_group through item.update(), which sends only the
    difference (dtlpy's DictDiffer): nothing else in the metadata changes. Returns how many failed."""
    def update(item: dl.Item) -> Optional[str]:
        try:
            clip = item.metadata.setdefault("user", {}).setdefault("clip", {})
            if changes[item.id] is None:
                clip.pop(GROUP_KEY, None)
            else:
                clip[GROUP_KEY] = changes[item.id]
            item.update()
        except Exception as exc:  # noqa: BLE001 - one item that cannot be updated must not stop the rest
            return f"item {item.id}: could not update its duplicate group: {type(exc).__name__}: {exc}"
        return None

    ids = sorted(changes)
    failures = []
    with ThreadPoolExecutor(max_workers=UPDATE_THREADS) as pool:
        for start in range(0, len(ids), PAGE_SIZE):
            query = dl.Filters(field="id", values=ids[start:start + PAGE_SIZE], operator=dl.FiltersOperations.IN)
            query.page_size = PAGE_SIZE
            for page in dataset.items.list(filters=query):
                failures += [f for f in pool.map(update, list(page)) if f]
    for failure in failures:
        logger.warning(failure)
    return len(failures)


def find_duplicates(model: dl.Model, dataset: dl.Dataset, filters: Any = None, threshold: Any = None,
                    logger: Optional[logging.Logger] = None) -> dict[str, Any]:
    """{"groups": [[kept id, other ids...], ...], "missing": [selected ids without a vector], "threshold": t},
    and every member's metadata.user.clip.duplicate_group set to its kept id (removed from the
    selected items no longer in a group)."""
    log = logger or logging.getLogger(__name__)
    threshold = check_threshold(DEFAULT_THRESHOLD if threshold is None else threshold)
    items_filters(filters)                   # a bad query fails before anything is read
    feature_set = model_feature_set(model, dataset)
    selection = Selection.of(dataset, filters)
    vectors, found = read_vectors(feature_set, dataset, selection.ids, log)
    rows = np.flatnonzero(found)
    if selection.ids and not len(rows):
        raise NoVectors(f"none of the {len(selection.ids)} selected items has a vector in feature set "
                        f"{feature_set.name!r}: {embed_first(dataset)}")
    missing = [selection.ids[i] for i in np.flatnonzero(~found)]
    order = np.array([selection.created[i] for i in rows], dtype=object)
    rank = np.empty(len(rows), dtype=np.int64)
    rank[sorted(range(len(rows)), key=lambda r: (order[r], selection.ids[rows[r]]))] = np.arange(len(rows))
    result = find_duplicate_groups(vectors[rows], threshold, rank)
    del vectors
    groups = [[selection.ids[rows[r]] for r in group] for group in result.groups]
    changes = group_changes(groups, selection)
    failed = apply_group_changes(dataset, changes, log) if changes else 0
    log.info(f"find_duplicates on {dataset.name!r}: {len(groups)} groups, {sum(map(len, groups))} items among "
             f"{len(rows)} with vectors ({len(missing)} without); {len(changes) - failed} items' metadata updated "
             f"({result.method}, {result.seconds:.1f} s)")
    return {"groups": groups, "missing": missing, "threshold": threshold}


# ---- sample_diverse ------------------------------------------------------------------------------
@dataclass
class SampleOutcome:
    items: list                # dl.Item, in pick order
    json: dict[str, Any]       # {"items": [ids in pick order], "radius": r}


def sample_diverse(model: dl.Model, dataset: dl.Dataset, n: Any, filters: Any = None, exclude: Any = None,
                   logger: Optional[logging.Logger] = None) -> SampleOutcome:
    """n items of the selection by greedy k-center, far from the `exclude` query's items."""
    log = logger or logging.getLogger(__name__)
    if n is None:
        raise InputError("n (how many items to pick) is required")
    check_sample_size(n)                     # a bad n fails before anything is read
    items_filters(filters)
    if exclude is not None:
        items_filters(exclude, "exclude")
    feature_set = model_feature_set(model, dataset)
    selection = Selection.of(dataset, filters)
    excluded = Selection.of(dataset, exclude, "exclude") if exclude else Selection()
    skip = set(excluded.ids)
    candidates = [i for i in selection.ids if i not in skip]
    ids = candidates + excluded.ids
    vectors, found = read_vectors(feature_set, dataset, ids, log)
    usable = np.flatnonzero(found[:len(candidates)])
    n = check_sample_size(n, len(usable))
    if len(usable) < len(candidates):
        log.warning(f"{len(candidates) - len(usable)} selected items have no vector in feature set "
                    f"{feature_set.name!r} and cannot be picked: {embed_first(dataset)}")
    away = vectors[len(candidates):][found[len(candidates):]]
    sample = diverse_sample(vectors[usable], n, exclude=away if len(away) else None)
    picked = [candidates[usable[p]] for p in sample.picks]
    log.info(f"sample_diverse on {dataset.name!r}: {n} of {len(usable)} items (away from {len(away)} excluded), "
             f"covering radius {sample.radius:.3f} ({sample.seconds:.1f} s)")
    return SampleOutcome(fetch_items(dataset, picked), {"items": picked, "radius": round(sample.radius, 6)})


def fetch_items(dataset: dl.Dataset, ids: list[str]) -> list:
    """The items with these ids, in this order (pages of an id query, not one request per item)."""
    by_id: dict[str, Any] = {}
    for start in range(0, len(ids), PAGE_SIZE):
        query = dl.Filters(field="id", values=ids[start:start + PAGE_SIZE], operator=dl.FiltersOperations.IN)
        query.page_size = PAGE_SIZE
        for page in dataset.items.list(filters=query):
            by_id.update((item.id, item) for item in page)
    return [by_id[i] for i in ids if i in by_id]
