"""`fit()`: contrastive fine-tuning of a CLIP on caption pairs, readable top to bottom.

The loop runs in a fixed order (nanoGPT's): plan the epoch's batches → for each batch set the
learning rate, forward/backward (in chunks with gradient caching), clip, step, clamp the logit
scale → validate → early-stopping bookkeeping → checkpoints → log. `ContrastiveTask` owns the
CLIP-specific forward and loss, so the loop itself stays generic.

Recipe (why each piece is there: docs/fine-tuning.md):
- AdamW with the configured betas, epsilon and weight decay; no decay on biases, norm gains,
  embeddings (token, positional, class) or the logit scale.
- Linear warmup over `warmup_ratio` of the steps, then cosine decay to zero.
- Mixed precision on GPU (autocast; fp32 master weights; GradScaler for fp16).
- Logit scale clamped at ln(100), as in CLIP's pre-training. Gradient-norm clipping.
- No batch holds the same image or the same caption twice: those would be false negatives.
- The starting model is validated first and is the first "best": if no epoch beats it, the
  output is the starting model, never a model that got worse.
- `last/` holds everything to resume exactly (weights, optimizer, scaler, step, RNG states);
  `best/` is a project checkpoint, loadable wherever a model name is accepted.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .config import ClipConfig
from .pairs import CaptionPair, PairSet
from .embed import Embedder, capped_texts
from .progress import progress_bar
from .errors import CheckpointError, ConfigError, DataError, InputError, TrainingDivergedError, TrainingStopped
from .images import load_image
from .faults import faultpoint
from .files import atomic_directory, atomic_path, recover_directory, write_json_atomic
from .models import (CHECKPOINT_WEIGHTS, ClipModel, load_model, read_state_dict, save_checkpoint,
                     write_checkpoint_files)
from .reports import CURVES_PNG, plot_curves, write_report
from .termination import raise_if_stop_requested
from .runs import (BEST, LAST, METRICS_LOG, RUN_STATE, RUN_STATE_KEYS, TRAINER_KEYS, TRAINER_STATE, WISE_FT,
                   EpochRecord, FitResult, RunState, append_metrics, check_resumable, images_fingerprint,
                   numpy_rng_state, pairs_fingerprint, python_rng_state, rewrite_metrics_log, set_numpy_rng_state,
                   set_python_rng_state)

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's own clamp: temperature never below 0.01
WISE_FT_GRID = tuple(round(0.1 * i, 1) for i in range(11))
# Parameters that are lookup tables, not linear maps: decoupled weight decay would shrink the rows
# of tokens absent from the fine-tuning captions toward zero on every step (forgetting words).
EMBEDDING_PARAMS = ("token_embedding", "positional_embedding", "class_embedding")
PROGRESS_EVERY = 10  # steps between loss readings for the progress bar (each reading waits for the GPU)

# ======================================================================================
# The loop
# ======================================================================================
def fit(config: ClipConfig, data: Union[PairSet, Sequence[CaptionPair]], run_dir: Union[str, Path], *,
        clip: Optional[ClipModel] = None, resume: bool = False,
        on_epoch_end: Optional[Callable[[EpochRecord, int], None]] = None,
        show_progress: bool = True, data_source: Optional[str] = None) -> FitResult:
    """Fine-tune `clip` (or `config.model_name`) on the 'train' pairs, validating on 'validation'.

    `resume=True` continues from `run_dir/last` when it exists (else starts fresh); a resumed run
    ends exactly where an uninterrupted one would. `on_epoch_end(record, num_epochs)` is called
    after each epoch's checkpoints are written. `data_source` (where `data` was read from) is kept
    in the run's state for `train --resume`. Returns the final model, loaded into `clip`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_pairs, val_pairs, problems = split_pairs(data)
    if config.batch_size < 2:
        raise ConfigError("batch_size must be at least 2 for contrastive training (a batch of one has no negatives)")
    seed_everything(config.seed)
    clip = clip if clip is not None else load_model(config.model_name, device=config.device,
                                                    precision=config.precision)
    clip.use_torch()  # an exported engine would go stale with the first step; validation too stays comparable
    task = ContrastiveTask(clip, freeze=config.freeze, grad_cache_chunk=config.grad_cache_chunk)
    optimizer = build_optimizer(task, config)
    scaler = torch.amp.GradScaler(clip.device.type, enabled=clip.precision == "fp16")
    sampler = UniqueBatchSampler(train_pairs, config.batch_size, seed=config.seed)
    say(sampler.shortfall(), show_progress)
    schedule = WarmupCosine(config.learning_rate, total_steps=sampler.steps_per_epoch * config.num_epochs,
                            warmup_ratio=config.warmup_ratio)
    loader = BatchLoader(train_pairs, clip, num_workers=config.num_workers)
    validate = Validator(val_pairs, config)
    start_weights = cpu_state(clip) if config.wise_ft_alpha is not None else None
    stopper = EarlyStopping(config.monitor, patience=config.early_stopping_epochs, min_delta=config.min_delta)
    state = RunState(config=config.to_dict(), data_fingerprint=pairs_fingerprint(train_pairs, val_pairs),
                     start_fingerprint=clip.fingerprint, data=data_source,
                     images_fingerprint=images_fingerprint(train_pairs, val_pairs))
    metrics_log = run_dir / METRICS_LOG

    last = run_dir / LAST
    for done in recover_directory(last) + recover_directory(run_dir / BEST):
        say(done, show_progress)
    if resume and (last / RUN_STATE).is_file():
        state = restore_last(last, state, task, optimizer, scaler, stopper)
        done = " (it had finished: only its report is written again)" if state.finished else ""
        say(f"resuming {run_dir} from epoch {state.epoch} of {config.num_epochs}, model {config.model_name}{done}",
            show_progress)
    else:
        if resume:
            say(f"no checkpoint in {last}: starting {run_dir} from scratch", show_progress)
        # Epoch 0: the starting model is measured once, and is the first "best".
        start = validate(clip)
        stopper.update(start[config.monitor])
        state.history = [EpochRecord(epoch=0, step=0, val=start, improved=True)]
        save_best(clip, run_dir, config, state.history[0], state)
        save_last(last, state, task, optimizer, scaler, stopper)
    rewrite_metrics_log(metrics_log, state.history)  # what `last` vouches for, nothing more

    for epoch in range(state.epoch + 1, config.num_epochs + 1):
        if state.finished:
            break
        started = time.perf_counter()
        plan = sampler.plan(epoch)
        with progress_bar(len(plan), f"epoch {epoch}/{config.num_epochs}", unit="batch", enabled=show_progress,
                          leave=False) as bar, stopped_in(epoch, run_dir):
            stats = train_one_epoch(task, loader.iterate(plan), optimizer, scaler, schedule,
                                    first_step=state.step, grad_clip_norm=config.grad_clip_norm, bar=bar)
        if not stats.losses:
            raise DataError("no training batch could be formed: every image failed to load, or there are fewer "
                            "than 2 distinct images/captions in the 'train' subset")
        stop_if_diverged(task, stats, epoch, config, run_dir, state)
        faultpoint("train.epoch-trained")
        state.step += len(stats.losses)
        clip.forget_fingerprint()

        val = validate(clip)
        improved = stopper.update(val[config.monitor])
        record = EpochRecord(epoch=epoch, step=state.step, val=val, train_loss=float(np.mean(stats.losses)),
                             lr=stats.lr, grad_norm=float(np.mean(stats.grad_norms)),
                             pairs_per_s=stats.pairs / stats.seconds, seconds=time.perf_counter() - started,
                             improved=improved, skipped_pairs=stats.skipped)
        state.epoch = epoch
        state.history.append(record)
        state.finished = epoch == config.num_epochs or (config.early_stop and stopper.should_stop)
        state.stopped_early = state.finished and epoch < config.num_epochs
        if improved:
            save_best(clip, run_dir, config, record, state)
            faultpoint("train.best-saved")
        save_last(last, state, task, optimizer, scaler, stopper)
        faultpoint("train.last-saved")
        append_metrics(metrics_log, record)
        report_epoch(record, config, show_progress)
        if on_epoch_end is not None:
            on_epoch_end(record, config.num_epochs)
        if state.finished:
            break

    return finish(config, clip, run_dir, state, validate, len(train_pairs), problems, start_weights)


