"""Plots of a training run's evaluation report (matplotlib, no display needed).

Each function returns a figure; the training run logs them to MLflow. Importing this module changes no
global state (no ``matplotlib.use``): figures are bare :class:`~matplotlib.figure.Figure` objects, which
need no backend to be saved, unless pyplot runs in interactive mode (a notebook after ``%matplotlib
inline``, IPython), where they are pyplot's figures so that they show inline.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from recsys.metric_names import parse_expert_load
from recsys.metrics import calibration, calibration_curve, log_loss


def new_figure(**kwargs: Any) -> Figure:
    """A new figure (keyword arguments as for ``Figure``): pyplot's in interactive mode, else a bare one.

    A bare figure is garbage collected like any object; pyplot's stays open until pyplot closes it.
    """
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None and matplotlib.is_interactive():
        return pyplot.figure(**kwargs)
    return Figure(**kwargs)


def calibration_figure(
    labels: Mapping[str, np.ndarray],
    probs: Mapping[str, np.ndarray],
    title: str,
    raw: Mapping[str, np.ndarray] | None = None,
) -> Figure:
    """Reliability diagram per task: observed rate against mean prediction in quantile bins.

    With ``raw``, the probabilities before calibration, a task shows both curves, and its title the
    calibration (mean prediction / observed rate) and log loss before and after.
    """
    raw = raw or {}
    tasks = [t for t in labels if t in probs]
    fig = new_figure(figsize=(4.5 * len(tasks), 4.2))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        curves = {"model": probs[task]}
        if task in raw:
            curves = {"before calibration": raw[task], "calibrated": probs[task]}
        points = {name: calibration_curve(labels[task], p, bins=20) for name, p in curves.items()}
        top = max(max(np.nanmax(pt[0]), np.nanmax(pt[1])) for pt in points.values())
        top = max(float(top), 1e-6) * 1.05
        ax.plot([0, top], [0, top], color="0.6", linestyle="--", linewidth=1, label="perfect")
        for name, (predicted, observed, _) in points.items():
            ax.plot(predicted, observed, marker="o", markersize=3, label=name)
        rows = int(np.sum(next(iter(points.values()))[2]))
        subtitle = f"{task} ({rows:,} rows)"
        if task in raw:
            before, after = (
                _calibration_text(labels[task], raw[task]),
                _calibration_text(labels[task], probs[task]),
            )
            subtitle += f"\ncalibration, log loss: {before} -> {after}"
        ax.set(
            xlim=(0, top),
            ylim=(0, top),
            xlabel="mean predicted probability",
            ylabel="observed rate",
            title=subtitle,
        )
        ax.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _calibration_text(labels: np.ndarray, probs: np.ndarray) -> str:
    return f"{calibration(labels, probs):.3f}, {log_loss(labels, probs):.4f}"


def expert_load_figure(history: Sequence[Mapping[str, float]], title: str) -> Figure:
    """Heat map per gate: share of rows routed to each expert (columns) at each epoch (rows)."""
    gates: dict[str, list[tuple[int, int, float]]] = {}
    for row in history:
        for key, value in row.items():
            parsed = parse_expert_load(key, "valid/")
            if parsed is not None:
                gate, expert = parsed
                gates.setdefault(gate, []).append((int(row["epoch"]), expert, float(value)))
    if not gates:
        fig = new_figure(figsize=(4, 2))
        fig.text(0.5, 0.5, "no gates in this model", ha="center", va="center")
        return fig
    fig = new_figure(figsize=(4.5 * len(gates), 3.5))
    axes = fig.subplots(1, len(gates), squeeze=False)
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
    fig = new_figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, values in losses.items():
        ax.plot(steps[: len(values)], values, label=name)
    ax.set(xlabel="step", ylabel="loss", title=title, yscale="log")
    ax.legend()
    fig.tight_layout()
    return fig
