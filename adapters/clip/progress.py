"""Feedback on long work: a tqdm bar for counted work, status lines for steps that cannot be counted.

Bars go to stderr and hide themselves when stderr is not a terminal. Status lines (`say`) always
print, to stderr, each stamped with the seconds since the command started: they are rare (a
model's first use, an interrupted run) and are what a person watching a silent terminal needs.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional

# A step's description, for code that reports progress without knowing where it goes.
Progress = Callable[[str], None]

_clock = {"started": time.monotonic()}


def restart_clock() -> None:
    """Count from now (a command's entry point calls this: its summary counts its whole wall time)."""
    _clock["started"] = time.monotonic()


def elapsed() -> float:
    """Seconds since the command started."""
    return time.monotonic() - _clock["started"]


def say(message: str) -> None:
    """One status line on stderr, stamped with the command's elapsed time: `[  4.2 s] exporting ...`."""
    print(f"[{elapsed():5.1f} s] {message}", file=sys.stderr, flush=True)


def progress_bar(total: Optional[int], desc: str, *, unit: str = "img", enabled: bool = True, leave: bool = True):
    from tqdm import tqdm  # imported here: `python -m adapters.clip --help` stays quick

    # disable=None lets tqdm hide itself when stderr is not a terminal (CI logs, pipes).
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, file=sys.stderr,
                dynamic_ncols=True, leave=leave)
