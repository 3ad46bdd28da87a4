"""The MMoE paper's synthetic experiment (Ma et al., KDD 2018, section 3.2 and figures 4-6), reproduced.

A spec with ``kind: paper_synthetic`` (shipped: ``paper_synthetic``) names the models (shared-bottom, the
one-gate MoE and MMoE at the paper's sizes), the task correlations, the learning rates and the number of runs
per cell. :func:`run_paper_experiment`

1. trains, for every (model, correlation), ``runs`` models at every learning rate: each run its own data set
   (:mod:`synth.paper`, seed ``data_seed + run``, so that run r of every model and correlation shares its
   vectors and inputs: comparisons are paired) and its own initialisation (seed ``run``). A cell is one Ray
   task on one CPU, training all its models at once (:class:`~recsys.train.stacked.StackedRuns`);
2. picks each cell's learning rate by the mean validation loss of its runs, as the paper does;
3. writes the report: the final test loss per correlation (the paper's figure 4), the loss curves (figure
   5), the distribution of the final losses over runs (figure 6: trainability), and the three findings of
   the paper tested against the run-to-run spread (paired 95% intervals; a bootstrap interval for the
   ratio of spreads). One MLflow parent run holds a child run per cell, with its curve.

A finished cell is kept in ``OUT/runs/<cell>.npz``; the same command reuses it unless ``--fresh``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from features import console
from features.checks import check_int, from_mapping, invalid, is_number
from features.files import atomic_write
from recsys.config import ModelConfig
from recsys.experiments.data import digest
from recsys.experiments.matching import deep_merge
from synth.paper import PaperData

KIND = "paper_synthetic"
T_975 = {n: t for n, t in ((2, 12.71), (3, 4.303), (5, 2.776), (10, 2.262), (20, 2.093), (30, 2.045))}
FIGURES = ("loss_by_correlation.png", "loss_curves.png", "trainability.png")


def _t975(n: int) -> float:
    """Student's t 97.5% quantile for n runs (n - 1 degrees of freedom), from a short table (conservative)."""
    below = [k for k in T_975 if k <= n]
    return T_975[max(below)] if below else float("nan")


@dataclass(frozen=True)
class PaperModel:
    """A model of the grid: a name and the ``model`` config's overrides (arch, gate) over the two tasks."""

    name: str
    model: dict[str, Any] = field(default_factory=dict)

    def config(self) -> ModelConfig:
        """The model config: two regression tasks ``y1`` and ``y2`` and this model's sections."""
        tasks = {"tasks": [{"name": "y1", "kind": "regression"}, {"name": "y2", "kind": "regression"}]}
        return ModelConfig.from_dict(deep_merge(tasks, self.model))


@dataclass(frozen=True)
class PaperSpec:
    """The synthetic experiment's grid (see the module docstring).

    Attributes:
        name: the experiment's name (folders, the parent run).
        description: one paragraph for the report.
        data: the generator's constants (:class:`synth.paper.PaperData`; its ``rows`` is unused).
        train_rows, valid_rows, test_rows: rows of each run's splits.
        data_seed: run r's data set is drawn from seed ``data_seed + r``.
        correlations: the task correlations (cosine of the task weights).
        runs: runs per (model, correlation, learning rate).
        learning_rates: Adam's learning rate, chosen per cell on validation.
        batch_size, epochs, evals_per_epoch: training; the curve is validated ``evals_per_epoch`` times per
            epoch.
        models: the models; findings compare ``mmoe`` with ``shared_bottom`` and ``omoe`` where present.
        experiment: the MLflow experiment.
        quick: what ``--quick`` changes (fields of this spec).
    """

    name: str
    models: tuple[PaperModel, ...]
    description: str = ""
    data: PaperData = field(default_factory=PaperData)
    train_rows: int = 20_000
    valid_rows: int = 5_000
    test_rows: int = 10_000
    data_seed: int = 1000
    correlations: tuple[float, ...] = (1.0, 0.9, 0.5, 0.0)
    runs: int = 20
    learning_rates: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    batch_size: int = 128
    epochs: int = 20
    evals_per_epoch: int = 1
    experiment: str = "paper-synthetic"
    quick: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        w = KIND
        for name in (
            "train_rows",
            "valid_rows",
            "test_rows",
            "runs",
            "batch_size",
            "epochs",
            "evals_per_epoch",
        ):
            check_int(w, name, getattr(self, name), minimum=2 if name == "runs" else 1)
        check_int(w, "data_seed", self.data_seed, minimum=0)
        for name in ("correlations", "learning_rates"):
            values = getattr(self, name)
            if not isinstance(values, list | tuple) or not values or not all(is_number(v) for v in values):
                raise invalid(w, name, values, "expected a non-empty list of numbers")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if not all(-1 <= c <= 1 for c in self.correlations):
            raise invalid(w, "correlations", list(self.correlations), "expected numbers in [-1, 1]")
        if not all(lr > 0 for lr in self.learning_rates):
            raise invalid(w, "learning_rates", list(self.learning_rates), "expected numbers > 0")
        names = [m.name for m in self.models]
        if not names or len(names) != len(set(names)):
            raise invalid(w, "models", names, "expected at least one model, names unique")
        for m in self.models:
            m.config()  # validates
        if self.batch_size > self.train_rows:
            raise invalid(
                w, "batch_size", self.batch_size, f"expected at most train_rows ({self.train_rows})"
            )

    @classmethod
    def from_dict(cls, data: Any) -> PaperSpec:
        """Builds a spec from plain data (as loaded from YAML); ``kind`` must be ``paper_synthetic``."""
        if not isinstance(data, dict):
            raise ValueError(f"{KIND}: expected a mapping, got {data!r}")
        data = dict(data)
        if data.pop("kind", None) != KIND:
            raise invalid("experiment", "kind", data.get("kind"), f"expected {KIND!r}")
        if not isinstance(data.get("models"), list):
            raise invalid(KIND, "models", data.get("models"), "expected a list of {name, model}")
        data["models"] = tuple(
            from_mapping(PaperModel, m, f"{KIND}.models[{i}]") for i, m in enumerate(data["models"])
        )
        data["data"] = from_mapping(PaperData, data.get("data") or {}, f"{KIND}.data")
        return from_mapping(cls, data, KIND)

    def for_quick(self) -> PaperSpec:
        """The spec as ``--quick`` runs it."""
        changes = dict(self.quick)
        if "correlations" in changes:
            changes["correlations"] = tuple(changes["correlations"])
        return dataclasses.replace(self, **changes)

    def cells(self) -> list[tuple[PaperModel, float]]:
        """Every (model, correlation), model-major."""
        return [(m, c) for m in self.models for c in self.correlations]


