"""Statistics of an experiment: means over seeds, paired advantages, load entropy, computed findings.

Mean and standard deviation over seeds per cell, the advantage over a baseline paired by seed, the
normalised expert-load entropy, and findings computed from them (no judgement typed by hand).

Example:
    >>> round(load_entropy([0.5, 0.5, 0.0, 0.0]), 3)  # two of four experts: log 2 / log 4
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recsys.experiments.grid import Cell, RunRecord
from recsys.experiments.matching import ParameterCount
from recsys.experiments.spec import ExperimentSpec


def load_entropy(load: Sequence[float]) -> float:
    """Entropy of an expert load, normalised by ``log E``: 1 when balanced, 0 when one expert takes all.

    Example:
        >>> round(load_entropy([0.25, 0.25, 0.25, 0.25]), 3), load_entropy([1.0, 0.0, 0.0, 0.0])
        (1.0, 0.0)
    """
    p = np.asarray(load, dtype=np.float64)
    if p.size < 2 or p.sum() <= 0:
        return float("nan")
    p = p / p.sum()
    nonzero = p[p > 0]
    return max(0.0, float(-(nonzero * np.log(nonzero)).sum() / math.log(p.size)))  # no -0.0


@dataclass
class CellSummary:
    """Mean and standard deviation over seeds of one cell's metrics."""

    cell: Cell
    params: ParameterCount
    n: int
    mean: dict[str, float]
    std: dict[str, float]
    seconds: float


def metric_columns(spec: ExperimentSpec, tasks: Sequence[str]) -> list[str]:
    """The table's metric columns for a data set's binary tasks: ``task/metric`` in task order."""
    return [f"{task}/{metric}" for metric in spec.metrics for task in tasks]


def record_values(record: RunRecord, spec: ExperimentSpec) -> dict[str, float]:
    """A run's reported values: the spec's test metrics per task, and the expert-load entropy."""
    values = {}
    for column in metric_columns(spec, record.tasks):
        values[column] = record.metrics.get(f"test/{column}", float("nan"))
    if record.expert_load:
        entropies = [load_entropy(load) for load in record.expert_load.values()]
        values["load_entropy"] = float(np.nanmean(entropies))
        values["load_entropy_min"] = float(np.nanmin(entropies))
    return values


def summarize(records: Sequence[RunRecord], spec: ExperimentSpec) -> list[CellSummary]:
    """Mean and standard deviation (ddof 1; 0 for one seed) of every cell's values, in grid order."""
    by_cell: dict[Cell, list[RunRecord]] = {}
    for record in records:
        by_cell.setdefault(record.cell, []).append(record)
    out = []
    for cell, runs in by_cell.items():
        values = [record_values(r, spec) for r in runs]
        keys = list(values[0])
        mean, std = {}, {}
        for key in keys:
            column = np.array([v.get(key, np.nan) for v in values], dtype=np.float64)
            mean[key] = float(np.nanmean(column)) if np.isfinite(column).any() else float("nan")
            std[key] = float(np.nanstd(column, ddof=1)) if np.isfinite(column).sum() > 1 else 0.0
        seconds = float(np.mean([r.seconds for r in runs]))
        out.append(CellSummary(cell, runs[0].params, len(runs), mean, std, seconds))
    return out


@dataclass
class Advantage:
    """A cell's paired (same data set, setting and seed) difference to the baseline model's cell."""

    cell: Cell
    baseline: Cell
    mean: dict[str, float]
    std: dict[str, float]
    n: int


