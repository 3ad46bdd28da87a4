"""The grid runner: every run of an experiment (data sets x models x settings x seeds), then its report.

:func:`run_experiment`

1. prepares every data set once (generate, build features), cached under ``OUT/data``
   (:mod:`recsys.experiments.data`);
2. plans the runs, sizing the variants marked ``match_params`` to the reference's dense parameter count
   (:mod:`recsys.experiments.grid`, :mod:`recsys.experiments.matching`);
3. opens one MLflow parent run and trains every cell and seed (:mod:`recsys.experiments.training`, the
   same code path as ``python -m pipelines.train``), each a child run (tag ``mlflow.parentRunId``);
4. writes the results table (mean ± std over seeds), the advantage of every variant over a baseline
   (paired by seed), the findings and the plots into ``OUT`` (:mod:`recsys.experiments.stats`,
   :mod:`recsys.experiments.report`), and logs them to the parent run.

A finished run is kept in ``OUT/runs/<run>.json``; rerunning the command with the same spec reuses it
instead of training again, so an interrupted grid goes on where it stopped.

Example:
    >>> spec = load_spec("gating")  # doctest: +SKIP
    >>> result = run_experiment(spec, Path("artifacts/experiments/gating"), quick=True)  # doctest: +SKIP
    >>> print(result.markdown)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from features import console
from features.files import atomic_write, staged_file
from recsys.experiments.data import digest, prepare_dataset
from recsys.experiments.grid import GridRun, RunRecord, plan_runs, slug
from recsys.experiments.report import Report, machine_line, write_report
from recsys.experiments.spec import ExperimentSpec, check_seeds
from recsys.experiments.stats import Advantage, CellSummary, advantages, findings, record_values, summarize
from recsys.experiments.training import train
from recsys.tracking import Tracker, sqlite_tracking_uri


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` produced."""

    out: Path
    parent_run_id: str | None
    records: list[RunRecord]
    summaries: list[CellSummary]
    advantages: list[Advantage]
    findings: list[str]
    markdown: str
    files: dict[str, Path]
    seconds: float


def select(
    spec: ExperimentSpec, *, quick: bool, seeds: Sequence[int] | None, datasets: Sequence[str] | None
) -> ExperimentSpec:
    """The spec as this call runs it: ``--quick``, other seeds, a subset of the data sets."""
    if quick:
        spec = spec.for_quick()
    if seeds is not None:
        spec = dataclasses.replace(spec, seeds=check_seeds("--seeds", list(seeds)))
    if datasets is not None:
        names = [d.name for d in spec.datasets]
        if not datasets or set(datasets) - set(names):
            raise ValueError(
                f"--datasets: expected names of the spec's data sets {names}, got {list(datasets)}"
            )
        spec = dataclasses.replace(spec, datasets=tuple(d for d in spec.datasets if d.name in datasets))
    return spec


def _open_parent(tracker: Tracker, spec: ExperimentSpec, quick: bool, runs: Sequence[GridRun]) -> str | None:
    """Starts the grid's parent run and logs the grid's shape and the spec."""
    parent = tracker.start_run(
        run_name=f"{spec.name}{'-quick' if quick else ''}",
        tags={"experiment.spec": spec.name, "experiment.quick": str(quick), "experiment.kind": "grid"},
    )
    tracker.log_params(
        {
            "spec": spec.name,
            "quick": quick,
            "seeds": list(spec.seeds),
            "datasets": [d.name for d in spec.datasets],
            "models": [m.name for m in spec.models],
            "settings": [s.name for s in spec.settings],
            "runs": len(runs),
        }
    )
    tracker.log_dict(dataclasses.asdict(spec), "spec.json")
    return parent


def _cache_key(run: GridRun) -> str:
    """The digest of a run's config without what changes between invocations (the parent run, tags)."""
    return digest(run.config.replace(run={"parent_run_id": "", "tags": {}}).to_dict())


def _reused(run: GridRun, cache: Path) -> RunRecord | None:
    """The record of an earlier identical run kept in ``cache``, or None."""
    if not cache.exists():
        return None
    saved = json.loads(cache.read_text())
    if saved.get("config_digest") != _cache_key(run):
        return None
    record = RunRecord.from_dict(saved["record"])
    record.reused = True
    return record


def _train(run: GridRun, spec: ExperimentSpec, parent: str | None, tracking_uri: str) -> RunRecord:
    """Trains one run as a child of the parent run; returns its record."""
    cell = run.cell
    tags = {
        "experiment.spec": spec.name,
        "experiment.dataset": cell.dataset,
        "experiment.model": cell.model,
        "experiment.setting": cell.setting,
        "experiment.seed": str(run.seed),
    }
    config = run.config.replace(run={"parent_run_id": parent or "", "tags": tags})
    trained = train(config, tracking_uri=tracking_uri)
    return RunRecord(
        cell=cell,
        seed=run.seed,
        run_name=config.run.name,
        mlflow_run_id=trained.mlflow_run_id,
        seconds=trained.seconds,
        params=run.params,
        metrics=trained.test_metrics,
        expert_load=trained.expert_load,
        tasks=[t.name for t in config.model.tasks if t.kind == "binary"],
        valid_curve=trained.valid_curve,
    )


