"""Draw a run's metrics (every metrics.jsonl under a run folder) to PNG files, one figure per step."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from learner.metrics import read_metrics

log = logging.getLogger(__name__)

SKIP = {"step", "time", "epoch"}


def metric_files(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir)
    if root.is_file():
        return [root]
    return sorted(root.rglob("metrics.jsonl"))


def series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """name -> (steps, values), skipping missing and non-finite values."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key in SKIP or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            steps, values = out.setdefault(key, ([], []))
            steps.append(int(row.get("step", len(steps))))
            values.append(float(value))
    return out


def plot_file(path: Path, out_png: Path) -> Path | None:
    """One PNG with a small panel per metric; None when the file has no numeric series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = series(read_metrics(path))
    if not curves:
        return None
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, (steps, values)) in zip(axes.flat, sorted(curves.items())):
        ax.plot(steps, values, marker="." if len(values) < 30 else None, linewidth=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.suptitle(str(path.parent.name), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """PNG per metrics.jsonl found under run_dir, written next to it (or into out_dir); their paths."""
    root = Path(run_dir)
    files = metric_files(root)
    if not files:
        raise FileNotFoundError(f"no metrics.jsonl under {root}")
    written = []
    for path in files:
        rel = path.parent.relative_to(root) if root.is_dir() and path.parent != root else Path(path.parent.name)
        name = "-".join(rel.parts) or "metrics"
        target = (Path(out_dir) / f"{name}.png") if out_dir else path.parent / "metrics.png"
        png = plot_file(path, target)
        if png is not None:
            written.append(png)
            log.info("plotted %s -> %s", path, png)
    return written


def plot_story(metrics_path: str | Path, out_png: str | Path, title: str = "",
               reward_eval: tuple[float, float] | None = None) -> Path | None:
    """The one picture of an RL run: the learned (proxy) reward and the hidden gold score of the sampled
    rollouts over iterations, with the greedy gold before and after as points (left); the KL to the
    reference beside it (right). A proxy that keeps rising while gold stalls or falls is reward hacking.
    Without a gold judge (real data) the reward curve stands alone and says so; `reward_eval` (the reward
    model's mean score of greedy responses to held-out prompts, before and after) is drawn as two points.
    None when the file has no reward curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = series(read_metrics(Path(metrics_path)))
    if "reward_score" not in curves:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    steps, values = curves["reward_score"]
    left.plot(steps, values, color="tab:blue", linewidth=1.2, label="proxy reward (reward model)")
    left.set_xlabel("iteration")
    left.set_ylabel("proxy reward", color="tab:blue")
    left.grid(alpha=0.3)
    if reward_eval is not None:
        left.plot([0, steps[-1]], list(reward_eval), "o", color="tab:purple", markersize=7,
                  label="reward, greedy (held-out prompts)")
    handles = left.get_lines()
    gold = "gold_score" in curves or "gold_eval" in curves
    if gold:
        gold_ax = left.twinx()
        if "gold_score" in curves:
            gold_ax.plot(*curves["gold_score"], color="tab:orange", linewidth=1.2, label="gold, sampled rollouts")
        if "gold_eval" in curves:
            gold_ax.plot(*curves["gold_eval"], "o", color="tab:red", markersize=7, label="gold, greedy (eval prompts)")
        gold_ax.set_ylabel("gold score (hidden judge, 0-100)", color="tab:orange")
        handles = handles + gold_ax.get_lines()
    left.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="lower right")
    left.set_title("learned reward vs the hidden gold judge" if gold else
                   "learned reward (no gold judge for this data: the reward model's score is all there is)",
                   fontsize=10 if gold else 9)
    if "kl" in curves:
        right.plot(*curves["kl"], color="tab:green", linewidth=1.2)
    right.set_title("KL to the reference (nats per response)", fontsize=10)
    right.set_xlabel("iteration")
    right.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