def advantages(records: Sequence[RunRecord], spec: ExperimentSpec) -> list[Advantage]:
    """Per cell, the mean and std over seeds of ``value - baseline value`` for every metric column."""
    if not spec.baseline:
        return []
    index = {(r.cell, r.seed): r for r in records}
    out = []
    cells = list(dict.fromkeys(r.cell for r in records))
    for cell in cells:
        if cell.model == spec.baseline:
            continue
        base_cell = Cell(cell.dataset, spec.baseline, cell.setting)
        pairs = [
            (record_values(index[(cell, s)], spec), record_values(index[(base_cell, s)], spec))
            for s in spec.seeds
            if (cell, s) in index and (base_cell, s) in index
        ]
        if not pairs:
            continue
        tasks = next(r.tasks for r in records if r.cell == cell)
        mean, std = {}, {}
        for column in metric_columns(spec, tasks):
            diffs = np.array([a[column] - b[column] for a, b in pairs])
            mean[column] = float(np.mean(diffs))
            std[column] = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0
        out.append(Advantage(cell, base_cell, mean, std, len(pairs)))
    return out


def findings(spec: ExperimentSpec, summaries: Sequence[CellSummary], advs: Sequence[Advantage]) -> list[str]:
    """Plain statements computed from the results (no judgement typed by hand).

    * with a baseline and numeric ``x`` values: for every other model and metric, the advantage at each
      ``x`` and whether it grows as ``x`` falls (Spearman's rank correlation between ``x`` and the
      advantage: negative means it grows as ``x`` falls);
    * with gates: the cell with the least balanced expert load and the most balanced one of the same model.
    """
    return _trend_findings(spec, advs) + _routing_findings(summaries)


def _trend(rho: float) -> str:
    if rho < -0.5:
        return "grows as x falls"
    return "shrinks as x falls" if rho > 0.5 else "shows no clear trend"


def _trend_findings(spec: ExperimentSpec, advs: Sequence[Advantage]) -> list[str]:
    """How each model's advantage over the baseline moves with the data sets' ``x``."""
    xs = {d.name: d.x for d in spec.datasets}
    if not advs or any(x is None for x in xs.values()) or len(xs) <= 2:
        return []
    lines = []
    for model, setting in sorted({(a.cell.model, a.cell.setting) for a in advs}):
        rows = sorted(
            (a for a in advs if (a.cell.model, a.cell.setting) == (model, setting)),
            key=lambda a: -xs[a.cell.dataset],
        )
        for column in rows[0].mean:
            x = np.array([xs[a.cell.dataset] for a in rows], dtype=np.float64)
            y = np.array([a.mean[column] for a in rows], dtype=np.float64)
            rho = _spearman(x, y)
            points = ", ".join(f"{xs[a.cell.dataset]:g}: {a.mean[column]:+.4f}" for a in rows)
            label = model if setting == "default" else f"{model}/{setting}"
            lines.append(
                f"{label} − {spec.baseline}, {column} by {spec.x_label} ({points}): the advantage "
                f"{_trend(rho)} (Spearman {rho:+.2f} between {spec.x_label} and the advantage)."
            )
    return lines


def _routing_findings(summaries: Sequence[CellSummary]) -> list[str]:
    """The expert-load entropy of every gated cell, and the least and most balanced ones."""
    gated = [
        s for s in summaries if "load_entropy_min" in s.mean and math.isfinite(s.mean["load_entropy_min"])
    ]
    if len(gated) <= 1:
        return []
    lines = [
        f"{s.cell.dataset} {s.cell.label}: normalised expert-load entropy "
        f"{s.mean['load_entropy']:.3f} (mean over gates), "
        f"{s.mean['load_entropy_min']:.3f} (lowest gate)."
        for s in sorted(gated, key=lambda s: s.mean["load_entropy_min"])
    ]
    worst = min(gated, key=lambda s: s.mean["load_entropy_min"])
    best = max(gated, key=lambda s: s.mean["load_entropy_min"])
    lines.append(
        f"least balanced routing: {worst.cell.dataset} {worst.cell.label} (lowest gate's normalised "
        f"load entropy {worst.mean['load_entropy_min']:.3f}); most balanced: {best.cell.dataset} "
        f"{best.cell.label} ({best.mean['load_entropy_min']:.3f}); 1 is a uniform load, 0 one expert."
    )
    return lines


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    rx = np.argsort(np.argsort(x)).astype(np.float64)
    ry = np.argsort(np.argsort(y)).astype(np.float64)
    return float(np.corrcoef(rx, ry)[0, 1])