@contextlib.contextmanager
def stopped_in(epoch: int, run_dir: Path) -> Iterator[None]:
    """A stop requested during `epoch` says what is kept."""
    try:
        yield
    except TrainingStopped as exc:
        raise TrainingStopped(f"{exc} during epoch {epoch}: {run_dir / LAST} keeps epoch {epoch - 1}; resuming the "
                              f"run continues from there") from None


@dataclass
class EpochStats:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)  # before clipping
    pairs: int = 0
    skipped: int = 0        # pairs whose image failed to load
    lr: float = 0.0         # of the last step
    seconds: float = 0.0


def train_one_epoch(task: "ContrastiveTask", batches: Iterable["Batch"], optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, schedule: "WarmupCosine", *, first_step: int,
                    grad_clip_norm: Optional[float], bar=None) -> EpochStats:
    """Per batch: set the learning rate → forward/backward → clip → step → clamp the logit scale."""
    stats = EpochStats()
    losses: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []
    started = time.perf_counter()
    for batch in batches:
        raise_if_stop_requested()
        stats.skipped += batch.skipped
        if len(batch) < 2:
            continue  # every other pair of this batch failed to load: nothing to contrast
        stats.lr = schedule(first_step + len(losses))
        for group in optimizer.param_groups:
            group["lr"] = stats.lr
        loss = task.forward_backward(batch, scaler)
        norm = clip_gradients(task, optimizer, scaler, grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        task.clamp_logit_scale()
        losses.append(loss)  # tensors: reading them every step would stall the GPU
        norms.append(norm)
        stats.pairs += len(batch)
        if bar is not None:
            bar.update(1)
            if len(losses) % PROGRESS_EVERY == 1:
                bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{stats.lr:.2e}", refresh=False)
    if losses:
        stats.losses = torch.stack(losses).tolist()
        stats.grad_norms = torch.stack(norms).tolist()
    if task.clip.device.type == "cuda":
        torch.cuda.synchronize()
    stats.seconds = time.perf_counter() - started
    return stats


def stop_if_diverged(task: "ContrastiveTask", stats: EpochStats, epoch: int, config: ClipConfig, run_dir: Path,
                     state: "RunState") -> None:
    """A NaN or infinite loss or weight ends the run here, before anything of this epoch is saved
    or validated (its metrics would be NaN too): best/ and last/ keep the last good epoch."""
    bad_step = next((i for i, loss in enumerate(stats.losses) if not math.isfinite(loss)), None)
    weights_ok = all(bool(torch.isfinite(p).all()) for _, p in task.parameters())
    if bad_step is None and weights_ok:
        return
    where = (f"the loss became {stats.losses[bad_step]} at step {state.step + bad_step + 1}" if bad_step is not None
             else "the weights became NaN or infinite")
    best = next((r.epoch for r in reversed(state.history) if r.improved), 0)
    raise TrainingDivergedError(
        f"training diverged in epoch {epoch} ({where}): the learning rate or weight decay is likely too high "
        f"(learning_rate={config.learning_rate}, weight_decay={config.weight_decay}, epsilon={config.epsilon}); "
        f"the best model so far (epoch {best}) is kept in {run_dir / BEST}")


def finish(config: ClipConfig, clip: ClipModel, run_dir: Path, state: "RunState", validate: "Validator",
           n_train: int, problems: list, start_weights: Optional[dict[str, torch.Tensor]]) -> FitResult:
    """Load the best weights, apply WiSE-FT if asked, write the report."""
    best_record = next(r for r in reversed(state.history) if r.improved)
    load_weights_into(clip, read_state_dict(run_dir / BEST / CHECKPOINT_WEIGHTS))
    model_dir, final, alpha, scores = run_dir / BEST, best_record.val, None, {}
    if config.wise_ft_alpha is not None:
        alpha, scores, final = apply_wise_ft(clip, config, validate, start_weights,
                                             best_val=best_record.val, start_val=state.history[0].val)
        model_dir = save_checkpoint(clip, run_dir / WISE_FT, config=config.to_dict(), metrics=final,
                                    extra={"training": {"epoch": best_record.epoch, "wise_ft_alpha": alpha}})
    clip.forget_fingerprint()
    result = FitResult(clip=clip, run_dir=run_dir, model_dir=model_dir, best_epoch=best_record.epoch,
                       start_metrics=state.history[0].val, final_metrics=final, history=state.history,
                       stopped_early=state.stopped_early, wise_ft_alpha=alpha, wise_ft_scores=scores)
    plot_curves(state.history, run_dir / CURVES_PNG, monitor=config.monitor)
    result.report = write_report(run_dir, result, config, n_train=n_train, n_val=len(validate.pairs),
                                 problems=problems)
    return result


# ======================================================================================
# Data: splitting, batches without false negatives, parallel decoding
# ======================================================================================
def split_pairs(data: Union[PairSet, Sequence[CaptionPair]]) -> tuple[list[CaptionPair], list[CaptionPair], list]:
    pairs = list(data.pairs if isinstance(data, PairSet) else data)
    problems = list(data.problems) if isinstance(data, PairSet) else []
    train = [p for p in pairs if p.subset == "train"]
    val = [p for p in pairs if p.subset == "validation"]
    if not train:
        raise DataError(f"no pairs in the 'train' subset ({len(pairs)} pairs in all); training needs 'train' "
                        f"and 'validation' subsets")
    if not val:
        raise DataError(f"no pairs in the 'validation' subset ({len(train)} training pairs); validation picks "
                        f"the best epoch and stops early: split off some images as 'validation' "
                        f"(`python -m adapters.clip prepare ... --val 0.2`, or ML Data Split on the platform)")
    return train, val, problems


class UniqueBatchSampler:
    """Seeded, shuffled batches in which no image and no caption appears twice.

    A repeated image (several captions each) or a repeated caption would put a true match among
    a pair's negatives. Pairs are dealt, in a shuffled order, into the first open batch that has
    neither their image nor their caption. A final batch of one pair (no negatives: its loss is
    exactly 0) joins an earlier batch that can take it, or waits for the next epoch.
    """

    def __init__(self, pairs: Sequence[CaptionPair], batch_size: int, seed: int = 0) -> None:
        from .evaluate import caption_key  # captions differing only in case or spacing are the same text

        self.keys = [(str(p.image), caption_key(p.caption)) for p in pairs]
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = max(1, len(self.plan(1)))

    def shortfall(self) -> Optional[str]:
        """Why batches stay well below batch_size, when repeated captions or images are the cause.

        Folder-name captions ("a photo of a dog") give few distinct texts; each batch holds each once.
        """
        mean = len(self.keys) / self.steps_per_epoch
        captions, images = len({c for _, c in self.keys}), len({i for i, _ in self.keys})
        if mean >= 0.9 * self.batch_size or min(captions, images) >= self.batch_size:
            return None
        scarce = f"only {captions} unique captions" if captions <= images else f"only {images} unique images"
        return (f"{self.steps_per_epoch} steps of ~{mean:.0f} pairs per epoch: {scarce}; batch_size="
                f"{self.batch_size} cannot be filled (a batch holds each caption and image once; more varied "
                f"captions fill it: docs/fine-tuning.md)")

    def plan(self, epoch: int, shuffle: bool = True) -> list[list[int]]:
        """The batches (lists of pair indices) of one epoch; the same for the same (seed, epoch)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.keys)) if shuffle \
            else np.arange(len(self.keys))
        full: list[list[int]] = []
        open_batches: list[tuple[list[int], set, set]] = []
        for index in order.tolist():
            image, caption = self.keys[index]
            target = next((b for b in open_batches if image not in b[1] and caption not in b[2]), None)
            if target is None:
                target = ([], set(), set())
                open_batches.append(target)
            target[0].append(index)
            target[1].add(image)
            target[2].add(caption)
            if len(target[0]) == self.batch_size:
                full.append(target[0])
                open_batches.remove(target)
        batches = full + [b[0] for b in open_batches]
        return self._place_singletons(batches)

    def _place_singletons(self, batches: list[list[int]]) -> list[list[int]]:
        kept = [b for b in batches if len(b) > 1]
        for single in (b for b in batches if len(b) == 1):
            image, caption = self.keys[single[0]]
            for batch in reversed(kept):
                if all(self.keys[i][0] != image and self.keys[i][1] != caption for i in batch):
                    batch.append(single[0])
                    break
        return kept


@dataclass
class Batch:
    pixels: torch.Tensor   # (B, 3, H, W)
    tokens: torch.Tensor   # (B, L)
    indices: list[int]     # into the pair list
    failures: list[tuple[int, str]] = field(default_factory=list)  # pairs left out: image failed to load

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def skipped(self) -> int:
        return len(self.failures)


class PairImages(torch.utils.data.Dataset):
    """One pair's preprocessed image; a failure is returned, not raised, so one bad file never stops a batch."""

    def __init__(self, pairs: Sequence[CaptionPair], clip: ClipModel) -> None:
        self.paths = [str(p.image) for p in pairs]
        self.preprocess = clip.preprocess
        self.draft_size = clip.image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Optional[torch.Tensor], Optional[str]]:
        try:
            return index, self.preprocess(load_image(self.paths[index], draft_size=self.draft_size)), None
        except (InputError, OSError, ValueError) as exc:
            return index, None, str(exc)


