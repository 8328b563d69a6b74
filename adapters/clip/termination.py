"""SIGTERM as a clean stop of a training (a pod preempted or shut down, `kill PID`).

By default SIGTERM ends a Python process on the spot: no exception, so nothing saves what the
training did since its last checkpoint, and dtlpy's train_model never gets to upload on failure.
`sigterm_stops_training()` turns it, while a training runs, into a request that the training
loop honours at its next step (`raise_if_stop_requested`) by raising `TrainingStopped`: the run
keeps its last finished epoch, and an exception goes up to whoever can save (dtlpy uploads the
model's training folder when `train` raises).

Python runs signal handlers in the main thread only, and only the main thread may install them:
a training running in another thread keeps the process's own SIGTERM behaviour (said once in the
log). The command line has its own handler (cli.py): there SIGTERM is Ctrl-C.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

from .errors import TrainingStopped

log = logging.getLogger(__name__)

_requested = threading.Event()


@contextlib.contextmanager
def sigterm_stops_training() -> Iterator[bool]:
    """While inside, SIGTERM asks the training to stop at its next step instead of ending the process.
    Yields whether it could (only in the main thread); the previous handler is back on leaving."""
    if threading.current_thread() is not threading.main_thread():
        log.info("training outside the main thread: a SIGTERM cannot be turned into a clean stop here")
        yield False
        return
    previous = signal.getsignal(signal.SIGTERM)
    _requested.clear()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield True
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        _requested.clear()


def _on_sigterm(signum, frame) -> None:
    _requested.set()
    log.warning("SIGTERM: the training stops at its next step, keeping its last finished epoch")


def raise_if_stop_requested() -> None:
    """Called by the training loop between steps."""
    if _requested.is_set():
        raise TrainingStopped("training stopped by SIGTERM (a shutdown or preemption)")
