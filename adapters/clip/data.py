"""Caption pairs for training and evaluation: Dataloop exports (both layouts), local manifests.

INTERFACE STUB (filled in by the data work): other modules code against these names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

SUBSETS = ("train", "validation")


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


@dataclass
class PairSet:
    pairs: list[CaptionPair]
    problems: list[DataProblem]

    def subset(self, name: str) -> list[CaptionPair]:
        return [p for p in self.pairs if p.subset == name]


def load_pairs(path: str | Path, *, strict: bool = False) -> PairSet:
    """Read a manifest (.jsonl/.csv) or a Dataloop export folder (either layout).

    Bad records become `problems` (strict=True raises DataError instead).
    """
    raise NotImplementedError
