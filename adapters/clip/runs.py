"""A training run's folder: what `fit()` records in it and what resuming reads back.

    run_dir/
      best/            project checkpoint of the best epoch (loadable wherever a model name is)
      last/            everything to resume exactly: weights, TRAINER_STATE, RUN_STATE
      wise_ft/         the interpolated checkpoint, when WiSE-FT ran
      metrics.jsonl    one EpochRecord per line (epoch 0 = the starting model)

The training loop (train.py) writes these; the reports (reports.py) and the command line read
them. Nothing here imports torch, so reading a run stays cheap.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from .errors import CheckpointError, ConfigError, DataError
from .files import atomic_path, strict_json, write_json_atomic

if TYPE_CHECKING:  # annotations only: loading a model's module would pull in torch
    from .models import ClipModel
    from .pairs import CaptionPair

BEST, LAST, WISE_FT = "best", "last", "wise_ft"
TRAINER_STATE = "trainer.pt"   # optimizer, scaler, torch RNG: tensors, loaded with weights_only=True
RUN_STATE = "state.json"       # epoch, step, history, early stopping, python/numpy RNG
METRICS_LOG = "metrics.jsonl"
RESUME_MANIFEST = "resume.json"  # in RESUME_ARCHIVE: whether its last/ is a run to continue
# Keys that may differ when resuming: where and how fast it runs, not what it computes.
RESUMABLE_CHANGES = frozenset({"device", "num_workers", "embeddings_size", "labels", "prompt_templates", "top_k",
                               "resume_upload_minutes"})
# What a resume needs from RUN_STATE and TRAINER_STATE; a file without them is damaged, not resumable.
RUN_STATE_KEYS = frozenset({"config", "data_fingerprint", "start_fingerprint", "epoch", "step", "finished",
                            "stopped_early", "history", "early_stopping", "python_rng", "numpy_rng"})
TRAINER_KEYS = frozenset({"optimizer", "scaler", "torch_rng", "cuda_rng"})


# ---- what fit() records and returns ---------------------------------------------------------
@dataclass
class EpochRecord:
    """One line of metrics.jsonl. Epoch 0 is the starting model (no training yet)."""

    epoch: int
    step: int
    val: dict[str, float]
    train_loss: Optional[float] = None
    lr: Optional[float] = None
    grad_norm: Optional[float] = None   # mean pre-clipping gradient norm over the epoch
    pairs_per_s: Optional[float] = None  # training throughput, validation excluded
    seconds: float = 0.0
    improved: bool = False
    skipped_pairs: int = 0               # pairs whose image failed to load this epoch

    def flat(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if k != "val"}
        row.update({f"val_{k}": v for k, v in self.val.items()})
        return row


@dataclass
class FitResult:
    clip: "ClipModel"               # the final weights, loaded in place
    run_dir: Path
    model_dir: Path                 # checkpoint to use: wise_ft/ if WiSE-FT ran, else best/
    best_epoch: int                 # 0 = no epoch beat the starting model
    start_metrics: dict[str, float]
    final_metrics: dict[str, float]
    history: list[EpochRecord]
    stopped_early: bool
    wise_ft_alpha: Optional[float] = None
    wise_ft_scores: dict[float, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


# ---- resume state --------------------------------------------------------------------------
@dataclass
class RunState:
    """The bookkeeping saved in last/RUN_STATE beside the weights and the trainer state."""

    config: dict[str, Any]
    data_fingerprint: str
    start_fingerprint: str
    epoch: int = 0
    step: int = 0
    finished: bool = False
    stopped_early: bool = False
    history: list[EpochRecord] = field(default_factory=list)
    data: Optional[str] = None   # where the pairs came from: `train --resume` reuses it
    images_fingerprint: Optional[str] = None  # the images' content (`images_fingerprint`); None: an older run


@dataclass
class SavedRun:
    """What a run folder's last/RUN_STATE says about the run, read without torch."""

    run_dir: Path
    config: dict[str, Any]
    epoch: int
    finished: bool
    data: Optional[str]


