"""Typed errors of the library.

The library raises these; the edges (the command line, the Dataloop adapter) turn
them into one-line messages. Each message says what failed and what to do.
"""
from __future__ import annotations

import errno


class ClipAdapterError(Exception):
    """Base class: every error this library raises on purpose."""


class ConfigError(ClipAdapterError, ValueError):
    """A configuration key is unknown, has the wrong type or is out of range."""


class ModelLoadError(ClipAdapterError):
    """A model name, checkpoint or weights file cannot be turned into a model."""


class WeightsUnavailableError(ModelLoadError):
    """Pretrained weights are neither cached nor downloadable (typically: offline).

    How a local checkpoint is given depends on the edge: the adapter's users set `model_name`, the
    command line's pass `--model PATH`. The message holds HOW_TO_PASS where that goes; `str()` says
    it the adapter's way, `told_as()` another way.
    """

    HOW_TO_PASS = "<how to pass>"
    ADAPTER_WAY = "set model_name to"

    def __init__(self, message: str) -> None:
        self.template = message
        super().__init__(self.told_as(self.ADAPTER_WAY))

    def told_as(self, how_to_pass: str) -> str:
        return self.template.replace(self.HOW_TO_PASS, how_to_pass)


class CheckpointError(ModelLoadError):
    """A file is not the checkpoint it claims to be, or does not fit the architecture."""


class InputError(ClipAdapterError):
    """One input (an image or a text) cannot be embedded. Carries the reason."""


class DataError(ClipAdapterError, ValueError):
    """Training or evaluation data is missing or malformed (a ValueError too, like ConfigError)."""


class StoreError(ClipAdapterError):
    """The local store cannot be opened, read or written."""


class ModelMismatchError(StoreError):
    """A store or checkpoint was made with another model than the one in use."""


class EngineError(ClipAdapterError):
    """An inference engine (ONNX Runtime, OpenVINO) or its export is unavailable or failed."""


class TrainingStopped(ClipAdapterError):
    """A training was asked to stop (SIGTERM); its last finished epoch is kept for resuming."""


class TrainingDivergedError(ClipAdapterError):
    """The loss or the weights became NaN or infinite; the best checkpoint so far is kept."""


DISK_FULL_HINT = "free some space and rerun: what was committed before is kept"


def describe_os_error(exc: OSError) -> str:
    """`/proc/x.npy: No such file or directory`, plus what to do when the disk is full (for the edges)."""
    where = f"{exc.filename}: " if exc.filename else ""
    line = f"{where}{exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        line += f"; {DISK_FULL_HINT}"
    return line
