"""Hyperparameter search with Ray Tune: ASHA early stopping over full training runs, tracked in MLflow.

:func:`run_search`, over a :class:`~recsys.experiments.search_spec.SearchSpec`,

1. opens an MLflow parent run for the search;
2. runs ``num_samples`` Tune trials. Each trial is a function trainable that trains through
   :mod:`recsys.experiments.training` (the same code path as ``python -m pipelines.train``) with Ray Tune's
   ``TuneReportCallback``: every epoch's Ray Train report (``valid_main_metric``, this epoch's main
   validation metric) reaches Tune, and the ASHA scheduler stops the trials that fall behind at each rung;
3. every trial is its own MLflow child run (tag ``mlflow.parentRunId``); a trial that ASHA stopped never
   reaches the end of training, so its run is closed afterwards as ``KILLED``, tagged ``tune.stopped_early``;
4. writes the best trial's config as a YAML train config (``best.yaml``, ready for ``pipelines.train``)
   and a table of the trials, into the output folder and to the parent run.

Ray: the embedded local Ray (started by :func:`recsys.runtime.init_ray` with enough logical CPUs for the
concurrent trials, their Ray Train workers and Ray Data's read tasks), or the cluster that ``RAY_ADDRESS``
names (then ``out`` and the features must be on storage every node sees).

Example:
    >>> result = run_search(config, load_search("search_mmoe"), Path("artifacts/tune"))  # doctest: +SKIP
    >>> result.best_path  # doctest: +SKIP
    PosixPath('artifacts/tune/best.yaml')
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray.tune.integration.ray_train import TuneReportCallback

from features import console
from features.files import atomic_write
from recsys.experiments.search_spec import SearchSpec, apply_params
from recsys.tracking import RunStatus, Tracker, child_runs, sqlite_tracking_uri

METRIC = "valid_main_metric"  # what the training loop reports to Ray Train at the end of every epoch


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (YAML writes plain lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class EpochReportCallback(TuneReportCallback):
    """Passes every epoch's Ray Train report on to Tune, but the last epoch's.

    The scheduler stops a trial when it reaches ``max_t`` (the last epoch), which would kill the trial while
    it still tests, packages and registers its model; the trial function reports the last epoch itself once
    training has returned.

    Args:
        epochs: the run's epochs.
    """

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        """Forwards rank 0's report unless it is the last epoch's."""
        if metrics and metrics[0].get("epoch") == self.epochs - 1:
            return
        super().after_report(run_context, metrics, checkpoint)


def _trial(
    params: dict[str, Any], *, base: dict[str, Any], tracking_uri: str, parent_run_id: str, storage: str
) -> None:
    """One Tune trial: a full training run whose epoch reports reach Tune (see the module docstring)."""
    import ray.tune

    from recsys.experiments.training import train
    from recsys.train.config import TrainConfig

    trial_id = ray.tune.get_context().get_trial_id()
    config = TrainConfig.from_dict(apply_params(base, params)).replace(
        run={
            "name": f"trial-{trial_id}",
            "storage_path": storage,
            "parent_run_id": parent_run_id,
            "tags": {"tune.trial_id": trial_id},
        }
    )
    console.story(f"trial {trial_id}: training {params}")
    trained = train(
        config, tracking_uri=tracking_uri, callbacks=[EpochReportCallback(config.training.epochs)]
    )
    final = trained.final_valid_main_metric  # the kept epoch's (the best one's)
    ray.tune.report({METRIC: final if final is not None else math.nan, "epoch": config.training.epochs - 1})


@dataclass
class TrialRecord:
    """One trial of the search."""

    trial_id: str
    params: dict[str, Any]
    epochs: int
    last: float
    best: float
    status: str  # completed, stopped early, error
    mlflow_run_id: str | None


@dataclass
class SearchResult:
    """What :func:`run_search` produced."""

    best_config: Any  # TrainConfig
    best_path: Path
    best_trial: str
    best_metric: float
    trials: list[TrialRecord] = field(default_factory=list)
    parent_run_id: str | None = None
    seconds: float = 0.0

    @property
    def stopped_early(self) -> int:
        """Trials that ASHA stopped before their last epoch."""
        return sum(t.status == "stopped early" for t in self.trials)


def _start_ray(config: Any, search: SearchSpec) -> None:
    """Starts the embedded Ray (or connects to ``RAY_ADDRESS``) with CPUs for the concurrent trials.

    Each running trial holds 1 CPU (the trial function) plus its Ray Train workers, and with
    ``training.ingest: ray_data`` its Ray Data read tasks need 2 more logical CPUs; with 2 spare CPUs for
    all trials together, a trial's reads waited past Ray Data's no-progress timeout on a loaded machine.
    Logical CPUs only: the default ingest reads in the workers. Tuning starts Ray's dashboard, whose State
    API lets Ray Train free the CPUs of the trials ASHA stopped.
    """
    from recsys.runtime import init_ray

    per_trial = 1 + config.run.max_workers * config.run.cpus_per_worker + 2
    init_ray("tuning", num_cpus=max(os.cpu_count() or 1, search.max_concurrent_trials * per_trial))


def _trial_runs(tracking_uri: str, parent: str | None) -> dict[str, RunStatus]:
    """The MLflow runs of the search's trials, by trial id (tag ``tune.trial_id``)."""
    if parent is None:
        return {}
    return {
        run.tags["tune.trial_id"]: run
        for run in child_runs(tracking_uri, parent)
        if "tune.trial_id" in run.tags
    }