class CollatePairs:
    """Stack the images that loaded and tokenize their captions (in the loader's workers)."""

    def __init__(self, pairs: Sequence[CaptionPair], clip: ClipModel) -> None:
        self.captions = [p.caption for p in pairs]
        self.tokenizer = clip.tokenizer
        self.image_size = clip.image_size

    def __call__(self, items: list[tuple[int, Optional[torch.Tensor], Optional[str]]]) -> Batch:
        ok = [(i, pixels) for i, pixels, _ in items if pixels is not None]
        failures = [(i, error) for i, pixels, error in items if pixels is None]
        if not ok:
            empty = torch.zeros(0, 3, self.image_size, self.image_size)
            return Batch(empty, torch.zeros(0, 1, dtype=torch.long), [], failures)
        pixels = torch.stack([p for _, p in ok])
        tokens = self.tokenizer(capped_texts([self.captions[i] for i, _ in ok]))
        return Batch(pixels, tokens, [i for i, _ in ok], failures)


class _Plan:
    """The current epoch's batches, re-read by the (persistent) DataLoader at each epoch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchLoader:
    """Decodes each planned batch's images in worker processes while the model trains.

    Processes, not threads: decoding and resizing are Python-heavy, and threads contend for the
    GIL and for torch's own thread pool. Workers stay alive across epochs. The model's evaluation
    transform is used (no random augmentation), so a run is reproducible whatever the workers'
    timing; open_clip's training transform would only crop 90-100% of the image anyway.
    An image that fails to load is reported once and its pair left out; the batch goes on.
    """

    def __init__(self, pairs: Sequence[CaptionPair], clip: ClipModel, num_workers: int = 2) -> None:
        self.pairs = pairs
        self.dataset = PairImages(pairs, clip)
        self.collate = CollatePairs(pairs, clip)
        self.num_workers = num_workers
        self.pin_memory = clip.device.type == "cuda"
        self.plan = _Plan()
        self._loader: Optional[torch.utils.data.DataLoader] = None
        self.failed: dict[str, str] = {}

    def iterate(self, plan: list[list[int]]) -> Iterator[Batch]:
        if self.num_workers == 0:
            batches: Iterable[Batch] = (self.collate([self.dataset[i] for i in indices]) for indices in plan)
        else:
            self.plan.batches = plan
            batches = self._workers()
        for batch in batches:
            for index, error in batch.failures:
                self._report(index, error)
            yield batch

    def _workers(self) -> torch.utils.data.DataLoader:
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self.plan, num_workers=self.num_workers, collate_fn=self.collate,
                pin_memory=self.pin_memory, persistent_workers=True, prefetch_factor=2)
        return self._loader

    def _report(self, index: int, error: str) -> None:
        path = str(self.pairs[index].image)
        if path not in self.failed:
            self.failed[path] = error
            log.warning("training image skipped: %s (%s)", path, error)


# ======================================================================================
# The task: CLIP's forward, loss, freezing and gradient caching
# ======================================================================================
def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over L2-normalised (B, D) features; pair i matches pair i."""
    scale = logit_scale.exp().clamp(max=100.0)
    logits = scale * image_features @ text_features.T  # (B, B)
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class ContrastiveTask:
    """Owns what is CLIP-specific: which parameters train, the forward, the loss.

    With `grad_cache_chunk` > 0 the contrastive batch is encoded `chunk` pairs at a time
    (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):
    1. embed the whole batch without keeping activations;
    2. compute the loss over all embeddings and its gradient with respect to each embedding;
    3. re-encode chunk by chunk with activations and back-propagate those cached gradients.
    The gradient equals the full-batch gradient; memory is that of one chunk.
    """

    def __init__(self, clip: ClipModel, freeze: str = "none", grad_cache_chunk: int = 0) -> None:
        self.clip = clip
        self.model = clip.model
        self.freeze = freeze
        self.chunk = grad_cache_chunk
        self.train_image = freeze != "image"
        self.train_text = freeze != "text"
        for name, param in self.model.named_parameters():
            param.requires_grad_(self._trains(name))

    def _trains(self, name: str) -> bool:
        if name == "logit_scale":
            return True
        return self.train_image if is_image_param(name) else self.train_text

    def parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def train(self) -> None:
        self.model.train()
        # A frozen tower stays in eval mode, so BatchNorm statistics (ResNet towers) do not drift.
        if not self.train_image:
            self.model.visual.eval()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.clip.autocast(), torch.set_grad_enabled(self.train_image and torch.is_grad_enabled()):
            return F.normalize(self.model.encode_image(pixels).float(), dim=-1)  # (B, D) fp32

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.clip.autocast(), torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
            return F.normalize(self.model.encode_text(tokens).float(), dim=-1)  # (B, D) fp32

    def forward_backward(self, batch: Batch, scaler: torch.amp.GradScaler) -> torch.Tensor:
        """Accumulate the batch's gradient into .grad; return its loss (a detached scalar tensor)."""
        self.train()
        pixels = batch.pixels.to(self.clip.device, non_blocking=True)
        tokens = batch.tokens.to(self.clip.device, non_blocking=True)
        if self.chunk and self.chunk < len(batch):
            return self._grad_cache_step(pixels, tokens, scaler)
        loss = contrastive_loss(self.encode_images(pixels), self.encode_texts(tokens), self.model.logit_scale)
        scaler.scale(loss).backward()
        return loss.detach()

    def _grad_cache_step(self, pixels: torch.Tensor, tokens: torch.Tensor,
                         scaler: torch.amp.GradScaler) -> torch.Tensor:
        chunks = [slice(i, i + self.chunk) for i in range(0, len(pixels), self.chunk)]
        with torch.no_grad():
            image_reps = torch.cat([self.encode_images(pixels[c]) for c in chunks])  # (B, D)
            text_reps = torch.cat([self.encode_texts(tokens[c]) for c in chunks])    # (B, D)
        image_reps.requires_grad_(self.train_image)
        text_reps.requires_grad_(self.train_text)
        loss = contrastive_loss(image_reps, text_reps, self.model.logit_scale)
        scaler.scale(loss).backward()  # d(scaled loss)/d(embeddings); logit_scale's grad lands directly
        for c in chunks:
            if self.train_image:
                self.encode_images(pixels[c]).backward(image_reps.grad[c])
            if self.train_text:
                self.encode_texts(tokens[c]).backward(text_reps.grad[c])
        return loss.detach()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def is_image_param(name: str) -> bool:
    return name.startswith("visual.")


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay only on matrices of linear maps and convolutions (see EMBEDDING_PARAMS)."""
    if param.ndim < 2:  # biases, LayerNorm/BatchNorm gains, logit_scale, class embedding
        return False
    return not any(part in name for part in EMBEDDING_PARAMS)


def build_optimizer(task: ContrastiveTask, config: ClipConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in task.parameters():
        (decay if decays(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    # The fused kernel: one pass over all parameters (about 20x faster than the per-tensor loop on CPU).
    fused = task.clip.device.type in ("cpu", "cuda")
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate,
                             betas=tuple(config.betas), eps=config.epsilon, fused=fused)


def clip_gradients(task: ContrastiveTask, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   max_norm: Optional[float]) -> torch.Tensor:
    """Unscale (fp16), clip to `max_norm`; return the norm before clipping (a scalar tensor)."""
    scaler.unscale_(optimizer)
    params = [p for _, p in task.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))


class WarmupCosine:
    """Learning rate at each optimizer step: linear warmup to `peak`, then cosine decay to 0."""

    def __init__(self, peak: float, total_steps: int, warmup_ratio: float) -> None:
        self.peak = peak
        self.total = max(1, total_steps)
        self.warmup = int(round(warmup_ratio * self.total))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.peak * 0.5 * (1.0 + math.cos(math.pi * progress))


# ======================================================================================
# Validation and early stopping
# ======================================================================================
class Validator:
    """Scores a model on the validation pairs: evaluate.py's retrieval metrics plus the loss.

    The pairs are grouped once (`EvalData`, which also keeps their preprocessed pixels between
    epochs), so each epoch only runs the two towers.
    """

    def __init__(self, pairs: Sequence[CaptionPair], config: ClipConfig) -> None:
        from .evaluate import EvalData

        self.pairs = list(pairs)
        self.data = EvalData.from_pairs(self.pairs)
        self.batch_size = config.batch_size
        self.num_workers = config.num_workers

    @torch.no_grad()
    def __call__(self, clip: ClipModel) -> dict[str, float]:
        from .evaluate import caption_key, embed_eval_images, evaluate_embeddings

        image_emb, failures = embed_eval_images(clip, self.data, batch_size=self.batch_size,
                                                num_workers=self.num_workers)
        kept = self.data.without_images(set(failures))
        if not kept.images:
            raise DataError(f"no validation image could be loaded ({len(failures)} failed)")
        image_emb = np.delete(image_emb, sorted(failures), axis=0)
        text_emb = Embedder(clip, batch_size=self.batch_size).embed_texts(kept.captions).vectors
        metrics = evaluate_embeddings(image_emb, text_emb, kept.caption_images)
        image_row = {Path(path): i for i, path in enumerate(kept.images)}
        text_row = {caption_key(c): j for j, c in enumerate(kept.captions)}
        scored = [p for p in self.pairs if Path(p.image) in image_row]
        rows = [image_row[Path(p.image)] for p in scored]
        cols = [text_row[caption_key(p.caption)] for p in scored]
        metrics["loss"] = validation_loss(torch.from_numpy(image_emb[rows]), torch.from_numpy(text_emb[cols]),
                                          scored, clip.model.logit_scale.detach().float().cpu(), self.batch_size)
        return {k: float(v) for k, v in metrics.items()}


def validation_loss(image_features: torch.Tensor, text_features: torch.Tensor, pairs: Sequence[CaptionPair],
                    logit_scale: torch.Tensor, batch_size: int) -> float:
    """The training loss on validation pairs, in fixed (unshuffled) false-negative-free batches."""
    plan = UniqueBatchSampler(pairs, batch_size).plan(0, shuffle=False)
    losses, weights = [], []
    for indices in plan:
        losses.append(float(contrastive_loss(image_features[indices], text_features[indices], logit_scale)))
        weights.append(len(indices))
    return float(np.average(losses, weights=weights)) if losses else float("nan")


class EarlyStopping:
    """Tracks the best value of the monitored metric and epochs without improvement."""

    def __init__(self, monitor: str, patience: int, min_delta: float = 0.0) -> None:
        self.monitor = monitor
        self.lower_is_better = monitor == "loss"
        self.patience = patience
        self.min_delta = min_delta
        self.best: Optional[float] = None
        self.bad_epochs = 0

    def update(self, value: float) -> bool:
        """Record one epoch's value; True when it beats the best by more than min_delta."""
        if self.best is None or self._better(value, self.best):
            self.best = value
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False

    def _better(self, value: float, best: float) -> bool:
        if math.isnan(value):
            return False
        return value < best - self.min_delta if self.lower_is_better else value > best + self.min_delta

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_epochs = state["best"], int(state["bad_epochs"])


