"""One progress bar for long work: tqdm on stderr, silent when stderr is not a terminal."""
from __future__ import annotations

import sys
from typing import Optional


def progress_bar(total: Optional[int], desc: str, *, unit: str = "img", enabled: bool = True, leave: bool = True):
    from tqdm import tqdm  # imported here: `python -m adapters.clip --help` stays quick

    # disable=None lets tqdm hide itself when stderr is not a terminal (CI logs, pipes).
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, file=sys.stderr,
                dynamic_ncols=True, leave=leave)
