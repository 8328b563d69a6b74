"""A platform feature set's vectors: which were written by the earlier CLIP adapter, and which to redo.

The earlier Dataloop CLIP adapter uploaded raw (unnormalised) image and text features; this one
uploads unit vectors into the same feature set (named after the model). Dataloop's vector search
ranks by euclidean distance, so in a feature set holding both, a unit vector is near a unit query
and a raw one (norm around 10 for ViT-B/32) far from everything: new items rank ahead of old ones
whatever they show, until the old ones are embedded again. A vector is "old" when its length is
not 1: this adapter never writes one of another length.

Nothing here talks to the platform: the adapter reads the vectors and re-embeds what this decides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

# A unit vector written as float32 and sent as JSON is within 1e-6 of length 1; raw CLIP features
# are nowhere near it (ViT-B/32 norms are around 10). A wide tolerance never mistakes one for the other.
UNIT_TOLERANCE = 1e-3
SAMPLE_SIZE = 20  # vectors looked at before embedding into an existing feature set

MIXED_VECTORS_NOTE = (
    "feature set {name!r} holds vectors that are not unit length: they were written by the earlier CLIP "
    "adapter, which uploaded unnormalised features, while this one uploads unit vectors. Dataloop's search "
    "ranks by euclidean distance, so next to unit vectors the old ones rank last whatever their content, "
    "until their items are embedded again")


def vector_norm(vector: Sequence[float]) -> float:
    return math.sqrt(math.fsum(float(x) * float(x) for x in vector))


def is_current(vector: Optional[Sequence[float]], tolerance: float = UNIT_TOLERANCE) -> bool:
    """Whether a vector is one this adapter writes (unit length). Empty, NaN or another length: old."""
    if not vector:
        return False
    norm = vector_norm(vector)
    return not math.isnan(norm) and abs(norm - 1.0) <= tolerance


@dataclass
class VectorCheck:
    """What a look at some of a feature set's vectors found."""

    looked_at: int = 0
    old_entities: list[str] = field(default_factory=list)  # entity (item) ids whose vector is old

    @property
    def mixed(self) -> bool:
        return bool(self.old_entities)

    def add(self, vectors: Iterable[tuple[str, Optional[Sequence[float]]]]) -> "VectorCheck":
        """Count (entity id, vector) pairs in; remember the entities whose vector is old (once each)."""
        seen = set(self.old_entities)
        for entity_id, vector in vectors:
            self.looked_at += 1
            if not is_current(vector) and entity_id not in seen:
                seen.add(entity_id)
                self.old_entities.append(entity_id)
        return self


def check_vectors(vectors: Iterable[tuple[str, Optional[Sequence[float]]]]) -> VectorCheck:
    """The entities among (entity id, vector) pairs whose vector must be embedded again."""
    return VectorCheck().add(vectors)


def batches(ids: Sequence[str], size: int) -> list[list[str]]:
    """`ids` in runs of at most `size` (re-embedding goes batch by batch, so progress is never lost)."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    return [list(ids[start:start + size]) for start in range(0, len(ids), size)]


__all__ = ["UNIT_TOLERANCE", "SAMPLE_SIZE", "MIXED_VECTORS_NOTE", "VectorCheck", "check_vectors", "is_current",
           "vector_norm", "batches"]
