"""The deterministic train/validation split by image, stratified (by directory, or any key)."""
from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any


def split_by_image(strata: dict[Any, str], *, val: float = 0.2, seed: int = 0,
                   key=str) -> dict[Any, str]:
    """{image: 'train' | 'validation'}: a deterministic split by image, stratified by `strata[image]`.

    Each image's place comes from a hash of (seed, key(image)), so the split does not depend on
    the order images are listed in, and adding images moves few others. Within each stratum
    round(n * val) images go to validation — at least one when the stratum has two or more
    images and val > 0, and never all of them.
    """
    by_stratum: dict[str, list[Any]] = defaultdict(list)
    for image, stratum in strata.items():
        by_stratum[stratum].append(image)
    assignment: dict[Any, str] = {}
    for stratum in sorted(by_stratum):
        members = sorted(by_stratum[stratum], key=lambda img: _split_hash(seed, key(img)))
        n = len(members)
        n_val = int(round(n * val))
        if val > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        for position, image in enumerate(members):
            assignment[image] = "validation" if position < n_val else "train"
    return assignment


def _split_hash(seed: int, key: str) -> str:
    return hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).hexdigest()
