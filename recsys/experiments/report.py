"""The report of an experiment: the results table (Markdown and CSV), the records, and PNG plots.

The Markdown report has, per data set, a table of mean ± std over seeds and the published numbers beside
ours; then the advantage of every model over the baseline (paired by seed) and the computed findings. The
plots show the test metrics, the advantages, the expert load of every gated cell and the validation
curves (with a table of the main validation metric per epoch and its largest fall). Every file is written
atomically.

Example:
    >>> files = write_report(spec, Path("out"), report)  # doctest: +SKIP
    >>> sorted(files)  # doctest: +SKIP
    ['advantage.png', 'expert_load.png', 'metrics.png', 'records.json', 'results.csv', 'results.md']
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from features.files import atomic_write
from recsys.experiments.grid import Cell, RunRecord
from recsys.experiments.spec import DatasetSpec, ExperimentSpec
from recsys.experiments.stats import Advantage, CellSummary, load_entropy
from recsys.report import new_figure


@dataclass
class Report:
    """What the report of an experiment is made of.

    Attributes:
        records: every run.
        summaries: mean and std over seeds per cell.
        advantages: paired advantages over the baseline.
        findings: the computed statements.
        markdown: the Markdown report (with the plots' image links).
    """

    records: list[RunRecord]
    summaries: list[CellSummary]
    advantages: list[Advantage]
    findings: list[str]
    markdown: str = ""


def _fmt(mean: float, std: float, n: int, digits: int = 4) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _signed(mean: float, std: float, n: int) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:+.4f} ± {std:.4f}" if n > 1 else f"{mean:+.4f}"


def _dataset_table(spec: ExperimentSpec, dataset: DatasetSpec, rows: Sequence[CellSummary]) -> list[str]:
    """Markdown lines: one data set's mean ± std over seeds of every cell."""
    columns = [k for k in dict.fromkeys(k for s in rows for k in s.mean) if k != "load_entropy_min"]
    title = dataset.name if dataset.x is None else f"{dataset.name} ({spec.x_label} = {dataset.x:g})"
    out = [f"**{title}** (test split, mean ± std over {rows[0].n} seed(s))", ""]
    out.append("| model | dense params | " + " | ".join(columns) + " | s/run |")
    out.append("|---|---:|" + "---:|" * len(columns) + "---:|")
    for s in rows:
        cells = [_fmt(s.mean.get(c, math.nan), s.std.get(c, 0.0), s.n) for c in columns]
        out.append(f"| {s.cell.label} | {s.params.dense:,} | " + " | ".join(cells) + f" | {s.seconds:.0f} |")
    return [*out, ""]


def _published_table(spec: ExperimentSpec, dataset: str) -> list[str]:
    """Markdown lines: the published numbers of a data set, if the spec has any."""
    published = spec.published.get(dataset)
    if not published:
        return []
    columns = list(next(iter(published.values())))
    out = [f"Published ({spec.published_source}):", ""]
    out.append("| model | " + " | ".join(columns) + " |")
    out.append("|---|" + "---:|" * len(columns))
    for model, values in published.items():
        out.append(f"| {model} | " + " | ".join(str(values.get(c, "")) for c in columns) + " |")
    return [*out, ""]


def _advantage_tables(spec: ExperimentSpec, advs: Sequence[Advantage]) -> list[str]:
    """Markdown lines: the paired advantage over the baseline, one table per data set."""
    if not advs:
        return []
    out = [f"**Advantage over {spec.baseline}** (paired by seed; mean ± std of the difference)", ""]
    for dataset in dict.fromkeys(a.cell.dataset for a in advs):
        rows = [a for a in advs if a.cell.dataset == dataset]
        columns = list(dict.fromkeys(c for a in rows for c in a.mean))  # this data set's tasks
        out.append("| data set | model | " + " | ".join(columns) + " |")
        out.append("|---|---|" + "---:|" * len(columns))
        for a in rows:
            cells = [_signed(a.mean.get(c, float("nan")), a.std.get(c, 0.0), a.n) for c in columns]
            out.append(f"| {a.cell.dataset} | {a.cell.label} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def results_markdown(
    spec: ExperimentSpec,
    summaries: Sequence[CellSummary],
    advs: Sequence[Advantage],
    facts: Sequence[str],
    header: str,
) -> str:
    """The report: per data set a table of mean ± std over seeds, the advantages, published numbers."""
    out = [f"### {spec.name}", "", header, ""]
    if spec.description:
        out += [spec.description.strip(), ""]
    for dataset in spec.datasets:
        rows = [s for s in summaries if s.cell.dataset == dataset.name]
        if rows:
            out += _dataset_table(spec, dataset, rows) + _published_table(spec, dataset.name)
    out += _advantage_tables(spec, advs)
    if facts:
        out += ["Findings (computed):", ""] + [f"- {f}" for f in facts] + [""]
    return "\n".join(out)


def results_csv(summaries: Sequence[CellSummary]) -> str:
    """Long format: one row per cell and value, with mean, std and the number of seeds."""
    lines = ["dataset,model,setting,dense_params,embedding_params,metric,mean,std,n,seconds_per_run"]
    for s in summaries:
        for key in s.mean:
            lines.append(
                f"{s.cell.dataset},{s.cell.model},{s.cell.setting},{s.params.dense},{s.params.embedding},"
                f"{key},{s.mean[key]:.6f},{s.std[key]:.6f},{s.n},{s.seconds:.1f}"
            )
    return "\n".join(lines) + "\n"


def _metric_columns(summary: CellSummary) -> list[str]:
    return [k for k in summary.mean if not k.startswith("load_entropy")]


def _metrics_over_x(fig: Any, spec: ExperimentSpec, summaries: Sequence[CellSummary]) -> None:
    """One panel per metric: every cell's mean ± std against the data sets' ``x``."""
    xs = {d.name: d.x for d in spec.datasets}
    columns = _metric_columns(summaries[0])
    axes = fig.subplots(1, len(columns), squeeze=False)
    fig.set_size_inches(5 * len(columns), 4)
    for ax, column in zip(axes[0], columns, strict=True):
        for label in dict.fromkeys(s.cell.label for s in summaries):
            rows = sorted((s for s in summaries if s.cell.label == label), key=lambda s: xs[s.cell.dataset])
            ax.errorbar(
                [xs[s.cell.dataset] for s in rows],
                [s.mean[column] for s in rows],
                yerr=[s.std[column] for s in rows],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set(xlabel=spec.x_label, ylabel=column, title=column)
        ax.legend(fontsize=8)


def _metrics_bars(ax: Any, dataset: str, rows: Sequence[CellSummary]) -> None:
    """One data set's metrics as grouped bars (one bar per cell) with std error bars."""
    columns = _metric_columns(rows[0])
    width = 0.8 / len(rows)
    for i, s in enumerate(rows):
        positions = np.arange(len(columns)) + (i - (len(rows) - 1) / 2) * width
        ax.bar(
            positions,
            [s.mean[c] for c in columns],
            width,
            yerr=[s.std[c] for c in columns],
            capsize=2,
            label=s.cell.label,
        )
    low = min(s.mean[c] - s.std[c] for s in rows for c in columns if math.isfinite(s.mean[c]))
    high = max(s.mean[c] + s.std[c] for s in rows for c in columns if math.isfinite(s.mean[c]))
    margin = max((high - low) * 0.3, 0.002)
    ax.set_ylim(low - margin, high + margin)
    ax.set_xticks(np.arange(len(columns)), columns)
    ax.set_title(dataset)
    ax.legend(fontsize=7, ncol=min(4, len(rows)))


def metrics_figure(spec: ExperimentSpec, summaries: Sequence[CellSummary]) -> Any:
    """Test metrics per cell with std error bars: lines over ``x`` if every data set has one, else bars."""
    xs = {d.name: d.x for d in spec.datasets}
    fig = new_figure()
    if all(x is not None for x in xs.values()) and len(xs) > 1:
        _metrics_over_x(fig, spec, summaries)
    else:
        datasets = [d.name for d in spec.datasets if any(s.cell.dataset == d.name for s in summaries)]
        fig.set_size_inches(max(6.0, 1.6 * len(summaries)), 3.6 * len(datasets))
        axes = fig.subplots(len(datasets), 1, squeeze=False)
        for ax, dataset in zip(axes[:, 0], datasets, strict=True):
            _metrics_bars(ax, dataset, [s for s in summaries if s.cell.dataset == dataset])
    fig.suptitle(f"{spec.name}: test metrics (mean ± std over seeds)")
    fig.tight_layout()
    return fig


def advantage_figure(spec: ExperimentSpec, advs: Sequence[Advantage]) -> Any:
    """Paired advantage over the baseline per metric: over ``x`` when the data sets have one, else bars."""
    xs = {d.name: d.x for d in spec.datasets}
    columns = list(dict.fromkeys(c for a in advs for c in a.mean))  # data sets may differ in tasks
    fig = new_figure(figsize=(5 * len(columns), 4))
    axes = fig.subplots(1, len(columns), squeeze=False)
    labels = list(dict.fromkeys(a.cell.label for a in advs))
    numeric = all(xs[a.cell.dataset] is not None for a in advs)
    for ax, column in zip(axes[0], columns, strict=True):
        ax.axhline(0, color="0.5", linewidth=1)
        for i, label in enumerate(labels):
            rows = [a for a in advs if a.cell.label == label and column in a.mean]
            if numeric:
                rows.sort(key=lambda a: xs[a.cell.dataset])
                position = [xs[a.cell.dataset] for a in rows]
            else:
                names = list(dict.fromkeys(a.cell.dataset for a in advs))
                position = [names.index(a.cell.dataset) + i * 0.8 / len(labels) for a in rows]
            ax.errorbar(
                position,
                [a.mean[column] for a in rows],
                yerr=[a.std[column] for a in rows],
                marker="o",
                capsize=3,
                linestyle="-" if numeric else "none",
                label=label,
            )
        if not numeric:
            names = list(dict.fromkeys(a.cell.dataset for a in advs))
            ax.set_xticks(range(len(names)), names)
        ax.set(xlabel=spec.x_label if numeric else "data set", ylabel=f"Δ {column}", title=column)
        ax.legend(fontsize=8)
    fig.suptitle(f"{spec.name}: advantage over {spec.baseline} (paired by seed, mean ± std)")
    fig.tight_layout()
    return fig


def _panels(n: int, max_cols: int, size: tuple[float, float]) -> tuple[Any, list[Any]]:
    """A figure of ``n`` panels, at most ``max_cols`` a row, each ``size`` inches; spare ones hidden."""
    cols = max(1, min(max_cols, n))
    rows = max(1, math.ceil(n / cols))
    fig = new_figure(figsize=(size[0] * cols, size[1] * rows))
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def expert_load_grid_figure(spec: ExperimentSpec, records: Sequence[RunRecord]) -> Any:
    """Test-split expert load of every gated cell (its first seed): one panel per cell, bars per gate."""
    firsts: dict[Cell, RunRecord] = {}
    for r in records:
        if r.expert_load and r.cell not in firsts:
            firsts[r.cell] = r
    fig, axes = _panels(len(firsts), 4, (4.2, 3.2))
    for ax, (cell, record) in zip(axes, firsts.items(), strict=False):
        gates = list(record.expert_load)
        width = 0.8 / len(gates)
        for g, gate in enumerate(gates):
            load = np.asarray(record.expert_load[gate])
            ax.bar(np.arange(load.size) + (g - (len(gates) - 1) / 2) * width, load, width, label=gate)
            ax.axhline(1 / load.size, color="0.5", linestyle="--", linewidth=0.8)
        entropy = np.mean([load_entropy(v) for v in record.expert_load.values()])
        title = f"{cell.label}" if len(spec.datasets) == 1 else f"{cell.dataset}: {cell.label}"
        ax.set(title=f"{title}\nload entropy {entropy:.2f}", xlabel="expert", ylabel="share of rows")
        ax.legend(fontsize=6)
    fig.suptitle(f"{spec.name}: expert load per gate on the test split (seed {spec.seeds[0]})")
    fig.tight_layout()
    return fig


def _curves(records: Sequence[RunRecord]) -> dict[Cell, np.ndarray]:
    """Per cell, the (seeds, epochs) validation curves of its runs (the shortest run's epochs)."""
    by_cell: dict[Cell, list[list[float]]] = {}
    for r in records:
        if r.valid_curve:
            by_cell.setdefault(r.cell, []).append(list(r.valid_curve))
    return {c: np.array([v[: min(map(len, vs))] for v in vs]) for c, vs in by_cell.items()}


def largest_fall(curve: np.ndarray) -> float:
    """The largest fall of the metric from one epoch to the next (0 when it never falls)."""
    return float(max(0.0, *(-np.diff(curve)))) if curve.size > 1 else 0.0


def _curve_table(spec: ExperimentSpec, records: Sequence[RunRecord]) -> list[str]:
    """Markdown lines: the validation main metric per epoch of every cell, and its largest fall."""
    curves = _curves(records)
    if not curves:
        return []
    epochs = max(c.shape[1] for c in curves.values())
    out = [
        f"**Validation curve** (`{spec.base.get('training', {}).get('main_metric', 'click/auc')}` after each "
        "epoch, mean over seeds; largest fall: the largest drop from one epoch to the next, worst seed)",
        "",
        "| data set | model | " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) + " | largest fall |",
        "|---|---|" + "---:|" * (epochs + 1),
    ]
    for cell, curve in curves.items():
        values = [f"{v:.4f}" for v in curve.mean(axis=0)] + [""] * (epochs - curve.shape[1])
        fall = max(largest_fall(c) for c in curve)
        out.append(f"| {cell.dataset} | {cell.label} | " + " | ".join(values) + f" | {fall:.4f} |")
    return [*out, ""]


def validation_figure(spec: ExperimentSpec, records: Sequence[RunRecord]) -> Any:
    """The validation main metric over epochs: one panel per data set, a line per model (mean, min-max)."""
    curves = _curves(records)
    datasets = [d.name for d in spec.datasets if any(c.dataset == d.name for c in curves)]
    fig, axes = _panels(len(datasets), 3, (4.6, 3.4))
    for ax, dataset in zip(axes, datasets, strict=False):
        for cell, curve in curves.items():
            if cell.dataset != dataset:
                continue
            epochs = np.arange(1, curve.shape[1] + 1)
            ax.plot(epochs, curve.mean(axis=0), marker="o", label=cell.label)
            ax.fill_between(epochs, curve.min(axis=0), curve.max(axis=0), alpha=0.2)
        ax.set(
            title=dataset,
            xlabel="epoch",
            ylabel="validation " + spec.base.get("training", {}).get("main_metric", "click/auc"),
        )
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    fig.suptitle(f"{spec.name}: validation curve (mean over seeds, min-max band)")
    fig.tight_layout()
    return fig


def figures(spec: ExperimentSpec, report: Report) -> dict[str, Any]:
    """The plots by file name: the metrics, and the advantages, expert loads and curves where there are."""
    out = {"metrics.png": metrics_figure(spec, report.summaries)}
    if any(len(r.valid_curve) > 1 for r in report.records):
        out["validation.png"] = validation_figure(spec, report.records)
    if report.advantages:
        out["advantage.png"] = advantage_figure(spec, report.advantages)
    if any(r.expert_load for r in report.records):
        out["expert_load.png"] = expert_load_grid_figure(spec, report.records)
    return out


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_report(spec: ExperimentSpec, out: Path, report: Report, header: str) -> dict[str, Path]:
    """Writes results.md (with the plots' links), results.csv, records.json and the plots into ``out``.

    Sets ``report.markdown``. Returns the files by name.
    """
    drawn = figures(spec, report)
    markdown = results_markdown(spec, report.summaries, report.advantages, report.findings, header)
    curves = "\n".join(_curve_table(spec, report.records))
    markdown = markdown + ("\n" + curves if curves else "")
    report.markdown = markdown + "\n" + "\n".join(f"![{name}]({name})" for name in drawn) + "\n"
    contents: dict[str, str | bytes] = {
        "results.md": report.markdown,
        "results.csv": results_csv(report.summaries),
        "records.json": json.dumps([r.to_dict() for r in report.records], indent=1),
    }
    contents.update({name: _png(figure) for name, figure in drawn.items()})
    for name, content in contents.items():
        atomic_write(out / name, content)
    return {name: out / name for name in contents}


def machine_line() -> str:
    """``<cpus> CPUs, <platform>, <date>``: where and when results were produced."""
    return (
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {platform.system()}, "
        f"{dt.date.today().isoformat()}"
    )