# ======================================================================================
# WiSE-FT (Wortsman et al. 2022): θ = (1 - α)·θ_start + α·θ_fine-tuned
# ======================================================================================
def cpu_state(clip: ClipModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in clip.model.state_dict().items()}


def interpolate_weights(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                        alpha: float) -> dict[str, torch.Tensor]:
    return {k: torch.lerp(start[k].float(), tuned[k].float(), alpha) if tuned[k].is_floating_point() else tuned[k]
            for k in tuned}


def load_weights_into(clip: ClipModel, state: dict[str, torch.Tensor]) -> None:
    clip.model.load_state_dict({k: v.to(clip.device) for k, v in state.items()})
    clip.forget_fingerprint()


def apply_wise_ft(clip: ClipModel, config: ClipConfig, validate: Validator, start: dict[str, torch.Tensor], *,
                  best_val: dict[str, float],
                  start_val: dict[str, float]) -> tuple[float, dict[float, float], dict[str, float]]:
    """Interpolate into `clip`. 'auto' tries WISE_FT_GRID on validation (ties → less fine-tuning)."""
    tuned = cpu_state(clip)
    known = {0.0: start_val, 1.0: best_val}
    alphas = WISE_FT_GRID if config.wise_ft_alpha == "auto" else (float(config.wise_ft_alpha),)
    results: dict[float, dict[str, float]] = {}
    for alpha in alphas:
        if alpha in known:
            results[alpha] = known[alpha]
            continue
        load_weights_into(clip, interpolate_weights(start, tuned, alpha))
        results[alpha] = validate(clip)
    sign = -1.0 if config.monitor == "loss" else 1.0
    chosen = max(results, key=lambda a: (sign * results[a][config.monitor], -a))
    load_weights_into(clip, interpolate_weights(start, tuned, chosen))
    return chosen, {a: r[config.monitor] for a, r in results.items()}, results[chosen]


