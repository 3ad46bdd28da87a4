"""The report of the MMoE paper's synthetic experiment: the findings, the tables and the paper's figures 4-6.

:func:`findings` tests the paper's three findings against the run-to-run spread (paired 95% intervals over
runs that share their data; bootstrap intervals for ratios of spreads). :func:`write_paper_report` writes
``results.md``, ``results.csv``, ``records.json`` and the figures.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from features.files import atomic_write

if TYPE_CHECKING:
    from recsys.experiments.paper import CellResult, PaperSpec

T_975 = {n: t for n, t in ((2, 12.71), (3, 4.303), (5, 2.776), (10, 2.262), (20, 2.093), (30, 2.045))}
FIGURES = ("loss_by_correlation.png", "loss_curves.png", "trainability.png")


def _t975(n: int) -> float:
    """Student's t 97.5% quantile for n runs (n - 1 degrees of freedom), from a short table (conservative)."""
    below = [k for k in T_975 if k <= n]
    return T_975[max(below)] if below else float("nan")


def _by(cells: Sequence[CellResult]) -> dict[tuple[str, float], CellResult]:
    return {(c.model, c.correlation): c for c in cells}


def _interval(d: np.ndarray) -> tuple[float, float, float]:
    """Mean and paired 95% interval of per-run differences."""
    half = _t975(len(d)) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def spread_ratio(
    a: np.ndarray, b: np.ndarray, resamples: int = 4000, seed: int = 0
) -> tuple[float, float, float]:
    """``std(a) / std(b)`` and its 95% bootstrap interval (runs resampled in pairs)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    ratios = a[idx].std(axis=1, ddof=1) / np.maximum(b[idx].std(axis=1, ddof=1), 1e-12)
    lo, hi = np.quantile(ratios, [0.025, 0.975])
    return float(a.std(ddof=1) / max(b.std(ddof=1), 1e-12)), float(lo), float(hi)


def findings(spec: PaperSpec, cells: Sequence[CellResult]) -> list[str]:
    """The paper's three findings, each tested against the run-to-run spread."""
    by = _by(cells)
    names = {m.name for m in spec.models}
    out: list[str] = []
    if {"mmoe", "shared_bottom"} <= names:
        for c in sorted((c for c in spec.correlations if c <= 0.5), reverse=True):
            d = by["shared_bottom", c].losses() - by["mmoe", c].losses()
            mean, lo, hi = _interval(d)
            verdict = "lower (beyond the spread)" if lo > 0 else ("higher" if hi < 0 else "not different")
            out.append(
                f"p={c:g}: MMoE's test loss is {verdict} than shared-bottom's: shared-bottom minus MMoE "
                f"{mean:+.4f} (95% {lo:+.4f} to {hi:+.4f}, {len(d)} paired runs)"
            )
        if {1.0, 0.0} <= set(spec.correlations):
            rise = {m: by[m, 0.0].losses() - by[m, 1.0].losses() for m in ("mmoe", "shared_bottom")}
            mean, lo, hi = _interval(rise["shared_bottom"] - rise["mmoe"])
            verdict = "less (beyond the spread)" if lo > 0 else ("more" if hi < 0 else "not differently")
            out.append(
                f"from p=1 to p=0 MMoE's loss rises {verdict} than shared-bottom's: "
                f"{rise['mmoe'].mean():+.4f} against {rise['shared_bottom'].mean():+.4f} "
                f"(difference {mean:+.4f}, 95% {lo:+.4f} to {hi:+.4f})"
            )
    if {"mmoe", "omoe"} <= names:
        for c in spec.correlations:
            ratio, lo, hi = spread_ratio(by["omoe", c].losses(), by["mmoe", c].losses())
            out.append(
                f"p={c:g}: MMoE's spread of final losses over runs is {_spread_verdict(lo, hi)} than OMoE's: "
                f"std OMoE / std MMoE {ratio:.2f} (95% bootstrap {lo:.2f} to {hi:.2f})"
            )
        # Pooled over correlations: each run's loss less its cell's median (the cells' levels differ).
        dev = {
            m: np.concatenate([by[m, c].losses() - np.median(by[m, c].losses()) for c in spec.correlations])
            for m in ("omoe", "mmoe")
        }
        ratio, lo, hi = spread_ratio(dev["omoe"], dev["mmoe"])
        failed = {m: _failed_runs([by[m, c].losses() for c in spec.correlations]) for m in sorted(names)}
        out.append(
            f"all correlations pooled ({len(dev['mmoe'])} runs each, loss less its cell's median): MMoE's "
            f"spread is {_spread_verdict(lo, hi)} than OMoE's: ratio {ratio:.2f} (95% bootstrap {lo:.2f} to "
            f"{hi:.2f}); runs ending above twice their cell's median loss: "
            + ", ".join(f"{m} {n}" for m, n in failed.items())
        )
    return out


