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
import os
import time
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
        values["model"] = str(values["model"])
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
    x_all, y_all = (
        np.stack(xs),
        np.stack(ys),
    )  # (runs, rows, D): run r's data, read by its model at every rate
    del xs, ys
    runs = np.tile(np.arange(spec.runs), n_lr)  # models learning-rate-major
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
        data_of=runs,
    )
    if bar is not None:
        bar.close()
    test = stacked.evaluate(x_all[:, b:], y_all[:, b:], data_of=runs)
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
    """Runs the grid (see the module docstring) and writes the report into ``out``.

    Args:
        spec: the experiment.
        out: the results folder (``runs/`` keeps each finished cell, the MLflow store by default).
        tracking_uri: MLflow tracking URI (default: ``sqlite:///OUT/mlflow.db``).
        quick: ``spec.quick``'s small settings, for smoke tests.
        fresh: train every cell again instead of reusing finished ones.
        command: the command line, written into the report.
        publish: also copy the report (not the records) into this folder.
    """
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
    results = _train_cells(spec, out, fresh)
    return _report(spec, out, results, tracking_uri, quick, command, publish, started)


def _train_cells(spec: PaperSpec, out: Path, fresh: bool) -> list[CellResult]:
    """Every cell: reused from ``OUT/runs`` (unless ``fresh``), else trained as a Ray task on one CPU."""
    import ray

    from recsys.runtime import init_ray

    cells = spec.cells()
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
    return [results[i] for i in range(len(cells))]


def _report(
    spec: PaperSpec,
    out: Path,
    cells: list[CellResult],
    tracking_uri: str | None,
    quick: bool,
    command: str,
    publish: Path | None,
    started: float,
) -> PaperResult:
    """The MLflow parent run with a child per cell, and the report (written, logged, published)."""
    from recsys.experiments.paper_report import findings, results_markdown, write_paper_report
    from recsys.experiments.runner import _publish
    from recsys.tracking import Tracker, sqlite_tracking_uri

    uri = tracking_uri or sqlite_tracking_uri(out)
    tracker, children = Tracker(uri, spec.experiment), Tracker(uri, spec.experiment)
    status = "FAILED"
    parent = None
    try:
        parent = tracker.start_run(
            run_name=f"{spec.name}{'-quick' if quick else ''}", tags={"experiment.kind": KIND}
        )
        tracker.log_dict(dataclasses.asdict(spec), "spec.json")
        for cell in cells:
            _log_cell(children, spec, cell, parent)
        found = findings(spec, cells)
        minutes = (time.perf_counter() - started) / 60
        markdown = results_markdown(spec, cells, found, command, minutes)
        files = write_paper_report(out, spec, cells, markdown)
        for path in files.values():
            tracker.log_artifact(path, "results")
        if publish is not None:
            _publish(files, publish)
        status = "FINISHED"
    finally:
        tracker.end_run(status)
    return PaperResult(out, parent, cells, found, markdown, files, time.perf_counter() - started)


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
