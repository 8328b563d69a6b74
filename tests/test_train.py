"""Fine-tuning: every configuration key, the recipe, checkpoints and resume, the CLI, and
ClipAdapter.train inside dtlpy's real train_model flow.

Real components throughout: the tiny open_clip CLIP, real image files, real safetensors/torch
files, real dtlpy entities. Only the Dataloop server is faked, in the adapter test (said there).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from adapters.clip.config import ClipConfig
from adapters.clip.manifests import load_pairs, write_manifest
from adapters.clip.pairs import CaptionPair
from adapters.clip.runs import RESUME_ARCHIVE, archive_is_resumable, pack_resume_state
from adapters.clip.errors import ConfigError, DataError
from adapters.clip.models import CHECKPOINT_WEIGHTS, load_model, read_checkpoint_info, read_state_dict
from adapters.clip.train import (BatchLoader, ContrastiveTask, EarlyStopping, UniqueBatchSampler, WarmupCosine,
                                 build_optimizer, clip_gradients, decays, fit, interpolate_weights)
from conftest import pattern_image

N_TRAIN, N_VAL = 16, 8
WORDS = ("red", "green", "blue", "round", "square", "large", "small", "striped")


# ---- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> list[CaptionPair]:
    """16 training and 8 validation pairs: distinct patterned 64px images, distinct captions."""
    root = tmp_path_factory.mktemp("pairs")
    out = []
    for i in range(N_TRAIN + N_VAL):
        path = root / f"img{i:02d}.png"
        pattern_image(i).save(path)
        out.append(CaptionPair(image=path, caption=f"picture {i}: {WORDS[i % 8]} {WORDS[(i // 8) % 8]}",
                               subset="train" if i < N_TRAIN else "validation"))
    return out


def config(**changes) -> ClipConfig:
    base = {"model_name": "tiny", "device": "cpu", "batch_size": 8, "num_epochs": 1, "learning_rate": 1e-3,
            "warmup_ratio": 0.0, "num_workers": 2}
    return ClipConfig.from_dict({**base, **changes})


def run(pairs, run_dir, **changes):
    return fit(config(**changes), pairs, run_dir, show_progress=False)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(Path(path) / CHECKPOINT_WEIGHTS)


def one_batch(clip, pairs, n=8):
    return next(BatchLoader(pairs, clip, num_workers=0).iterate([list(range(n))]))


def one_step(pairs, **changes):
    """One optimizer step from the seeded tiny model: (start weights, task, optimizer, grads before the step)."""
    cfg = config(**changes)
    clip = load_model("tiny", device="cpu")
    start = {k: v.clone() for k, v in clip.model.state_dict().items()}
    task = ContrastiveTask(clip, freeze=cfg.freeze)
    optimizer = build_optimizer(task, cfg)
    task.forward_backward(one_batch(clip, pairs), torch.amp.GradScaler("cpu", enabled=False))
    grads = {n: p.grad.clone() for n, p in task.parameters()}
    optimizer.step()
    return start, task, optimizer, grads


def changes(start, task):
    return {n: (p.detach() - start[n]) for n, p in task.model.named_parameters()}


# ---- batches without false negatives ----------------------------------------------------------
def _keyed(images_and_captions):
    return [CaptionPair(image=Path(f"/data/{img}.png"), caption=cap, subset="train") for img, cap in images_and_captions]


def test_batches_never_repeat_an_image_or_a_caption():
    # 12 images with 3 captions each, and one caption ("a photo") shared by four images.
    items = [(f"i{i}", f"image {i} caption {c}") for i in range(12) for c in range(3)]
    items += [(f"i{i}", "A  photo") for i in range(4)] + [("j0", "a photo")]
    pairs = _keyed(items)
    sampler = UniqueBatchSampler(pairs, batch_size=8, seed=0)
    plan = sampler.plan(1)
    seen = [i for batch in plan for i in batch]
    assert len(seen) == len(set(seen))
    assert len(seen) >= len(pairs) - 1  # at most one pair waits for the next epoch
    for batch in plan:
        images = [str(pairs[i].image) for i in batch]
        captions = [" ".join(pairs[i].caption.lower().split()) for i in batch]
        assert len(set(images)) == len(images) and len(set(captions)) == len(captions)
        assert len(batch) >= 2


def test_batch_plan_depends_on_seed_and_epoch_only():
    pairs = _keyed([(f"i{i}", f"caption {i}") for i in range(40)])
    a = UniqueBatchSampler(pairs, 8, seed=0)
    assert a.plan(1) == UniqueBatchSampler(pairs, 8, seed=0).plan(1)
    assert a.plan(1) != a.plan(2)
    assert a.plan(1) != UniqueBatchSampler(pairs, 8, seed=1).plan(1)
    assert [len(b) for b in a.plan(1)] == [8] * 5


def test_a_last_batch_of_one_joins_an_earlier_batch():
    pairs = _keyed([(f"i{i}", f"caption {i}") for i in range(9)])
    plan = UniqueBatchSampler(pairs, 4, seed=0).plan(1)
    assert sorted(len(b) for b in plan) == [4, 5]
    assert sorted(i for b in plan for i in b) == list(range(9))


def test_a_pair_that_fits_no_batch_waits_instead_of_training_alone():
    # One image with two captions: any batch holding both would contain a false negative.
    pairs = _keyed([("same", "first caption"), ("same", "second caption")])
    assert UniqueBatchSampler(pairs, 4, seed=0).plan(1) == []


# ---- the optimizer: weight_decay, learning_rate, epsilon, betas, grad_clip_norm --------------
def test_few_unique_captions_are_said_to_shrink_the_batches(pairs, tmp_path, capsys):
    folder_captions = [CaptionPair(image=Path(f"/data/{i}.png"), caption=f"a photo of a {i % 7}", subset="train")
                       for i in range(76)]
    note = UniqueBatchSampler(folder_captions, 16).shortfall()
    assert note.startswith("11 steps of ~7 pairs per epoch: only 7 unique captions; batch_size=16 cannot be filled")
    assert UniqueBatchSampler(folder_captions, 4).shortfall() is None  # 7 captions fill batches of 4
    varied = [CaptionPair(image=Path(f"/data/{i}.png"), caption=f"photo {i}", subset="train") for i in range(76)]
    assert UniqueBatchSampler(varied, 16).shortfall() is None
    few = [CaptionPair(image=p.image, caption=f"a photo of a {i % 3}", subset=p.subset) for i, p in enumerate(pairs)]
    fit(config(num_epochs=1), few, tmp_path)
    assert "pairs per epoch: only 3 unique captions; batch_size=8 cannot be filled" in capsys.readouterr().err


def test_weight_decay_groups_leave_out_biases_norms_embeddings_and_logit_scale(tiny):
    task = ContrastiveTask(tiny)
    optimizer = build_optimizer(task, config(weight_decay=0.2))
    names = {id(p): n for n, p in task.parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == {"decay": 0.2, "no_decay": 0.0}
    for name in ("logit_scale", "token_embedding.weight", "positional_embedding", "visual.class_embedding",
                 "visual.positional_embedding", "ln_final.weight", "visual.ln_pre.bias",
                 "transformer.resblocks.0.attn.in_proj_bias"):
        assert name in groups["no_decay"], name
    for name in ("text_projection", "visual.proj", "visual.conv1.weight", "transformer.resblocks.0.attn.in_proj_weight",
                 "visual.transformer.resblocks.1.mlp.c_fc.weight"):
        assert name in groups["decay"], name
    assert not decays("token_embedding.weight", torch.zeros(3, 3))


def test_weight_decay_shrinks_exactly_the_decayed_weights_by_lr_times_wd(pairs):
    lr, wd = 1e-3, 0.5
    start, plain, _, _ = one_step(pairs, learning_rate=lr, weight_decay=0.0)
    _, decayed, _, _ = one_step(pairs, learning_rate=lr, weight_decay=wd)
    for name, param in decayed.model.named_parameters():
        difference = param.detach() - dict(plain.model.named_parameters())[name].detach()
        expected = -lr * wd * start[name] if decays(name, param) else torch.zeros_like(param)
        torch.testing.assert_close(difference, expected, atol=2e-7, rtol=0, msg=name)


def test_learning_rate_sets_the_size_of_the_first_step(pairs):
    # Adam's first step moves every weight by lr * g / (|g| + eps): at most lr, and ~lr for real gradients.
    for lr in (1e-3, 1e-4):
        start, task, _, _ = one_step(pairs, learning_rate=lr, weight_decay=0.0)
        largest = max(float(d.abs().max()) for d in changes(start, task).values())
        assert largest == pytest.approx(lr, rel=1e-2)


def test_epsilon_damps_the_update_of_small_gradients(pairs):
    start, small_eps, _, _ = one_step(pairs, epsilon=1e-8, weight_decay=0.0)
    _, large_eps, _, _ = one_step(pairs, epsilon=1.0, weight_decay=0.0)
    moved = lambda task: float(torch.cat([d.abs().reshape(-1) for d in changes(start, task).values()]).mean())
    assert moved(large_eps) < 0.1 * moved(small_eps)


def test_betas_are_the_decay_rates_of_adams_moments(pairs):
    for betas in ((0.9, 0.98), (0.5, 0.6)):
        _, task, optimizer, grads = one_step(pairs, betas=list(betas))
        assert optimizer.param_groups[0]["betas"] == betas
        for name, param in task.parameters():
            if name in ("visual.proj", "text_projection"):
                state = optimizer.state[param]
                torch.testing.assert_close(state["exp_avg"], (1 - betas[0]) * grads[name])
                torch.testing.assert_close(state["exp_avg_sq"], (1 - betas[1]) * grads[name] ** 2)


def test_grad_clip_norm_caps_the_gradient_norm(pairs):
    clip = load_model("tiny", device="cpu")
    task = ContrastiveTask(clip)
    optimizer = build_optimizer(task, config())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    task.forward_backward(one_batch(clip, pairs), scaler)
    total = lambda: float(torch.norm(torch.stack([p.grad.norm() for _, p in task.parameters() if p.grad is not None])))
    before = total()
    assert float(clip_gradients(task, optimizer, scaler, None)) == pytest.approx(before, rel=1e-5)
    assert total() == pytest.approx(before, rel=1e-6)   # None: left alone
    assert float(clip_gradients(task, optimizer, scaler, 1e-3)) == pytest.approx(before, rel=1e-5)
    assert before > 1e-3 and total() == pytest.approx(1e-3, rel=1e-3)


def test_warmup_ratio_then_cosine_decay():
    schedule = WarmupCosine(1e-3, total_steps=100, warmup_ratio=0.1)
    assert schedule(0) == pytest.approx(1e-4)
    assert schedule(9) == pytest.approx(1e-3)
    assert schedule(10) == pytest.approx(1e-3)
    assert schedule(55) == pytest.approx(0.5e-3)
    assert schedule(99) < 1e-6
    assert schedule(500) == 0.0  # never negative past the end
    values = [schedule(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert WarmupCosine(1e-3, total_steps=100, warmup_ratio=0.0)(0) == pytest.approx(1e-3)


# ---- gradient caching ---------------------------------------------------------------------
@pytest.mark.parametrize("freeze", ["none", "text"])
def test_grad_cache_gradient_matches_the_full_batch_gradient(pairs, freeze):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    grads, losses = [], []
    for chunk in (0, 3):  # 3 does not divide 8: the last chunk is smaller
        clip = load_model("tiny", device="cpu")
        task = ContrastiveTask(clip, freeze=freeze, grad_cache_chunk=chunk)
        losses.append(float(task.forward_backward(one_batch(clip, pairs), scaler)))
        grads.append({n: p.grad.clone() for n, p in task.parameters() if p.grad is not None})
    full, cached = grads
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert set(full) == set(cached) and "logit_scale" in full
    assert any(n.startswith("visual.") for n in full) and (freeze != "text") == any(n.startswith("transformer.") for n in full)
    for name in full:
        torch.testing.assert_close(cached[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_grad_cache_chunk_trains_like_the_full_batch(pairs, tmp_path):
    full = run(pairs, tmp_path / "full")
    cached = run(pairs, tmp_path / "cached", grad_cache_chunk=3)
    assert cached.history[1].train_loss == pytest.approx(full.history[1].train_loss, rel=1e-5)
    for name, tensor in weights(tmp_path / "full" / "last").items():
        torch.testing.assert_close(weights(tmp_path / "cached" / "last")[name], tensor, atol=5e-5, rtol=0, msg=name)


# ---- early stopping and monitor ---------------------------------------------------------------
def test_early_stopping_counts_epochs_without_improvement_beyond_min_delta():
    stopper = EarlyStopping("mean_recall", patience=2, min_delta=0.01)
    assert stopper.update(0.50) and not stopper.should_stop
    assert not stopper.update(0.505)          # within min_delta: not better
    assert stopper.update(0.52)
    assert not stopper.update(0.40) and not stopper.should_stop
    assert not stopper.update(float("nan")) and stopper.should_stop
    loss = EarlyStopping("loss", patience=1)
    assert loss.update(2.0) and loss.update(1.5) and not loss.update(1.6) and loss.should_stop


@pytest.mark.parametrize("early_stop, patience, epochs_run", [(False, 1, 3), (True, 1, 1), (True, 2, 2)])
def test_num_epochs_early_stop_and_patience(pairs, tmp_path, early_stop, patience, epochs_run):
    # min_delta=1.0: no epoch can beat the starting model's recall, so patience runs out.
    result = run(pairs, tmp_path, num_epochs=3, early_stop=early_stop,
                 early_stopping_epochs=patience, min_delta=1.0)
    assert [r.epoch for r in result.history] == list(range(epochs_run + 1))
    assert result.stopped_early == (epochs_run < 3)
    assert result.best_epoch == 0 and result.report["training"]["best_epoch"] == 0
    # Nothing beat the start, so the output is the starting model, not the last epoch's weights.
    assert result.clip.fingerprint == load_model("tiny", device="cpu").fingerprint
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == epochs_run + 1


def test_monitor_decides_which_epoch_is_best(pairs, tmp_path):
    result = run(pairs, tmp_path, num_epochs=2, monitor="loss", early_stop=False)
    losses = [r.val["loss"] for r in result.history]
    assert result.best_epoch == int(np.argmin(losses))
    info = read_checkpoint_info(tmp_path / "best")
    assert info["training"]["epoch"] == result.best_epoch and info["metrics"]["loss"] == min(losses)
    assert info["config"]["monitor"] == "loss"


# ---- batch_size, learning_rate, model_name, seed, freeze, logit scale -------------------------
def test_batch_size_sets_the_contrastive_batch_and_steps_per_epoch(pairs, tmp_path):
    assert [len(b) for b in UniqueBatchSampler(pairs[:N_TRAIN], 6).plan(1)] == [6, 6, 4]
    assert run(pairs, tmp_path / "b6", batch_size=6).history[-1].step == 3
    assert run(pairs, tmp_path / "b8", batch_size=8).history[-1].step == 2


def test_learning_rate_is_the_peak_of_the_logged_schedule(pairs, tmp_path):
    result = run(pairs, tmp_path, learning_rate=4e-4, num_epochs=2, warmup_ratio=0.5)
    # 2 steps per epoch, 4 in all, 2 of warmup: the last step of each epoch runs at 4e-4, then 2e-4.
    assert [r.lr for r in result.history[1:]] == pytest.approx([4e-4, 2e-4])


def test_model_name_picks_the_starting_architecture(pairs, tmp_path):
    cfg = open_clip.get_model_config("tiny")
    narrow = dict(cfg, embed_dim=32)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny-narrow.json").write_text(json.dumps(narrow))
    open_clip.add_model_config(tmp_path / "configs")
    result = run(pairs, tmp_path / "run", model_name="tiny-narrow:random")
    assert result.clip.arch == "tiny-narrow" and result.clip.dim == 32
    loaded = load_model(str(tmp_path / "run" / "best"), device="cpu")
    assert loaded.arch == "tiny-narrow" and loaded.dim == 32


def test_seed_makes_a_run_reproducible(pairs, tmp_path):
    a = run(pairs, tmp_path / "a", seed=3)
    b = run(pairs, tmp_path / "b", seed=3)
    c = run(pairs, tmp_path / "c", seed=4)
    assert weights(tmp_path / "a" / "last").keys() == weights(tmp_path / "b" / "last").keys()
    for name, tensor in weights(tmp_path / "a" / "last").items():
        assert torch.equal(tensor, weights(tmp_path / "b" / "last")[name]), name
    assert [r.val for r in a.history] == [r.val for r in b.history]
    assert not torch.equal(weights(tmp_path / "a" / "last")["text_projection"],
                           weights(tmp_path / "c" / "last")["text_projection"])
    assert [r.train_loss for r in c.history] != [r.train_loss for r in a.history]


@pytest.mark.parametrize("freeze", ["image", "text"])
def test_freeze_keeps_one_tower_unchanged(pairs, tmp_path, freeze):
    run(pairs, tmp_path, freeze=freeze)
    start = load_model("tiny", device="cpu").model.state_dict()
    trained = weights(tmp_path / "last")
    moved = {n for n in trained if not torch.equal(trained[n], start[n])}
    image_moved = {n for n in moved if n.startswith("visual.")}
    text_moved = moved - image_moved - {"logit_scale"}
    assert (image_moved, bool(text_moved)) == (set(), True) if freeze == "image" else (text_moved, bool(image_moved)) == (set(), True)


def test_logit_scale_is_clamped_at_ln_100(pairs, tmp_path):
    clip = load_model("tiny", device="cpu")
    with torch.no_grad():
        clip.model.logit_scale.fill_(math.log(300.0))
    fit(config(), pairs, tmp_path, clip=clip, show_progress=False)
    assert float(weights(tmp_path / "last")["logit_scale"]) == pytest.approx(math.log(100.0))


# ---- WiSE-FT -----------------------------------------------------------------------------
def test_wise_ft_auto_picks_alpha_on_validation_and_interpolates(pairs, tmp_path):
    result = run(pairs, tmp_path, wise_ft_alpha="auto")
    scores = result.wise_ft_scores
    assert sorted(scores) == pytest.approx([i / 10 for i in range(11)])
    assert scores[result.wise_ft_alpha] == max(scores.values())
    assert result.wise_ft_alpha == min(a for a, s in scores.items() if s == max(scores.values()))
    assert result.model_dir == tmp_path / "wise_ft"
    start = load_model("tiny", device="cpu").model.state_dict()
    expected = interpolate_weights(start, weights(tmp_path / "best"), result.wise_ft_alpha)
    for name, tensor in weights(tmp_path / "wise_ft").items():
        torch.testing.assert_close(tensor, expected[name], msg=name)
    assert result.report["wise_ft"]["alpha"] == result.wise_ft_alpha
    assert result.final_metrics["mean_recall"] == scores[result.wise_ft_alpha]


def test_wise_ft_fixed_alpha_is_the_midpoint(pairs, tmp_path):
    result = run(pairs, tmp_path, wise_ft_alpha=0.5)
    start = load_model("tiny", device="cpu").model.state_dict()
    best, mixed = weights(tmp_path / "best"), weights(tmp_path / "wise_ft")
    torch.testing.assert_close(mixed["text_projection"], (start["text_projection"] + best["text_projection"]) / 2)
    assert result.wise_ft_alpha == 0.5 and list(result.wise_ft_scores) == [0.5]


# ---- checkpoints, logs, resume ----------------------------------------------------------------
def test_curve_legends_do_not_cover_the_plots():
    from adapters.clip.reports import curves_figure
    from adapters.clip.runs import EpochRecord

    val = {"loss": 2.0, "t2i_r1": 0.5, "i2t_r1": 0.5, "t2i_r5": 0.9, "i2t_r5": 0.9, "mean_recall": 0.7}
    history = [EpochRecord(epoch=e, step=e, val=val, train_loss=None if e == 0 else 2.0, improved=e == 3)
               for e in range(6)]
    fig = curves_figure(history)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend, plot = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert not legend.overlaps(plot), ax.get_title()
        assert fig.bbox.contains(legend.x0, legend.y0) and fig.bbox.contains(legend.x1, legend.y1)  # not cut off


def test_run_leaves_checkpoints_metrics_curves_and_report(pairs, tmp_path):
    result = run(pairs, tmp_path, num_epochs=2, early_stop=False)
    # best/: the project's format, loadable by name, identical to what fit returned.
    best = load_model(str(tmp_path / "best"), device="cpu")
    assert best.fingerprint == result.clip.fingerprint
    info = read_checkpoint_info(tmp_path / "best")
    assert info["config"]["learning_rate"] == 1e-3 and "mean_recall" in info["metrics"]
    # last/: weights + optimizer state a safe loader accepts.
    trainer = torch.load(tmp_path / "last" / "trainer.pt", weights_only=True)
    assert trainer["optimizer"]["state"] and isinstance(trainer["torch_rng"], torch.Tensor)
    assert load_model(str(tmp_path / "last"), device="cpu").arch == "tiny"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[0]["train_loss"] is None and rows[2]["train_loss"] < rows[1]["train_loss"]
    for key in ("val_loss", "val_t2i_r1", "val_i2t_r10", "val_mean_recall", "val_t2i_median_rank", "lr", "pairs_per_s"):
        assert key in rows[1], key
    with Image.open(tmp_path / "curves.png") as png:
        assert png.format == "PNG" and png.size[0] > 600
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["start"]["mean_recall"] == rows[0]["val_mean_recall"]
    assert report["final"]["mean_recall"] >= report["start"]["mean_recall"]
    assert report["data"] == {"train_pairs": N_TRAIN, "validation_pairs": N_VAL, "skipped_records": 0, "problems": []}
    markdown = (tmp_path / "report.md").read_text()
    assert "| text→image R@1 |" in markdown and "curves.png" in markdown


def test_killed_run_resumes_to_the_same_weights_and_metrics(pairs, tmp_path):
    settings = dict(num_epochs=2, warmup_ratio=0.3, early_stop=False)
    whole = run(pairs, tmp_path / "whole", **settings)

    class Killed(Exception):
        pass

    def kill_after_first_epoch(record, num_epochs):
        if record.epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        fit(config(**settings), pairs, tmp_path / "split", on_epoch_end=kill_after_first_epoch, show_progress=False)
    assert json.loads((tmp_path / "split" / "last" / "state.json").read_text())["epoch"] == 1
    resumed = fit(config(**settings), pairs, tmp_path / "split", resume=True, show_progress=False)
    for name, tensor in weights(tmp_path / "whole" / "last").items():
        assert torch.equal(tensor, weights(tmp_path / "split" / "last")[name]), name
    assert [(r.val, r.train_loss, r.lr, r.step) for r in resumed.history] == \
           [(r.val, r.train_loss, r.lr, r.step) for r in whole.history]
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "pairs_per_s")}
                          for line in path.read_text().splitlines()]
    assert strip(tmp_path / "split" / "metrics.jsonl") == strip(tmp_path / "whole" / "metrics.jsonl")


def test_resume_refuses_a_changed_configuration_or_data(pairs, tmp_path):
    run(pairs, tmp_path, num_epochs=1)
    with pytest.raises(ConfigError, match="learning_rate"):
        fit(config(learning_rate=2e-3), pairs, tmp_path, resume=True, show_progress=False)
    with pytest.raises(DataError, match="pairs"):
        fit(config(), pairs[1:], tmp_path, resume=True, show_progress=False)


def test_an_unreadable_training_image_is_skipped_not_fatal(pairs, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    data = [CaptionPair(image=broken, caption="a broken picture", subset="train")] + list(pairs)
    result = run(data, tmp_path / "run")
    assert result.history[1].skipped_pairs == 1
    assert result.report["training"]["skipped_pairs"] == 1


def test_training_needs_validation_pairs_and_batches_of_two(pairs, tmp_path):
    with pytest.raises(DataError, match="validation"):
        run([p for p in pairs if p.subset == "train"], tmp_path)
    with pytest.raises(ConfigError, match="batch_size"):
        run(pairs, tmp_path, batch_size=1)


# ---- command line ------------------------------------------------------------------------
def test_cli_train_then_resume(pairs, tmp_path, capsys):
    from adapters.clip.cli import main

    manifest = tmp_path / "pairs.jsonl"
    write_manifest(pairs, manifest)
    out = tmp_path / "run"
    args = ["train", "--data", str(manifest), "--out", str(out), "--model", "tiny",
            "--set", "device=cpu", "--set", "batch_size=8", "--set", "num_epochs=1", "--set", "learning_rate=1e-3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "validation mean_recall" in printed and str(out / "report.md") in printed
    assert main(args) == 2  # a second run into the same folder must say --resume
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--resume", "--json"]) == 0  # finished: nothing to train, the report again
    assert json.loads(capsys.readouterr().out)["training"]["epochs_run"] == 1
    assert main(args[:-2] + ["--set", "learning_rat=1", "--resume"]) == 1  # a typo is a one-line error
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


def test_cli_resume_needs_only_the_run_folder(pairs, tmp_path, capsys):
    """The run's model, settings and data come from the run; a change resuming cannot honour names its flag."""
    from adapters.clip.cli import main

    manifest = tmp_path / "pairs.jsonl"
    write_manifest(pairs, manifest)
    out = tmp_path / "run"

    def killed_after_epoch_one(record, num_epochs):
        if record.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # what `train --data pairs.jsonl --out run ...` leaves when killed
        fit(config(num_epochs=2, batch_size=4), load_pairs(manifest), out, on_epoch_end=killed_after_epoch_one,
            show_progress=False, data_source=str(manifest))
    capsys.readouterr()
    for flags, named in ((["--set", "batch_size=8"], "--set batch_size=8"), (["--model", "ViT-B/32"], "--model ViT-B/32"),
                         (["--set", "num_epochs=5"], "--set num_epochs=5")):
        assert main(["train", "--out", str(out), "--resume", *flags]) == 1
        err = capsys.readouterr().err
        assert named in err and "cannot resume" in err and len(err.strip().splitlines()) == 1
    moved = manifest.rename(tmp_path / "moved.jsonl")
    assert main(["train", "--out", str(out), "--resume"]) == 2
    assert "pass --data" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--data", str(moved), "--set", "num_workers=0",
                 "--json"]) == 0
    captured = capsys.readouterr()
    assert f"resuming {out} from epoch 1 of 2, model tiny" in captured.err
    report = json.loads(captured.out)
    assert report["training"]["epochs_run"] == 2 and report["config"]["batch_size"] == 4
    assert main(["train", "--out", str(tmp_path / "new"), "--resume"]) == 2  # nothing there to resume
    assert "holds no training run" in capsys.readouterr().err