def _failed_runs(cells: Sequence[np.ndarray]) -> int:
    """Runs whose final loss is more than twice their cell's median: runs that did not train."""
    return sum(int((losses > 2 * np.median(losses)).sum()) for losses in cells)


def _spread_verdict(lo: float, hi: float) -> str:
    return "narrower (beyond the spread)" if lo > 1 else ("wider" if hi < 1 else "not different")


def _fmt(values: np.ndarray) -> str:
    return f"{values.mean():.4f} ± {values.std(ddof=1):.4f}"


def results_markdown(
    spec: PaperSpec, cells: Sequence[CellResult], found: Sequence[str], command: str, minutes: float
) -> str:
    """The report: settings, the loss table, learning rates, findings."""
    from recsys.experiments.report import machine_line

    by = _by(cells)
    models = [m.name for m in spec.models]
    lines = [
        f"# {spec.name}",
        "",
        f"`{command or 'python -m pipelines.experiment --spec ' + spec.name}`: "
        f"{len(cells) * len(spec.learning_rates) * spec.runs} trainings on {machine_line()}: "
        f"{sum(c.seconds for c in cells) / 60:.1f} min of cell training (one cell per CPU at a time); "
        f"this invocation {minutes:.1f} min, including the cells it trained",
        "",
        spec.description.strip(),
        "",
        f"Data (synth.paper): d={spec.data.dim}, c={spec.data.scale:g}, m={spec.data.sinusoids}, "
        f"alpha_i={spec.data.frequency_step:g} i, "
        f"beta_i=i^2, noise std {spec.data.noise_std:g}; {spec.train_rows:,} training, {spec.valid_rows:,} "
        f"validation and {spec.test_rows:,} test rows per run. Adam, batch {spec.batch_size}, {spec.epochs} "
        f"epochs; learning rate from {list(spec.learning_rates)} by mean validation loss per cell; "
        f"{spec.runs} runs per cell (own data and initialisation).",
        "",
        "## Final test loss (mean of the two tasks' MSE), mean ± std over runs",
        "",
        "| correlation | label corr. | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for c in spec.correlations:
        row = [f"{c:g}", f"{by[models[0], c].label_correlation:.3f}"]
        row += [f"{_fmt(by[m, c].losses())} (lr {by[m, c].chosen_lr:g})" for m in models]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Parameters: " + ", ".join(f"{m} {by[m, spec.correlations[0]].parameters:,}" for m in models),
    ]
    lines += ["", "## Mean final validation loss per learning rate", ""]
    lines += ["| model | correlation | " + " | ".join(f"lr {lr:g}" for lr in spec.learning_rates) + " |"]
    lines += ["|---|---|" + "---|" * len(spec.learning_rates)]
    for m in models:
        for c in spec.correlations:
            cell = by[m, c]
            lines.append(
                f"| {m} | {c:g} | "
                + " | ".join(f"{cell.lr_valid_loss(lr):.4f}" for lr in spec.learning_rates)
                + " |"
            )
    lines += ["", "## Findings", ""] + [f"- {f}" for f in found]
    lines += ["", "Figures: " + ", ".join(FIGURES), ""]
    return "\n".join(lines)


