"""What a training run leaves for people to look at: curves (PNG), a report (Markdown + JSON).

`metrics.jsonl` (one line per epoch, epoch 0 = the starting model) is written by the loop;
this module turns the history into `curves.png` and compares the starting model with the
final one on validation in `report.md` / `report.json`. matplotlib runs headless (Agg).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .files import atomic_path, strict_json, write_text_atomic
from .runs import EpochRecord, FitResult

if TYPE_CHECKING:  # annotations only
    from .config import ClipConfig

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CURVES_PNG = "curves.png"

# (key, title, higher is better) in the order the report lists them.
REPORT_METRICS = (
    ("t2i_r1", "text→image R@1", True), ("t2i_r5", "text→image R@5", True), ("t2i_r10", "text→image R@10", True),
    ("i2t_r1", "image→text R@1", True), ("i2t_r5", "image→text R@5", True), ("i2t_r10", "image→text R@10", True),
    ("mean_recall", "mean recall", True), ("recall@1", "recall@1 (both ways)", True),
    ("t2i_median_rank", "text→image median rank", False), ("t2i_mean_rank", "text→image mean rank", False),
    ("i2t_median_rank", "image→text median rank", False), ("i2t_mean_rank", "image→text mean rank", False),
    ("loss", "validation loss", False),
)
MAX_LISTED_PROBLEMS = 20


# ---- curves --------------------------------------------------------------------------------
def plot_curves(history: Sequence[EpochRecord], path: Path, monitor: str = "mean_recall") -> Path:
    """Loss (train and validation) and validation recall per epoch; the best epoch marked."""
    import matplotlib.pyplot as plt

    fig = curves_figure(history, monitor)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def curves_figure(history: Sequence[EpochRecord], monitor: str = "mean_recall"):
    """The figure `plot_curves` saves. Legends sit below the plots: inside, they hid the lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r.epoch for r in history]
    fig, (ax_loss, ax_recall) = plt.subplots(1, 2, figsize=(11, 4.8), dpi=110, layout="constrained")
    trained = [r for r in history if r.train_loss is not None]
    ax_loss.plot([r.epoch for r in trained], [r.train_loss for r in trained], "o-", label="train")
    ax_loss.plot(epochs, [r.val.get("loss", math.nan) for r in history], "s-", label="validation")
    ax_loss.set(title="contrastive loss", xlabel="epoch (0 = starting model)", ylabel="loss")
    for key, style in (("t2i_r1", "o-"), ("i2t_r1", "s-"), ("t2i_r5", "o--"), ("i2t_r5", "s--"),
                       ("mean_recall", "k^-")):
        ax_recall.plot(epochs, [r.val.get(key, math.nan) for r in history], style, label=key)
    ax_recall.set(title="validation retrieval", xlabel="epoch (0 = starting model)", ylabel="recall", ylim=(0, 1.02))
    best = [r.epoch for r in history if r.improved]
    for ax in (ax_loss, ax_recall):
        if best:
            ax.axvline(best[-1], color="grey", linestyle=":", label=f"best ({monitor})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


# ---- the report ----------------------------------------------------------------------------
def build_report(result: FitResult, config: "ClipConfig", *, n_train: int, n_val: int,
                 problems: Sequence[Any] = ()) -> dict[str, Any]:
    history = result.history
    trained = [r for r in history if r.train_loss is not None]
    start, final = result.start_metrics, result.final_metrics
    return {
        "model": {"start": config.model_name, "arch": result.clip.arch, "output": str(result.model_dir),
                  "fingerprint": result.clip.fingerprint},
        "data": {"train_pairs": n_train, "validation_pairs": n_val, "skipped_records": len(problems),
                 "problems": [str(p) for p in problems[:MAX_LISTED_PROBLEMS]]},
        "training": {
            "epochs_run": history[-1].epoch, "num_epochs": config.num_epochs,
            "stopped_early": result.stopped_early, "best_epoch": result.best_epoch, "monitor": config.monitor,
            "steps": history[-1].step,
            "mean_pairs_per_s": sum(r.pairs_per_s for r in trained) / len(trained) if trained else None,
            "seconds": sum(r.seconds for r in trained),
            "skipped_pairs": sum(r.skipped_pairs for r in trained),
        },
        "wise_ft": ({"alpha": result.wise_ft_alpha, "scores": {str(a): v for a, v in result.wise_ft_scores.items()}}
                    if result.wise_ft_alpha is not None else None),
        "start": start,
        "final": final,
        "change": {k: final[k] - start[k] for k in start if k in final},
        "config": config.to_dict(),
    }


def write_report(run_dir: Path, result: FitResult, config: "ClipConfig", *, n_train: int, n_val: int,
                 problems: Sequence[Any] = ()) -> dict[str, Any]:
    """report.json and report.md in `run_dir`; returns the JSON content."""
    report = build_report(result, config, n_train=n_train, n_val=n_val, problems=problems)
    write_text_atomic(Path(run_dir) / REPORT_JSON, strict_json(report, indent=2) + "\n")
    write_text_atomic(Path(run_dir) / REPORT_MD, report_markdown(report))
    return report


def name_output(run_dir: Path, output: str | Path) -> dict[str, Any]:
    """Rewrite the report in `run_dir` to name `output` as the model it produced.

    For callers that move the weights out of the run folder (the adapter saves them as the model
    itself and removes best/): a report must not point at a folder that is gone.
    """
    report = json.loads((Path(run_dir) / REPORT_JSON).read_text(encoding="utf-8"))
    report["model"]["output"] = str(output)
    write_text_atomic(Path(run_dir) / REPORT_JSON, strict_json(report, indent=2) + "\n")
    write_text_atomic(Path(run_dir) / REPORT_MD, report_markdown(report))
    return report


def headline(report: dict[str, Any]) -> str:
    """One sentence: what changed on validation, and which model came out."""
    monitor = report["training"]["monitor"]
    before, after = report["start"].get(monitor), report["final"].get(monitor)
    best = report["training"]["best_epoch"]
    verdict = (f"best epoch {best} of {report['training']['epochs_run']}" if best
               else "no epoch beat the starting model, so the output is the starting model")
    stopped = " (stopped early)" if report["training"]["stopped_early"] else ""
    wise = f"; WiSE-FT alpha {report['wise_ft']['alpha']}" if report.get("wise_ft") else ""
    return f"validation {monitor}: {before:.4f} -> {after:.4f} ({after - before:+.4f}); {verdict}{stopped}{wise}"


def report_markdown(report: dict[str, Any]) -> str:
    t, d = report["training"], report["data"]
    lines = [
        "# Fine-tuning report", "",
        headline(report) + ".", "",
        f"Starting model `{report['model']['start']}` ({report['model']['arch']}); "
        f"output `{report['model']['output']}`.", "",
        "## Validation: starting model vs output", "",
        "| metric | start | output | change |", "|---|---:|---:|---:|",
    ]
    for key, title, _ in REPORT_METRICS:
        if key in report["start"] and key in report["final"]:
            a, b = report["start"][key], report["final"][key]
            lines.append(f"| {title} | {_fmt(key, a)} | {_fmt(key, b)} | {_fmt(key, b - a, sign=True)} |")
    lines += ["", f"![curves]({CURVES_PNG})", "", "## Run", "",
              f"- data: {d['train_pairs']} training pairs, {d['validation_pairs']} validation pairs, "
              f"{d['skipped_records']} records skipped",
              f"- epochs: {t['epochs_run']} of {t['num_epochs']}{' (early stop)' if t['stopped_early'] else ''}, "
              f"{t['steps']} steps, best epoch {t['best_epoch']} by {t['monitor']}"]
    if t["mean_pairs_per_s"]:
        lines.append(f"- training speed: {t['mean_pairs_per_s']:.1f} pairs/s, {t['seconds']:.0f} s in all")
    if t["skipped_pairs"]:
        lines.append(f"- pairs skipped during training (image failed to load): {t['skipped_pairs']}")
    if report.get("wise_ft"):
        scores = ", ".join(f"{a}: {v:.4f}" for a, v in report["wise_ft"]["scores"].items())
        lines.append(f"- WiSE-FT: alpha {report['wise_ft']['alpha']} (validation {t['monitor']} per alpha: {scores})")
    for problem in d["problems"]:
        lines.append(f"  - skipped: {problem}")
    config = report["config"]
    keys = ("learning_rate", "batch_size", "num_epochs", "warmup_ratio", "weight_decay", "betas", "epsilon",
            "grad_clip_norm", "freeze", "grad_cache_chunk", "wise_ft_alpha", "seed")
    lines += ["", "## Configuration", "", ", ".join(f"`{k}={json.dumps(config.get(k))}`" for k in keys), ""]
    return "\n".join(lines)


def _fmt(key: str, value: float, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if "rank" in key or key == "loss":
        return f"{value:+.2f}" if sign else f"{value:.2f}"
    return f"{100 * value:+.1f} pt" if sign else f"{100 * value:.1f}%"



