"""``training_loss.png``: training loss and learning rate against step, and evaluation metrics when there are any.

Drawn from ``trainer.state.log_history`` (the same records as ``trainer_state.json``) with matplotlib's object API
(no pyplot, so no global backend or figure state is touched).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

PLOT_NAME = "training_loss.png"
# Trainer bookkeeping that is not a metric worth plotting
SKIPPED = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch", "step"}


def _series(log_history: list[dict]):
    train = [(h["step"], h["loss"], h.get("learning_rate")) for h in log_history if "loss" in h and "step" in h]
    evals: dict[str, list[tuple[int, float]]] = {}
    for h in log_history:
        for key, value in h.items():
            if key.startswith("eval_") and key not in SKIPPED and isinstance(value, (int, float)) and "step" in h:
                evals.setdefault(key, []).append((h["step"], value))
    return train, evals


def plot_training(log_history: list[dict], path: str) -> str | None:
    """Write the plot to ``path`` (atomically); return it, or None when nothing was logged."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, evals = _series(log_history)
    if not train and not evals:
        return None
    others = {k: v for k, v in evals.items() if k != "eval_loss"}
    figure = Figure(figsize=(8, 7 if others else 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2 if others else 1, 1, squeeze=False)[:, 0]
    loss_ax = axes[0]
    if train:
        loss_ax.plot([s for s, _, _ in train], [v for _, v, _ in train], color="tab:blue", label="train loss")
    if "eval_loss" in evals:
        loss_ax.plot(*zip(*evals["eval_loss"]), "o-", color="tab:orange", label="eval loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    handles, labels = loss_ax.get_legend_handles_labels()
    rates = [(s, lr) for s, _, lr in train if lr is not None]
    if rates:
        lr_ax = loss_ax.twinx()
        lr_ax.plot(*zip(*rates), "--", color="tab:green", label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_handles, lr_labels = lr_ax.get_legend_handles_labels()
        handles, labels = handles + lr_handles, labels + lr_labels
    loss_ax.legend(handles, labels, loc="upper right")
    loss_ax.set_title("training loss and learning rate")
    if others:
        metric_ax = axes[1]
        for key, points in sorted(others.items()):
            metric_ax.plot(*zip(*points), "o-", label=key[len("eval_"):])
        metric_ax.set_xlabel("step")
        metric_ax.set_title("evaluation")
        metric_ax.grid(alpha=0.3)
        metric_ax.legend(loc="best")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def save_training_plot(log_history: list[dict], output_dir: str) -> str | None:
    """``output_dir/training_loss.png`` at the end of training; a plotting problem is logged, never raised, so it
    cannot cost a finished run."""
    path = os.path.join(output_dir, PLOT_NAME)
    try:
        written = plot_training(log_history, path)
    except Exception as e:  # noqa: BLE001 - the prefix is already saved; a missing plot is only a warning
        logger.warning("could not write %s: %s", path, e)
        return None
    if written:
        logger.info("loss plot written to %s", written)
    return written
