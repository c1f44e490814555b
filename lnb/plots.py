"""Figures of experiment results (matplotlib, written as PNG files; no screen needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLORS = {"lnb": "C0", "adam": "C1", "sgd": "C2"}


def plot_results(results: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Four panels per figure: training loss and test metric against epoch and against wall
    time (compilation excluded). Several results (e.g. original and inverted pixels) share the
    axes: solid lines for the first, dashed for the second, dotted for the third."""
    # matplotlib's object API: no pyplot, no backend switch (safe inside notebooks too).
    from matplotlib.figure import Figure

    # Excess loss (matrix factorization) has no test metric: one row of panels, not a blank one.
    rows = 1 if results[0].get("metric") == "excess loss" else 2
    fig = Figure(figsize=(11, 4.0 if rows == 1 else 7.5))
    axes = fig.subplots(rows, 2, squeeze=False)
    styles = ["-", "--", ":"]
    for result, style in zip(results, styles, strict=False):
        label_data = result.get("dataset", {}).get("name", "")
        for run in result["runs"]:
            color = COLORS.get(run["optimizer"], None)
            label = f"{run['label']} — {label_data}" if len(results) > 1 else run["label"]
            epochs = np.arange(len(run["train_loss"]))
            wall = np.cumsum(run["epoch_seconds"])
            train = np.asarray(run["train_loss"], dtype=float)
            metric = np.asarray(run["test_metric"], dtype=float)
            log_loss = result.get("metric") == "excess loss"
            for ax, x in ((axes[0, 0], epochs), (axes[0, 1], wall)):
                y = metric if log_loss else train
                ax.plot(x, y, style, color=color, label=label)
                ax.set_yscale("log")
            if rows == 2:
                for ax, x in ((axes[1, 0], epochs), (axes[1, 1], wall)):
                    ax.plot(x, metric, style, color=color, label=label)
    metric = results[0].get("metric", "metric")
    first = "excess loss" if metric == "excess loss" else "training loss"
    axes[0, 0].set(xlabel="epoch" if metric != "excess loss" else "step", ylabel=first)
    axes[0, 1].set(xlabel="wall time (s, compilation excluded)", ylabel=first)
    if rows == 2:
        axes[1, 0].set(xlabel="epoch", ylabel=f"test {metric}")
        axes[1, 1].set(xlabel="wall time (s, compilation excluded)", ylabel=f"test {metric}")
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