def is_paper_spec(path: Path) -> bool:
    """Whether the YAML file at ``path`` is a ``kind: paper_synthetic`` spec."""
    with open(path) as fh:
        data = yaml.safe_load(fh)
    return isinstance(data, dict) and data.get("kind") == KIND


def load_paper_spec(path: Path) -> PaperSpec:
    """Loads a ``kind: paper_synthetic`` spec."""
    with open(path) as fh:
        return PaperSpec.from_dict(yaml.safe_load(fh))


@dataclass
class CellResult:
    """One (model, correlation) cell: every run at every learning rate.

    Attributes:
        model, correlation: the cell.
        lrs: ``(K,)`` each model's learning rate (K = runs x learning rates, learning-rate-major).
        runs: ``(K,)`` each model's run index.
        steps: ``(n,)`` curve steps; valid, train: ``(n, K, T)`` curve losses.
        test: ``(K, T)`` final test loss per task.
        parameters: the model's parameter count.
        label_correlation: mean Pearson correlation of the two labels over the runs' training data.
        seconds: training time of the cell.
    """

    model: str
    correlation: float
    lrs: np.ndarray
    runs: np.ndarray
    steps: np.ndarray
    valid: np.ndarray
    train: np.ndarray
    test: np.ndarray
    parameters: int
    label_correlation: float
    seconds: float

    @property
    def chosen_lr(self) -> float:
        """The learning rate with the lowest mean final validation loss (mean over runs and tasks)."""
        return min(np.unique(self.lrs), key=self.lr_valid_loss)

    def lr_valid_loss(self, lr: float) -> float:
        """Mean final validation loss of the runs at ``lr``."""
        return float(self.valid[-1][self.lrs == lr].mean())

    def chosen(self, what: str = "test") -> np.ndarray:
        """``(runs, T)`` the final test (or ``valid``) loss of each run at the chosen learning rate."""
        mask = self.lrs == self.chosen_lr
        order = np.argsort(self.runs[mask])
        values = self.test if what == "test" else self.valid[-1]
        return values[mask][order]

    def losses(self) -> np.ndarray:
        """``(runs,)`` each run's final test loss at the chosen rate, the mean of the two tasks."""
        return self.chosen().mean(axis=1)

    def save(self, path: Path, key: str) -> None:
        """Writes the cell with the key of its settings (see :meth:`load`)."""
        buffer = io.BytesIO()
        np.savez(buffer, key=key, **{k: np.asarray(v) for k, v in dataclasses.asdict(self).items()})
        atomic_write(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path, key: str) -> CellResult | None:
        """The saved cell if its key matches (the same spec settings), else None."""
        if not path.exists():
            return None
        with np.load(path) as saved:
            if str(saved["key"]) != key:
                return None
            values = {f.name: saved[f.name] for f in dataclasses.fields(cls)}
        for name in ("model",):
            values[name] = str(values[name])
        for name in ("correlation", "label_correlation", "seconds"):
            values[name] = float(values[name])
        values["parameters"] = int(values["parameters"])
        return cls(**values)