# ======================================================================================
# Checkpoints: best/ (project format) and last/ (everything needed to resume)
# ======================================================================================
def save_best(clip: ClipModel, run_dir: Path, config: ClipConfig, record: EpochRecord, state: RunState) -> None:
    save_checkpoint(clip, run_dir / BEST, config=config.to_dict(), metrics=record.val,
                    extra={"training": {"epoch": record.epoch, "step": record.step, "monitor": config.monitor,
                                        "start_model": config.model_name,
                                        "start_fingerprint": state.start_fingerprint}})


def save_last(directory: Path, state: RunState, task: ContrastiveTask, optimizer: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler, stopper: EarlyStopping) -> None:
    """Build the whole directory beside, then swap it in: a kill leaves the old or the new one."""
    with atomic_directory(directory) as tmp:
        write_checkpoint_files(task.clip, tmp, config=state.config,
                               metrics=state.history[-1].val if state.history else None)
        trainer = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                   "torch_rng": torch.get_rng_state(),
                   "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        with atomic_path(tmp / TRAINER_STATE) as trainer_file:
            torch.save(trainer, trainer_file)
        run_state = {k: v for k, v in asdict(state).items() if k != "history"}
        run_state.update(history=[asdict(r) for r in state.history], early_stopping=stopper.state_dict(),
                         python_rng=python_rng_state(), numpy_rng=numpy_rng_state())
        write_json_atomic(tmp / RUN_STATE, run_state)