def _run_one(
    run: GridRun, spec: ExperimentSpec, out: Path, parent: str | None, tracking_uri: str, fresh: bool
) -> RunRecord:
    """A run's record: reused from ``OUT/runs`` unless ``fresh``, else trained and kept there."""
    name = run.config.run.name
    cache = out / "runs" / f"{name}.json"
    record = None if fresh else _reused(run, cache)
    if record is not None:
        console.story(f"{name}: reused ({cache})")
        return record
    console.story(f"{name}: training ({run.params.dense:,} dense parameters)")
    record = _train(run, spec, parent, tracking_uri)
    atomic_write(cache, json.dumps({"config_digest": _cache_key(run), "record": record.to_dict()}, indent=1))
    values = ", ".join(f"{k}={v:.4f}" for k, v in record_values(record, spec).items())
    console.story(f"{name}: {record.seconds:.0f} s: {values}")
    return record


def _report(spec: ExperimentSpec, records: list[RunRecord], command: str) -> tuple[Report, str]:
    """The statistics of the finished grid, and the report's header line."""
    summaries = summarize(records, spec)
    advs = advantages(records, spec)
    report = Report(records, summaries, advs, findings(spec, summaries, advs))
    minutes = sum(r.seconds for r in records) / 60
    header = (
        f"`{command or 'python -m pipelines.experiment --spec ' + spec.name}`: {len(records)} runs, "
        f"{minutes:.0f} min of training (1 run at a time) on {machine_line()}"
    )
    return report, header


def _publish(files: Mapping[str, Path], folder: Path) -> None:
    """Copies the report (not the records) into ``folder``, each file by a rename."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in [n for n in files if n != "records.json"]:
        with staged_file(folder / name) as tmp:
            shutil.copyfile(files[name], tmp)


def _log_results(tracker: Tracker, files: Mapping[str, Path], summaries: Sequence[CellSummary]) -> None:
    """Logs the report files and every cell's mean values to the parent run."""
    for path in files.values():
        tracker.log_artifact(path, "results")
    for s in summaries:
        for key, value in s.mean.items():
            if math.isfinite(value):
                tracker.log_metrics({slug(f"{s.cell.dataset}.{s.cell.label}.{key}").replace("/", "."): value})


def _plan(spec: ExperimentSpec, out: Path, quick: bool, num_workers: int | None) -> list[GridRun]:
    """Prepares the data sets (cached in ``OUT/data``) and plans every run of the grid."""
    console.story(f"experiment {spec.name}: preparing {len(spec.datasets)} data set(s) in {out / 'data'}")
    max_rows = spec.quick.max_rows if quick else 0
    prepared = {d.name: prepare_dataset(d, out / "data", max_rows) for d in spec.datasets}
    runs = plan_runs(spec, prepared, out / "ray", num_workers)
    console.story(f"experiment {spec.name}: {len(runs)} runs")
    return runs


def _results(
    spec: ExperimentSpec,
    out: Path,
    records: list[RunRecord],
    command: str,
    tracker: Tracker,
    publish: Path | None,
) -> tuple[Report, dict[str, Path]]:
    """Writes the report into ``out`` (and ``publish``) and logs it to the parent run."""
    report, header = _report(spec, records, command)
    files = write_report(spec, out, report, header)
    _log_results(tracker, files, report.summaries)
    if publish is not None:
        _publish(files, publish)
    console.story(f"experiment {spec.name}: results in {files['results.md']}")
    return report, files


def run_experiment(
    spec: ExperimentSpec,
    out: Path,
    *,
    tracking_uri: str | None = None,
    quick: bool = False,
    num_workers: int | None = None,
    fresh: bool = False,
    command: str = "",
    seeds: Sequence[int] | None = None,
    publish: Path | None = None,
    datasets: Sequence[str] | None = None,
) -> ExperimentResult:
    """Runs the grid (see the module docstring) and writes the results into ``out``.

    Args:
        spec: the experiment.
        out: the results folder (``data/``, ``ray/``, ``runs/``, the tables and plots).
        tracking_uri: MLflow tracking URI (default: ``sqlite:///OUT/mlflow.db``).
        quick: tiny data and one seed (``spec.quick``), for smoke tests.
        num_workers: Ray Train workers per run (default: the base config's).
        fresh: train every run again instead of reusing finished ones.
        command: the command line, written into the report.
        seeds: train these seeds instead of the spec's (e.g. one seed for a first look).
        publish: also copy the report (results.md, results.csv and the plots) into this folder, e.g. one
            that is committed (``out`` holds data, checkpoints and the MLflow store, and is not).
        datasets: run these data sets of the spec only (by name).
    """
    started = time.perf_counter()
    spec = select(spec, quick=quick, seeds=seeds, datasets=datasets)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri or sqlite_tracking_uri(out)
    runs = _plan(spec, out, quick, num_workers)
    tracker = Tracker(tracking_uri, runs[0].config.run.experiment)
    status = "FAILED"
    try:
        parent = _open_parent(tracker, spec, quick, runs)
        records = [
            _run_one(run, spec, out, parent, tracking_uri, fresh)
            for run in console.progress(runs, desc=spec.name, unit="run")
        ]
        report, files = _results(spec, out, records, command, tracker, publish)
        status = "FINISHED"
    finally:
        tracker.end_run(status)
    return ExperimentResult(
        out,
        parent,
        records,
        report.summaries,
        report.advantages,
        report.findings,
        report.markdown,
        files,
        time.perf_counter() - started,
    )