def _cell_key(spec: PaperSpec, model: PaperModel, correlation: float) -> str:
    """What a cell's result depends on."""
    settings = dataclasses.asdict(spec)
    for name in ("name", "description", "models", "correlations", "experiment", "quick"):
        settings.pop(name)
    return digest({"settings": settings, "model": dataclasses.asdict(model), "correlation": correlation})


def train_cell(spec: PaperSpec, model: PaperModel, correlation: float) -> CellResult:
    """Trains every run of a cell at every learning rate, all at once, on one thread."""
    import torch

    from recsys.train.stacked import StackedRuns

    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = spec.train_rows + spec.valid_rows + spec.test_rows
    xs, ys, corr = [], [], []
    for run in range(spec.runs):
        x, y = spec.data.generate(correlation, spec.data_seed + run, rows=rows)
        xs.append(x)
        ys.append(y)
        corr.append(np.corrcoef(y[: spec.train_rows, 0], y[: spec.train_rows, 1])[0, 1])
    n_lr = len(spec.learning_rates)
    x_all = np.concatenate([np.stack(xs)] * n_lr)  # (K, rows, D), learning-rate-major
    y_all = np.concatenate([np.stack(ys)] * n_lr)
    del xs, ys
    runs = np.tile(np.arange(spec.runs), n_lr)
    lrs = np.repeat(np.array(spec.learning_rates), spec.runs)
    a, b = spec.train_rows, spec.train_rows + spec.valid_rows
    stacked = StackedRuns(model.config(), spec.data.dim, seeds=[int(r) for r in runs], lrs=lrs.tolist())
    bar = _task_bar(f"{model.name} p={correlation:g}", spec.epochs * (spec.train_rows // spec.batch_size))
    curve = stacked.fit(
        x_all[:, :a],
        y_all[:, :a],
        x_all[:, a:b],
        y_all[:, a:b],
        batch_size=spec.batch_size,
        epochs=spec.epochs,
        evals_per_epoch=spec.evals_per_epoch,
        shuffle_seed=spec.data_seed,
        progress=bar.update if bar is not None else None,
    )
    if bar is not None:
        bar.close()
    test = stacked.evaluate(x_all[:, b:], y_all[:, b:])
    return CellResult(
        model.name,
        correlation,
        lrs,
        runs,
        curve.steps,
        curve.valid,
        curve.train,
        test,
        stacked.num_parameters,
        float(np.mean(corr)),
        time.perf_counter() - started,
    )


def _task_bar(desc: str, total: int) -> Any:
    """A progress bar drawn by the driver when running in a Ray task; None otherwise."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray.experimental.tqdm_ray import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(desc=desc, total=total, unit="step")


@dataclass
class PaperResult:
    """What :func:`run_paper_experiment` produced."""

    out: Path
    parent_run_id: str | None
    cells: list[CellResult]
    findings: list[str]
    markdown: str
    files: dict[str, Path]
    seconds: float


def run_paper_experiment(
    spec: PaperSpec,
    out: Path,
    *,
    tracking_uri: str | None = None,
    quick: bool = False,
    fresh: bool = False,
    command: str = "",
    publish: Path | None = None,
) -> PaperResult:
    """Runs the grid (see the module docstring) and writes the report into ``out``."""
    import ray

    from recsys.experiments.runner import _publish
    from recsys.runtime import init_ray
    from recsys.tracking import Tracker, sqlite_tracking_uri

    started = time.perf_counter()
    if quick:
        spec = spec.for_quick()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cells = spec.cells()
    console.story(
        f"experiment {spec.name}: {len(cells)} cells x {len(spec.learning_rates)} learning rates x "
        f"{spec.runs} runs = {len(cells) * len(spec.learning_rates) * spec.runs} trainings"
    )
    results: dict[int, CellResult] = {}
    pending = {}
    for i, (model, correlation) in enumerate(cells):
        path, key = out / "runs" / f"{model.name}_p{correlation:g}.npz", _cell_key(spec, model, correlation)
        saved = None if fresh else CellResult.load(path, key)
        if saved is not None:
            console.story(f"{model.name} p={correlation:g}: reused ({path})")
            results[i] = saved
        else:
            pending[i] = (path, key)
    if pending:
        started_ray = init_ray("training", num_cpus=os.cpu_count())
        try:
            remote = ray.remote(num_cpus=1)(train_cell)
            refs = {remote.remote(spec, *cells[i]): i for i in pending}
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                i = refs.pop(done[0])
                cell = ray.get(done[0])
                cell.save(*pending[i])
                results[i] = cell
                console.story(
                    f"{cell.model} p={cell.correlation:g}: {cell.seconds:.0f} s, lr {cell.chosen_lr:g}, "
                    f"test loss {cell.losses().mean():.4f} ± {cell.losses().std(ddof=1):.4f}"
                )
        finally:
            if started_ray:
                ray.shutdown()
    ordered = [results[i] for i in range(len(cells))]
    uri = tracking_uri or sqlite_tracking_uri(out)
    tracker, children = Tracker(uri, spec.experiment), Tracker(uri, spec.experiment)
    status = "FAILED"
    parent = None
    try:
        parent = tracker.start_run(
            run_name=f"{spec.name}{'-quick' if quick else ''}", tags={"experiment.kind": KIND}
        )
        tracker.log_dict(dataclasses.asdict(spec), "spec.json")
        for cell in ordered:
            _log_cell(children, spec, cell, parent)
        found = findings(spec, ordered)
        minutes = (time.perf_counter() - started) / 60
        markdown = results_markdown(spec, ordered, found, command, minutes)
        files = write_paper_report(out, spec, ordered, markdown)
        for path in files.values():
            tracker.log_artifact(path, "results")
        if publish is not None:
            _publish(files, publish)
        status = "FINISHED"
    finally:
        tracker.end_run(status)
    return PaperResult(out, parent, ordered, found, markdown, files, time.perf_counter() - started)


def _log_cell(tracker: Any, spec: PaperSpec, cell: CellResult, parent: str | None) -> None:
    """A child run per cell: its settings, final losses per learning rate, and the chosen rate's curve."""
    tracker.start_run(
        run_name=f"{cell.model}-p{cell.correlation:g}",
        tags={"mlflow.parentRunId": parent or "", "experiment.model": cell.model},
    )
    tracker.log_params(
        {
            "model": cell.model,
            "correlation": cell.correlation,
            "chosen_lr": cell.chosen_lr,
            "runs": spec.runs,
            "parameters": cell.parameters,
            "epochs": spec.epochs,
            "batch_size": spec.batch_size,
        }
    )
    test = cell.chosen()
    metrics = {
        "test_loss_mean": float(cell.losses().mean()),
        "test_loss_std": float(cell.losses().std(ddof=1)),
        "label_correlation": cell.label_correlation,
    }
    for t, task in enumerate(("y1", "y2")):
        metrics[f"test_{task}_loss_mean"] = float(test[:, t].mean())
    for lr in np.unique(cell.lrs):
        metrics[f"valid_loss_lr_{lr:g}"] = cell.lr_valid_loss(lr)
    tracker.log_metrics(metrics)
    mask = cell.lrs == cell.chosen_lr
    for s, step in enumerate(cell.steps):
        tracker.log_metrics({"valid_loss": float(cell.valid[s][mask].mean())}, step=int(step))
    tracker.end_run("FINISHED")


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


def _figure_curves(spec: PaperSpec, cells: Sequence[CellResult]) -> Any:
    from recsys.report import new_figure

    by = _by(cells)
    n = len(spec.correlations)
    fig = new_figure(figsize=(4 * n, 3.5))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, c in zip(axes, spec.correlations, strict=True):
        for m in spec.models:
            cell = by[m.name, c]
            mask = cell.lrs == cell.chosen_lr
            ax.plot(cell.steps[1:], cell.valid[1:, mask].mean(axis=(1, 2)), label=m.name)
        ax.set_title(f"correlation {c:g}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0].set_ylabel("validation loss (mean over runs)")
    axes[0].legend()
    fig.suptitle("Loss curves at each cell's chosen learning rate (paper fig. 5)")
    fig.tight_layout()
    return fig


def _figure_trainability(spec: PaperSpec, cells: Sequence[CellResult]) -> Any:
    from recsys.report import new_figure

    by = _by(cells)
    n = len(spec.correlations)
    fig = new_figure(figsize=(4 * n, 3.5))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, c in zip(axes, spec.correlations, strict=True):
        values = [by[m.name, c].losses() for m in spec.models]
        bins = np.linspace(min(v.min() for v in values), max(v.max() for v in values), 16)
        for m, v in zip(spec.models, values, strict=True):
            ax.hist(v, bins=bins, alpha=0.5, label=m.name)
        ax.set_title(f"correlation {c:g}")
        ax.set_xlabel("final test loss")
    axes[0].set_ylabel("runs")
    axes[0].legend()
    fig.suptitle("Final losses over runs: trainability (paper fig. 6)")
    fig.tight_layout()
    return fig


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