def _with_run(trial: TrialRecord, run: RunStatus | None, tracking_uri: str, experiment: str) -> TrialRecord:
    """The trial with its MLflow run's id; the run of a trial that did not complete is closed.

    ASHA stops a trial by ending its process, before its run is ended: such a run ends as ``KILLED``,
    tagged ``tune.stopped_early``; the run of a trial that failed ends as ``FAILED``.
    """
    if run is None:
        return trial
    if trial.status != "completed":
        failed = trial.status == "error"
        tracker = Tracker(tracking_uri, experiment)
        tracker.start_run(run_id=run.run_id, tags={} if failed else {"tune.stopped_early": "true"})
        tracker.end_run("FAILED" if failed else "KILLED")
    return dataclasses.replace(trial, mlflow_run_id=run.run_id)


def _prepared(config: Any, search: SearchSpec) -> tuple[Any, dict[str, Any]]:
    """The base config with absolute data paths and without mid-epoch checkpoints, and its plain data.

    Trial reports must all carry the metric: no mid-epoch checkpoint reports. A search path that names
    no field of the config fails here, before any trial starts.
    """
    config = config.replace(
        features=str(Path(config.features).resolve()),
        truth=str(Path(config.truth).resolve()) if config.truth else "",
        training={"checkpoint_every_steps": 0},
    )
    base = config.to_dict()
    apply_params(base, dict.fromkeys(search.space))
    return config, base


def _open_parent(tracker: Tracker, config: Any, search: SearchSpec) -> str | None:
    """Starts the search's parent run and logs the space and the scheduler's settings."""
    parent = tracker.start_run(run_name=search.name, tags={"tune.search": search.name})
    tracker.log_params(
        {
            "space": {p: f"{d.kind}{list(d.values)}" for p, d in search.space.items()},
            "num_samples": search.num_samples,
            "max_concurrent_trials": search.max_concurrent_trials,
            "asha": {
                "max_t": config.training.epochs,
                "grace_period": search.grace_period,
                "reduction_factor": search.reduction_factor,
            },
            "main_metric": config.training.main_metric,
        }
    )
    return parent


def _tuner(config: Any, search: SearchSpec, trainable: Any, out: Path) -> Any:
    """The Tune run: random search over the space, ASHA over the epochs."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=config.training.epochs,
        grace_period=search.grace_period,
        reduction_factor=search.reduction_factor,
    )
    # The generator itself caps the trials at once: Tune ignores TuneConfig's cap for a generator given
    # explicitly (needed here for the seed).
    generator = BasicVariantGenerator(random_state=search.seed, max_concurrent=search.max_concurrent_trials)
    return tune.Tuner(
        trainable,
        param_space={path: d.to_tune() for path, d in search.space.items()},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            num_samples=search.num_samples,
            scheduler=scheduler,
            search_alg=generator,
        ),
        run_config=tune.RunConfig(name=search.name, storage_path=str(out / "tune"), verbose=1),
    )


def _trial_record(result: Any, epochs: int) -> TrialRecord:
    """A finished trial's record from Tune's result (its MLflow run: :func:`_with_run`)."""
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id") or Path(result.path).name
    history = result.metrics_dataframe
    values = (
        [v for v in history[METRIC].tolist() if v == v] if history is not None and METRIC in history else []
    )
    ran = int(metrics.get("training_iteration", len(values)))
    status = "completed" if ran >= epochs else "stopped early"
    if result.error is not None:
        status = "error"
    return TrialRecord(
        trial_id=trial_id,
        params=dict(result.config or {}),
        epochs=ran,
        last=float(values[-1]) if values else math.nan,
        best=float(max(values)) if values else math.nan,
        status=status,
        mlflow_run_id=None,
    )


def _write_best(
    best: TrialRecord, trials: int, base: dict[str, Any], config: Any, search: SearchSpec, out: Path
) -> Any:
    """Writes the best of ``trials`` trials' train config to ``out/best.yaml``; returns the config."""
    from recsys.train.config import TrainConfig

    best_config = TrainConfig.from_dict(apply_params(base, best.params)).replace(
        run={"name": "", "parent_run_id": "", "tags": {}}
    )
    header = (
        f"# Best of {trials} trials of search {search.name!r} (trial {best.trial_id}, "
        f"valid {config.training.main_metric} {best.best:.4f}); train it with\n"
        f"#   python -m pipelines.train --config {out / 'best.yaml'}\n"
    )
    atomic_write(out / "best.yaml", header + yaml.safe_dump(_plain(best_config.to_dict()), sort_keys=False))
    return best_config