def restore_last(directory: Path, fresh: RunState, task: ContrastiveTask, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, stopper: EarlyStopping) -> RunState:
    """Put weights, optimizer, scaler, RNG and bookkeeping back as they were after the saved epoch."""
    def unusable(reason: object) -> CheckpointError:
        return CheckpointError(f"{directory}: cannot resume from this checkpoint ({reason}); train into a new --out, "
                               f"or delete {directory} to start this run over")

    try:
        saved = json.loads((directory / RUN_STATE).read_text(encoding="utf-8"))
        # weights_only: a malicious pickle is refused (UnpicklingError), never executed
        trainer = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file (truncated, foreign, malicious) is one answer
        raise unusable(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    missing = sorted(RUN_STATE_KEYS - set(saved)) if isinstance(saved, dict) else ["everything"]
    missing += sorted(TRAINER_KEYS - set(trainer)) if isinstance(trainer, dict) else ["trainer state"]
    if missing:
        raise unusable(f"{RUN_STATE} or {TRAINER_STATE} lacks {', '.join(missing)}")
    check_resumable(saved, fresh, directory)
    try:
        load_weights_into(task.clip, read_state_dict(directory / CHECKPOINT_WEIGHTS))
        optimizer.load_state_dict(trainer["optimizer"])
        scaler.load_state_dict(trainer["scaler"])
        stopper.load_state_dict(saved["early_stopping"])
        torch.set_rng_state(trainer["torch_rng"])
        if trainer["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer["cuda_rng"])
        set_python_rng_state(saved["python_rng"])
        set_numpy_rng_state(saved["numpy_rng"])
        fresh.epoch, fresh.step = int(saved["epoch"]), int(saved["step"])
        fresh.finished, fresh.stopped_early = bool(saved["finished"]), bool(saved["stopped_early"])
        fresh.history = [EpochRecord(**r) for r in saved["history"]]
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise unusable(f"{type(exc).__name__}: {exc}") from None
    return fresh


def resume_problem(run_dir: Union[str, Path], config: ClipConfig, data: Union[PairSet, Sequence[CaptionPair]],
                   clip: ClipModel) -> Optional[str]:
    """Why `fit(config, data, run_dir, clip=clip, resume=True)` could not continue the run saved in
    `run_dir`, or None when it can: the same configuration, data and starting weights."""
    try:
        saved = json.loads((Path(run_dir) / LAST / RUN_STATE).read_text(encoding="utf-8"))
        train_pairs, val_pairs, _ = split_pairs(data)
        fresh = RunState(config=config.to_dict(), data_fingerprint=pairs_fingerprint(train_pairs, val_pairs),
                         start_fingerprint=clip.fingerprint,
                         images_fingerprint=images_fingerprint(train_pairs, val_pairs))
        check_resumable(saved, fresh, Path(run_dir) / LAST)
    except (ConfigError, DataError, CheckpointError) as exc:  # before ValueError: ConfigError is one
        return str(exc)
    except (OSError, ValueError, KeyError) as exc:
        return f"its resume state is unreadable ({exc})"
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ======================================================================================
# Logging
# ======================================================================================
def say(note: Optional[str], show: bool) -> None:
    """A note about the run for the log, and for the person watching (stderr) when progress is shown."""
    if note:
        log.info(note)
        if show:
            print(f"note: {note}", file=sys.stderr, flush=True)


def report_epoch(record: EpochRecord, config: ClipConfig, show: bool) -> None:
    val = record.val
    line = (f"epoch {record.epoch}/{config.num_epochs}: train loss {record.train_loss:.4f}, val loss "
            f"{val['loss']:.4f}, R@1 t2i {val['t2i_r1']:.3f} i2t {val['i2t_r1']:.3f}, mean recall "
            f"{val['mean_recall']:.3f}{' (best)' if record.improved else ''}, {record.pairs_per_s:.1f} pairs/s")
    log.info(line)
    if show:
        print(line, file=sys.stderr, flush=True)