def read_saved_run(run_dir: str | Path) -> Optional[SavedRun]:
    """The run in `run_dir`, or None when it holds none yet."""
    path = Path(run_dir) / LAST / RUN_STATE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return SavedRun(Path(run_dir), dict(saved["config"]), int(saved["epoch"]), bool(saved["finished"]),
                        saved.get("data"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot resume from this run's state ({type(exc).__name__}: {exc}); train "
                              f"into a new --out, or delete {path.parent} to start this run over") from None


# ---- a run laid out flat in a model folder (what the platform keeps as a model's artifacts) ------
# Dataloop lists a model's artifacts with `/artifacts/models/<name>/*`, and `*` does not cross `/`:
# a file in a subfolder is uploaded but never listed, so never downloaded again. So the run's
# report, curves and metrics sit at the top of the model folder under flat names, and everything a
# resume needs is one archive beside them.
RESUME_ARCHIVE = "training_resume.zip"
FLAT_PREFIX = "training_"
FLAT_FILES = ("report.json", "report.md", "curves.png", METRICS_LOG)


def flat_name(name: str) -> str:
    """The name a run file (report.json, curves.png, ...) has at the top of a model folder."""
    return FLAT_PREFIX + name


def pack_resume_state(run_dir: str | Path, archive: str | Path, resumable: bool) -> None:
    """Write `archive` (atomically): RESUME_MANIFEST, plus last/, best/ and the metrics log when the run
    is one to continue. A run that finished gets an archive with the manifest only: uploaded over the
    old one, it says "done" and frees the space the weights took."""
    run_dir, archive = Path(run_dir), Path(archive)
    members: list[tuple[Path, str]] = []
    if resumable:
        for name in (LAST, BEST):
            members += [(p, p.relative_to(run_dir).as_posix()) for p in sorted((run_dir / name).rglob("*"))
                        if p.is_file()]
        if (run_dir / METRICS_LOG).is_file():
            members.append((run_dir / METRICS_LOG, METRICS_LOG))
    with atomic_path(archive) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as bundle:
        bundle.writestr(RESUME_MANIFEST, json.dumps({"resumable": bool(resumable)}))
        for path, name in members:
            bundle.write(path, name)


def archive_is_resumable(archive: str | Path) -> bool:
    """Whether `archive` holds a run to continue; False when it is missing, finished or unreadable."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            return json.loads(bundle.read(RESUME_MANIFEST))["resumable"] is True
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        return False


def unpack_resume_state(archive: str | Path, into: str | Path) -> Path:
    """Extract a resumable archive into the folder `into` (a run folder adopt_run can read)."""
    into = Path(into)
    try:
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(into)  # zipfile drops absolute paths and '..' from member names
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{archive}: cannot read the resume state ({type(exc).__name__}: {exc})") from None
    return into


def flatten_run(run_dir: str | Path, model_dir: str | Path, resumable: bool) -> list[str]:
    """Lay the run in `run_dir` (a subfolder of `model_dir`) out for a model's artifacts: its report,
    curves and metrics as flat `training_*` files and its resume state as RESUME_ARCHIVE, at the top of
    `model_dir`; then remove `run_dir`, so nothing is uploaded where a listing would not find it.
    Returns the names written."""
    import shutil

    run_dir, model_dir = Path(run_dir), Path(model_dir)
    written = []
    for name in FLAT_FILES:
        if (run_dir / name).is_file():
            with atomic_path(model_dir / flat_name(name)) as tmp:
                if name.endswith(".md"):  # its links name the run's files: point them at the flat names
                    text = (run_dir / name).read_text(encoding="utf-8")
                    for linked in FLAT_FILES:
                        text = text.replace(f"]({linked})", f"]({flat_name(linked)})")
                    tmp.write_text(text, encoding="utf-8")
                else:
                    shutil.copyfile(run_dir / name, tmp)
            written.append(flat_name(name))
    pack_resume_state(run_dir, model_dir / RESUME_ARCHIVE, resumable)
    shutil.rmtree(run_dir)
    return written + [RESUME_ARCHIVE]


# ---- a run folder carried elsewhere -----------------------------------------------------------
def adopt_run(saved: str | Path, run_dir: str | Path) -> Optional[SavedRun]:
    """Copy what resuming reads (last/, best/, the metrics log) from `saved` into `run_dir`."""
    import shutil

    saved, run_dir = Path(saved), Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in (LAST, BEST):
        shutil.rmtree(run_dir / name, ignore_errors=True)
        shutil.copytree(saved / name, run_dir / name)
    shutil.copy2(saved / METRICS_LOG, run_dir / METRICS_LOG)
    return read_saved_run(run_dir)


def resumed_config(saved: SavedRun, overrides: Sequence[tuple[str, str, Any]]) -> dict[str, Any]:
    """The run's own configuration, with `overrides` (what the user gave, key, value) that resuming allows.

    Only RESUMABLE_CHANGES may differ from the run's values; any other difference is a ConfigError
    that names what the user gave (e.g. `--set batch_size=128`), so they know what to drop.
    """
    from .config import ClipConfig  # validation normalises values (2e-5 and 0.00002 are one rate)

    config = dict(saved.config)
    for given, key, value in overrides:
        normalised = ClipConfig.from_dict({**saved.config, key: value}).to_dict()
        changed = sorted(k for k in normalised if normalised[k] != saved.config.get(k))
        refused = [k for k in changed if k not in RESUMABLE_CHANGES]
        if refused:
            was = ", ".join(f"{k}={json.dumps(saved.config.get(k))}" for k in refused)
            raise ConfigError(f"cannot resume {saved.run_dir} with {given}: the run was started with {was}, and "
                              f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume; drop {given}, "
                              f"or train into a new --out")
        config.update({k: normalised[k] for k in changed})
    return config


def check_resumable(saved: dict[str, Any], fresh: RunState, directory: Path) -> None:
    changed = sorted(k for k in set(saved["config"]) | set(fresh.config)
                     if k not in RESUMABLE_CHANGES and saved["config"].get(k) != fresh.config.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved['config'].get(k)!r} -> {fresh.config.get(k)!r}" for k in changed)
        raise ConfigError(f"cannot resume {directory.parent}: the configuration changed ({details}); "
                          f"restore it, or train into a new run directory")
    if saved["data_fingerprint"] != fresh.data_fingerprint:
        raise DataError(f"cannot resume {directory.parent}: the training/validation pairs are not the ones "
                        f"this run started with; train into a new run directory")
    if saved.get("images_fingerprint") and saved["images_fingerprint"] != fresh.images_fingerprint:
        raise DataError(f"cannot resume {directory.parent}: the content of its training/validation images changed "
                        f"since it started (same names and captions, other bytes); train into a new run directory")
    if saved["start_fingerprint"] != fresh.start_fingerprint:
        raise CheckpointError(f"cannot resume {directory.parent}: the starting model's weights differ from the "
                              f"ones this run started from")


def pairs_fingerprint(train: Sequence["CaptionPair"], val: Sequence["CaptionPair"]) -> str:
    """Identifies the data by file names and captions (not absolute paths: the folder may move)."""
    digest = hashlib.blake2b(digest_size=16)
    for pair in (*train, *val):
        digest.update(f"{pair.subset}\t{Path(pair.image).name}\t{pair.caption}\n".encode())
    return digest.hexdigest()


IMAGE_END_BYTES = 64 * 1024  # read from each end of an image file for `images_fingerprint`


def images_fingerprint(train: Sequence["CaptionPair"], val: Sequence["CaptionPair"]) -> str:
    """Identifies the images' content cheaply: per image its size and its first and last 64 KiB (the
    whole file up to 128 KiB). An edit changes the end of a compressed image's data, so this sees
    changed pixels without reading every byte; it leaves out mtimes and paths, which a copy or a
    fresh download (a resumed training on the platform) changes while the content stays."""
    digest = hashlib.blake2b(digest_size=16)
    for image in sorted({str(pair.image) for pair in (*train, *val)}):
        digest.update(f"{Path(image).name}\n".encode())
        try:
            with open(image, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                digest.update(f"{size}\n".encode())
                digest.update(fh.read(IMAGE_END_BYTES))
                if size > IMAGE_END_BYTES:
                    fh.seek(max(IMAGE_END_BYTES, size - IMAGE_END_BYTES))
                    digest.update(fh.read(IMAGE_END_BYTES))
        except OSError as exc:  # a missing image is part of what the data is
            digest.update(f"unreadable: {exc.strerror}\n".encode())
    return digest.hexdigest()


def python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_python_rng_state(state: list) -> None:
    random.setstate((state[0], tuple(state[1]), state[2]))


def numpy_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def set_numpy_rng_state(state: list) -> None:
    np.random.set_state((state[0], np.array(state[1], dtype=np.uint32), state[2], state[3], state[4]))


# ---- metrics.jsonl -------------------------------------------------------------------------
def rewrite_metrics_log(path: Path, history: Sequence[EpochRecord]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(strict_json(r.flat()) + "\n" for r in history), encoding="utf-8")
    tmp.replace(path)


def append_metrics(path: Path, record: EpochRecord) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(strict_json(record.flat()) + "\n")