def _write_trials(trials: Sequence[TrialRecord], search: SearchSpec, out: Path) -> Path:
    """Writes the table of the trials (``out/trials.csv``): status, epochs, metric and parameters."""
    names = list(search.space)
    lines = ["trial_id,status,epochs,last,best,mlflow_run_id," + ",".join(names)]
    for t in trials:
        values = ",".join(json.dumps(t.params.get(n)).replace(",", ";") for n in names)
        lines.append(
            f"{t.trial_id},{t.status},{t.epochs},{t.last:.6f},{t.best:.6f},{t.mlflow_run_id},{values}"
        )
    atomic_write(out / "trials.csv", "\n".join(lines) + "\n")
    return out / "trials.csv"


def _best_trial(trials: Sequence[TrialRecord], search: SearchSpec, out: Path) -> TrialRecord:
    scored = [t for t in trials if math.isfinite(t.best)]
    if not scored:
        raise RuntimeError(f"search {search.name}: no trial reported {METRIC}; see {out / 'tune'}")
    return max(scored, key=lambda t: t.best)


def _log_outcome(
    tracker: Tracker, config: Any, trials: Sequence[TrialRecord], best: TrialRecord, out: Path
) -> None:
    """Logs best.yaml, trials.csv, the best metric and the trial counts to the parent run."""
    tracker.log_artifact(out / "best.yaml", "search")
    tracker.log_artifact(out / "trials.csv", "search")
    tracker.log_metrics(
        {
            f"best/{config.training.main_metric}": best.best,
            "trials": len(trials),
            "trials_stopped_early": sum(t.status == "stopped early" for t in trials),
        }
    )
    tracker.log_params({"best_trial": best.trial_id})


def _fit(
    config: Any, search: SearchSpec, base: dict[str, Any], tracking_uri: str, parent: str | None, out: Path
) -> list[TrialRecord]:
    """Runs the trials; returns their records, in Tune's order."""
    from ray import tune

    storage = out / "ray"
    trainable = tune.with_parameters(
        _trial, base=base, tracking_uri=tracking_uri, parent_run_id=parent or "", storage=str(storage)
    )
    _start_ray(config, search)
    grid = _tuner(config, search, trainable, out).fit()
    records = [_trial_record(result, config.training.epochs) for result in grid]
    runs = _trial_runs(tracking_uri, parent)
    trials = [_with_run(t, runs.get(t.trial_id), tracking_uri, config.run.experiment) for t in records]
    for t in trials:
        console.story(f"trial {t.trial_id}: {t.status} after {t.epochs} epoch(s), best {t.best:.4f}")
    return trials


def run_search(
    config: Any,
    search: SearchSpec,
    out: Path,
    *,
    tracking_uri: str | None = None,
    num_samples: int | None = None,
) -> SearchResult:
    """Runs the search (see the module docstring).

    Args:
        config: the base :class:`~recsys.train.config.TrainConfig` (its ``training.epochs`` is ASHA's
            ``max_t``, its ``main_metric`` the one compared).
        search: the search space and scheduler settings.
        out: the output folder: ``best.yaml``, ``trials.csv``, Ray Tune's and Ray Train's folders.
        tracking_uri: MLflow tracking URI (default: ``sqlite:///OUT/mlflow.db``).
        num_samples: overrides ``search.num_samples``.

    Returns:
        The best config (also written to ``out/best.yaml``), the trials and the parent run's id.
    """
    started = time.perf_counter()
    if num_samples is not None:
        search = dataclasses.replace(search, num_samples=num_samples)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri or sqlite_tracking_uri(out)
    config, base = _prepared(config, search)
    tracker = Tracker(tracking_uri, config.run.experiment)
    status = "FAILED"
    try:
        parent = _open_parent(tracker, config, search)
        console.story(
            f"search {search.name}: {search.num_samples} trials, ASHA over {config.training.epochs} epochs"
        )
        trials = _fit(config, search, base, tracking_uri, parent, out)
        best = _best_trial(trials, search, out)
        best_config = _write_best(best, len(trials), base, config, search, out)
        _write_trials(trials, search, out)
        _log_outcome(tracker, config, trials, best, out)
        status = "FINISHED"
    finally:
        tracker.end_run(status)
    seconds = time.perf_counter() - started
    return SearchResult(best_config, out / "best.yaml", best.trial_id, best.best, trials, parent, seconds)
