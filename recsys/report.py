"""Plots of a training run's evaluation report (matplotlib, no display needed).

Each function returns a figure; :mod:`recsys.train.session` logs them to MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on training workers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from recsys.metrics import calibration_curve  # noqa: E402


def calibration_figure(
    labels: Mapping[str, np.ndarray], probs: Mapping[str, np.ndarray], title: str
) -> Figure:
    """Reliability diagram per task: observed rate against mean prediction in quantile bins."""
    tasks = [t for t in labels if t in probs]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        predicted, observed, count = calibration_curve(labels[task], probs[task], bins=20)
        top = max(float(np.nanmax(predicted)), float(np.nanmax(observed)), 1e-6) * 1.05
        ax.plot([0, top], [0, top], color="0.6", linestyle="--", linewidth=1, label="perfect")
        ax.plot(predicted, observed, marker="o", markersize=3, label="model")
        ax.set(
            xlim=(0, top),
            ylim=(0, top),
            xlabel="mean predicted probability",
            ylabel="observed rate",
            title=f"{task} ({int(np.sum(count)):,} rows)",
        )
        ax.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def expert_load_figure(history: Sequence[Mapping[str, float]], title: str) -> Figure:
    """Heat map per gate: share of rows routed to each expert (columns) at each epoch (rows)."""
    gates: dict[str, list[tuple[int, int, float]]] = {}
    for row in history:
        for key, value in row.items():
            if "/load/expert" in key and key.startswith("valid/"):
                gate, expert = key[len("valid/") :].split("/load/expert")
                gates.setdefault(gate, []).append((int(row["epoch"]), int(expert), float(value)))
    if not gates:
        fig = plt.figure(figsize=(4, 2))
        fig.text(0.5, 0.5, "no gates in this model", ha="center", va="center")
        return fig
    fig, axes = plt.subplots(1, len(gates), figsize=(4.5 * len(gates), 3.5), squeeze=False)
    for ax, (gate, cells) in zip(axes[0], sorted(gates.items()), strict=True):
        epochs = sorted({e for e, _, _ in cells})
        experts = max(x for _, x, _ in cells) + 1
        grid = np.full((len(epochs), experts), np.nan)
        for e, x, v in cells:
            grid[epochs.index(e), x] = v
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(np.nanmax(grid), 1e-6))
        ax.set(xlabel="expert", ylabel="epoch", title=gate, yticks=range(len(epochs)), yticklabels=epochs)
        fig.colorbar(image, ax=ax, label="share of rows")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def loss_figure(steps: Sequence[int], losses: Mapping[str, Sequence[float]], title: str) -> Figure:
    """Training loss per task against the step (means over each logging window)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in losses.items():
        ax.plot(steps[: len(values)], values, label=name)
    ax.set(xlabel="step", ylabel="loss", title=title, yscale="log")
    ax.legend()
    fig.tight_layout()
    return fig
