"""Caption pairs: the one shape every data source reads into.

`CaptionPair` is an image file, a caption and a subset; a `PairSet` collects pairs with the
records that were skipped and why (`DataProblem`). One bad record never stops the rest from
loading; `PairSet.raise_if_problems` is strict mode. The readers that make pair sets are
manifests.py (local manifests; `load_pairs`), exports.py (Dataloop exports) and folders.py
(image folders).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import DataError

KNOWN_SUBSETS = ("train", "validation", "test")
# How many problems a strict-mode error message lists before "... and N more".
MAX_LISTED_PROBLEMS = 10


@dataclass(frozen=True)
class CaptionPair:
    """One (image, caption) training example."""

    image: Path                 # absolute path to the image file
    caption: str                # non-empty, stripped
    subset: str                 # 'train' | 'validation' (| 'test')
    label: Optional[str] = None  # class label when known (zero-shot accuracy)
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    source: str = ""            # where it came from (file and item), for error reports


@dataclass(frozen=True)
class DataProblem:
    """A record that was skipped, and why."""

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass
class PairSet:
    pairs: list[CaptionPair]
    problems: list[DataProblem]

    def subset(self, name: str) -> list[CaptionPair]:
        return [p for p in self.pairs if p.subset == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """{subset: {"pairs": n, "images": n}} for the subsets present."""
        out: dict[str, dict[str, int]] = {}
        for name in sorted({p.subset for p in self.pairs}, key=_subset_order):
            pairs = self.subset(name)
            out[name] = {"pairs": len(pairs), "images": len({p.image for p in pairs})}
        return out

    def summary(self) -> str:
        parts = [f"{name}: {c['pairs']} pairs / {c['images']} images" for name, c in self.counts().items()]
        text = "; ".join(parts) or "no pairs"
        return f"{text}; {len(self.problems)} records skipped" if self.problems else text

    def raise_if_problems(self) -> None:
        """Strict mode: any skipped record is fatal; the message lists them."""
        if self.problems:
            raise DataError(problems_message(self.problems))

    def extend(self, other: "PairSet") -> None:
        self.pairs.extend(other.pairs)
        self.problems.extend(other.problems)


def problems_message(problems: Sequence[DataProblem], limit: int = MAX_LISTED_PROBLEMS) -> str:
    listed = "; ".join(str(p) for p in problems[:limit])
    more = f"; ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} bad data record(s): {listed}{more}"


def _subset_order(name: str) -> tuple[int, str]:
    return (KNOWN_SUBSETS.index(name), name) if name in KNOWN_SUBSETS else (len(KNOWN_SUBSETS), name)