def results_csv(cells: Sequence[CellResult]) -> str:
    """One row per (model, correlation, run) at the chosen learning rate."""
    rows = ["model,correlation,run,lr,test_y1,test_y2,test_loss"]
    for cell in cells:
        for r, (y1, y2) in enumerate(cell.chosen()):
            rows.append(
                f"{cell.model},{cell.correlation:g},{r},{cell.chosen_lr:g},"
                f"{y1:.6f},{y2:.6f},{(y1 + y2) / 2:.6f}"
            )
    return "\n".join(rows) + "\n"


def _figure_loss_by_correlation(spec: PaperSpec, cells: Sequence[CellResult]) -> Any:
    from recsys.report import new_figure

    by = _by(cells)
    fig = new_figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    xs = list(spec.correlations)
    for m in spec.models:
        losses = [by[m.name, c].losses() for c in xs]
        means = [v.mean() for v in losses]
        errs = [_t975(len(v)) * v.std(ddof=1) / math.sqrt(len(v)) for v in losses]
        ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=m.name)
    ax.set_xlabel("task correlation")
    ax.set_ylabel("final test loss (mean of tasks)")
    ax.set_title(
        "Final test loss by task correlation (paper fig. 4)\nbars: 95% interval of the mean over runs"
    )
    ax.invert_xaxis()
    ax.legend()
    fig.tight_layout()
    return fig


def _panels_by_correlation(
    spec: PaperSpec, title: str, ylabel: str, xlabel: str, draw: Callable[[Any, float], None]
) -> Any:
    """One panel per correlation, side by side; ``draw(ax, correlation)`` fills each."""
    from recsys.report import new_figure

    fig = new_figure(figsize=(4 * len(spec.correlations), 3.5))
    axes = fig.subplots(1, len(spec.correlations), squeeze=False)[0]
    for ax, c in zip(axes, spec.correlations, strict=True):
        draw(ax, c)
        ax.set_title(f"correlation {c:g}")
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel(ylabel)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _figure_curves(spec: PaperSpec, cells: Sequence[CellResult]) -> Any:
    by = _by(cells)

    def draw(ax: Any, c: float) -> None:
        for m in spec.models:
            cell = by[m.name, c]
            mask = cell.lrs == cell.chosen_lr
            ax.plot(cell.steps[1:], cell.valid[1:, mask].mean(axis=(1, 2)), label=m.name)
        ax.set_yscale("log")

    title = "Loss curves at each cell's chosen learning rate (paper fig. 5)"
    return _panels_by_correlation(spec, title, "validation loss (mean over runs)", "step", draw)


def _figure_trainability(spec: PaperSpec, cells: Sequence[CellResult]) -> Any:
    by = _by(cells)

    def draw(ax: Any, c: float) -> None:
        values = [by[m.name, c].losses() for m in spec.models]
        bins = np.linspace(min(v.min() for v in values), max(v.max() for v in values), 16)
        for m, v in zip(spec.models, values, strict=True):
            ax.hist(v, bins=bins, alpha=0.5, label=m.name)

    title = "Final losses over runs: trainability (paper fig. 6)"
    return _panels_by_correlation(spec, title, "runs", "final test loss", draw)


def write_paper_report(
    out: Path, spec: PaperSpec, cells: Sequence[CellResult], markdown: str
) -> dict[str, Path]:
    """Writes results.md, results.csv, records.json and the three figures into ``out``."""
    from recsys.experiments.report import _png

    files = {
        "results.md": out / "results.md",
        "results.csv": out / "results.csv",
        "records.json": out / "records.json",
    }
    atomic_write(files["results.md"], markdown)
    atomic_write(files["results.csv"], results_csv(cells))
    records = [
        {
            "model": c.model,
            "correlation": c.correlation,
            "chosen_lr": c.chosen_lr,
            "test_losses": c.losses().tolist(),
            "seconds": c.seconds,
        }
        for c in cells
    ]
    atomic_write(files["records.json"], json.dumps(records, indent=1))
    makers = (_figure_loss_by_correlation, _figure_curves, _figure_trainability)
    for name, make in zip(FIGURES, makers, strict=True):
        files[name] = out / name
        atomic_write(files[name], _png(make(spec, cells)))
    return files
