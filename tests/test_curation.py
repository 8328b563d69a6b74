"""Near-duplicate groups (adapters/clip/duplicates.py) and diverse samples (adapters/clip/sampling.py)
on seeded vectors whose groups and clusters are known."""
from __future__ import annotations

import numpy as np
import pytest

from adapters.clip.duplicates import Components, find_duplicate_groups
from adapters.clip.errors import InputError
from adapters.clip.sampling import covering_radius, diverse_sample

DIM = 64


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def near(v: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at exactly `cosine` to unit vector v."""
    noise = rng.standard_normal(v.shape)
    noise -= noise.dot(v) * v
    noise = noise / np.linalg.norm(noise)
    return unit(cosine * v + np.sqrt(1 - cosine ** 2) * noise)


def planted(n_distinct: int, groups: list[list[float]], seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    """Random distinct vectors (pairwise cosine ~0 in 64-d), then for each group a list of cosines:
    copies of one distinct vector at those cosines to it. Returns (vectors, expected groups)."""
    rng = np.random.default_rng(seed)
    x = list(unit(rng.standard_normal((n_distinct, DIM))))
    expected = []
    for g, cosines in enumerate(groups):
        members = [g]
        for cosine in cosines:
            members.append(len(x))
            x.append(near(x[g], cosine, rng))
        expected.append(members)
    return np.array(x, dtype=np.float32), expected


def as_sets(groups) -> set[frozenset]:
    return {frozenset(int(i) for i in g) for g in groups}


@pytest.mark.parametrize("method", ["exact", "cells"])
def test_groups_are_the_pairs_at_or_above_the_threshold(method):
    x, expected = planted(1200, [[0.99], [0.97, 0.96], [0.951], [0.9], [0.94, 0.999]])
    found = find_duplicate_groups(x, 0.95, method=method)
    # the 0.9 copy is no duplicate; of the last group only the 0.999 copy is
    want = as_sets(expected[:3]) | {frozenset({4, expected[4][2]})}
    assert as_sets(found.groups) == want
    assert found.method == method


def test_a_chain_is_one_group_even_when_its_ends_are_further_apart():
    rng = np.random.default_rng(1)
    a = unit(rng.standard_normal(DIM))
    b = near(a, 0.96, rng)
    c = near(b, 0.96, rng)
    while float(a @ c) >= 0.95:  # make sure the ends are not duplicates themselves
        c = near(b, 0.96, rng)
    x = np.vstack([a, b, c, unit(rng.standard_normal((20, DIM)))])
    (group,) = find_duplicate_groups(x, 0.95).groups
    assert set(group.tolist()) == {0, 1, 2}


def test_the_kept_item_is_the_lowest_order_then_the_lowest_row_and_comes_first():
    x, _ = planted(10, [[0.99, 0.98], [0.99]])
    # rows 0, 10, 11 are a group; 1 and 12 another. Row 11 is the earliest; rows 1 and 12 tie.
    order = np.array([5, 0, 9, 9, 9, 9, 9, 9, 9, 9, 7, 2, 0])
    groups = find_duplicate_groups(x, 0.95, order=order).groups
    assert [g.tolist() for g in groups] == [[1, 12], [11, 0, 10]]  # by the kept item's order


def test_zero_and_nan_vectors_are_in_no_group_and_unnormalised_vectors_count_by_direction():
    x, _ = planted(30, [[0.99]])
    x[30] *= 7.5  # the earlier adapter stored vectors unnormalised
    x = np.vstack([x, np.zeros(DIM, np.float32), np.zeros(DIM, np.float32), np.full(DIM, np.nan, np.float32)])
    assert as_sets(find_duplicate_groups(x, 0.95).groups) == {frozenset({0, 30})}


@pytest.mark.parametrize("bad", [0, -0.5, 1.01, float("nan"), "high", None])
def test_a_threshold_outside_0_1_is_refused(bad):
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        find_duplicate_groups(np.eye(3, dtype=np.float32), bad)


def test_threshold_1_groups_identical_vectors_only():
    x, _ = planted(20, [[0.999]])
    x = np.vstack([x, x[3]])
    assert as_sets(find_duplicate_groups(x, 1.0).groups) == {frozenset({3, 21})}


def test_components_fold_pending_pairs_without_losing_any():
    parts = Components(10, pending_limit=2)
    for a, b in [(0, 1), (2, 3), (1, 2), (5, 6), (8, 8), (7, 9), (9, 5)]:
        parts.add(np.array([a]), np.array([b]))
    assert as_sets(parts.groups(np.arange(10))) == {frozenset({0, 1, 2, 3}), frozenset({5, 6, 7, 9})}


# ---- diverse samples ---------------------------------------------------------------------------
def clusters(sizes: list[int], spread: float = 0.15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((len(sizes), DIM)))
    rows, labels = [], []
    for c, size in enumerate(sizes):
        rows.append(unit(centres[c] + spread * rng.standard_normal((size, DIM)) / np.sqrt(DIM)))
        labels += [c] * size
    order = rng.permutation(sum(sizes))
    return np.vstack(rows)[order], np.array(labels)[order]


def plain_greedy(x: np.ndarray, n: int, exclude=None) -> list[int]:
    """Farthest point first, rescoring every row at every pick (the textbook form)."""
    distance = np.full(len(x), np.inf) if exclude is None else 1 - (x @ exclude.T).max(axis=1)
    picks = []
    for step in range(n):
        if step == 0 and exclude is None:
            mean = x.sum(axis=0)
            pick = int(np.argmax(x @ (mean / np.linalg.norm(mean))))
        else:
            pick = int(np.argmax(distance))
        picks.append(pick)
        distance = np.minimum(distance, 1 - x @ x[pick])
        distance[picks] = -np.inf
    return picks


def test_the_sample_covers_every_cluster_small_ones_included():
    sizes = [50] * 12 + [3, 3, 3]
    x, labels = clusters(sizes)
    sample = diverse_sample(x, len(sizes))
    assert sorted(labels[sample.picks].tolist()) == list(range(len(sizes)))
    assert sample.radius == pytest.approx(covering_radius(x, sample.picks), abs=1e-6)
    random_radius = covering_radius(x, np.random.default_rng(0).choice(len(x), len(sizes), replace=False))
    assert sample.radius < random_radius


def test_lazy_greedy_picks_what_rescoring_everything_picks():
    x, _ = clusters([40, 30, 20, 10, 5, 2], spread=0.8, seed=3)
    assert diverse_sample(x, 60).picks.tolist() == plain_greedy(x, 60)
    exclude, rest = x[:15], x[15:]
    assert diverse_sample(rest, 20, exclude=exclude).picks.tolist() == plain_greedy(rest, 20, exclude)


def test_the_sample_keeps_away_from_excluded_items_and_is_deterministic():
    x, labels = clusters([30, 30, 30, 30], seed=5)
    exclude = x[labels < 2][:5]          # clusters 0 and 1 are already labelled
    first = diverse_sample(x[labels >= 2], 2, exclude=exclude)
    assert sorted(labels[labels >= 2][first.picks].tolist()) == [2, 3]
    again = diverse_sample(x[labels >= 2], 2, exclude=exclude)
    assert again.picks.tolist() == first.picks.tolist() and again.radius == first.radius


def test_sampling_every_usable_row_never_picks_one_twice_and_skips_unusable_rows():
    x, _ = clusters([4, 4])
    x = np.vstack([x, np.zeros((1, DIM), np.float32), x[:2]])  # a zero vector, two exact copies
    sample = diverse_sample(x, 10)
    assert sorted(sample.picks.tolist()) == [0, 1, 2, 3, 4, 5, 6, 7, 9, 10]
    assert sample.radius == 0.0


@pytest.mark.parametrize("n, message", [(0, "at least 1"), (11, "larger than the 10"), (2.5, "whole number"),
                                        ("3", "whole number")])
def test_a_bad_sample_size_is_refused(n, message):
    x, _ = clusters([5, 5])
    with pytest.raises(InputError, match=message):
        diverse_sample(x, n)