# ---- ClipAdapter.train inside dtlpy's train_model ----------------------------------------------
def write_default_layout_export(root: Path, n_train: int = 16, n_val: int = 6) -> None:
    """dtlpy's default prepare_data layout: <subset>/items/... + <subset>/json/... (one item per file).

    Mostly prompt items (image in the prompt, caption in a free-text annotation); two image items
    captioned by their description.
    """
    for i in range(n_train + n_val):
        subset = "train" if i < n_train else "validation"
        caption = f"picture {i}: {WORDS[i % 8]} {WORDS[(i // 8) % 8]}"
        if i in (1, n_train + 1):  # an image item with a description
            pattern_image(i).save(_mkdir(root / subset / "items" / "photos") / f"p{i}.png")
            item = {"id": f"{i:024x}", "filename": f"/photos/p{i}.png", "name": f"p{i}.png",
                    "metadata": {"system": {"mimetype": "image/png", "description": caption}}, "annotations": []}
            (_mkdir(root / subset / "json" / "photos") / f"p{i}.json").write_text(json.dumps(item))
            continue
        image_id = f"{1000 + i:024x}"
        pattern_image(i).save(_mkdir(root / "prompt_images") / f"{image_id}.png")
        prompt = {"shebang": "dataloop", "metadata": {"dltype": "prompt"},
                  "prompts": {"1": [{"mimetype": "image/*", "value": f"https://gate.dataloop.ai/api/v1/items/{image_id}/stream"},
                                    {"mimetype": "metadata", "value": {"role": "user"}}]}}
        (_mkdir(root / subset / "items" / "prompts") / f"q{i}.json").write_text(json.dumps(prompt))
        item = {"id": f"{2000 + i:024x}", "filename": f"/prompts/q{i}.json", "name": f"q{i}.json",
                "metadata": {"system": {"mimetype": "application/json", "shebang": {"dltype": "prompt"}}},
                "annotations": [{"id": f"a{i}", "type": "text", "label": "free-text", "coordinates": caption,
                                 "metadata": {"system": {"promptId": "1"}}}], "annotationsCount": 1}
        (_mkdir(root / subset / "json" / "prompts") / f"q{i}.json").write_text(json.dumps(item))


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_adapter_interrupted_train_saves_its_resume_state_and_the_next_train_continues(pairs, tmp_path, platform):
    """dtlpy's train_model calls save_to_model (our `save`, then an upload of output_path) when train
    raises too. That must keep the starting weights as the model's and carry the resume state, so a
    new adapter loading those artifacts (the next train_model, on another pod) continues the run.
    The whole flow through dtlpy on the fake platform: tests/test_platform_flows.py."""
    from adapters.clip_adapter import ClipAdapter, ClipAdapterFailure
    from dataloop_fakes import platform_model

    manifest = tmp_path / "pairs.jsonl"
    write_manifest(pairs, manifest)
    configuration = {"model_name": "tiny", "device": "cpu", "batch_size": 8, "num_epochs": 3,
                     "learning_rate": 1e-3, "early_stop": False, "num_workers": 0, "resume_upload_minutes": 0}

    def adapter_on(artifacts: Path) -> ClipAdapter:
        adapter = ClipAdapter()
        adapter.model_entity = platform_model(platform, configuration)
        adapter.load(str(artifacts))
        return adapter

    whole = adapter_on(tmp_path / "no-artifacts")
    whole.train(str(manifest), str(tmp_path / "whole"))
    first = adapter_on(tmp_path / "no-artifacts")
    start = first.clip.fingerprint

    def evicted(i_epoch, n_epoch):
        if i_epoch == 1:
            raise RuntimeError("pod evicted")

    with pytest.raises(RuntimeError, match="pod evicted"):
        first.train(str(manifest), str(tmp_path / "first"), on_epoch_end_callback=evicted)
    first.save(str(tmp_path / "first"))
    assert not (tmp_path / "first" / "model.safetensors").exists()  # the model keeps its starting weights
    assert archive_is_resumable(tmp_path / "first" / RESUME_ARCHIVE)  # at the top: a listing finds it

    second = adapter_on(tmp_path / "first")  # what load_from_model downloads next time
    assert second.clip.fingerprint == start
    epochs = []
    second.train(str(manifest), str(tmp_path / "second"), on_epoch_end_callback=lambda i, n: epochs.append(i))
    assert epochs == [2]  # only the epoch the first run did not finish
    assert second.clip.fingerprint == whole.clip.fingerprint
    second.save(str(tmp_path / "second"))
    assert not archive_is_resumable(tmp_path / "second" / RESUME_ARCHIVE)
    assert not (tmp_path / "second" / "training").exists()  # laid out flat: nothing in a subfolder
    with pytest.raises(ClipAdapterFailure, match="no such manifest"):  # library errors become one line
        second.train(str(tmp_path / "nowhere.jsonl"), str(tmp_path / "output2"))


def test_adapter_starts_over_when_the_interrupted_run_had_other_data(pairs, tmp_path, platform, caplog):
    from adapters.clip_adapter import ClipAdapter
    from dataloop_fakes import platform_model

    run(pairs, tmp_path / "earlier-run", num_epochs=1)  # a resume state for other settings
    pack_resume_state(tmp_path / "earlier-run", tmp_path / "artifacts" / RESUME_ARCHIVE, resumable=True)
    write_manifest(pairs[:-2], tmp_path / "fewer.jsonl")
    adapter = ClipAdapter()
    adapter.model_entity = platform_model(platform, {"model_name": "tiny", "device": "cpu", "batch_size": 8,
                                                     "num_epochs": 1, "num_workers": 0})
    adapter.load(str(tmp_path / "artifacts"))
    epochs = []
    with caplog.at_level("WARNING", logger="ModelAdapter"):
        adapter.train(str(tmp_path / "fewer.jsonl"), str(tmp_path / "out"),
                      on_epoch_end_callback=lambda i, n: epochs.append(i))
    assert epochs == [0]
    assert "not continuing the interrupted training" in caplog.text
