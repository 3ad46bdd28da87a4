"""Hyperparameter search with Ray Tune: ASHA early stopping over full training runs, tracked in MLflow.

A :class:`SearchSpec` (YAML, e.g. ``recsys/experiments/specs/search_mmoe.yaml``) maps dotted paths of a train config
(``training.dense_lr``, ``model.arch.num_experts``, ...) to distributions. :func:`run_search`

1. opens an MLflow parent run for the search;
2. runs ``num_samples`` Tune trials. Each trial is a function trainable that calls
   :func:`recsys.train.loop.run_training` (the same code path as ``python -m pipelines.train``) with Ray Tune's
   ``TuneReportCallback``: every epoch's Ray Train report (``valid_main_metric``, this epoch's main
   validation metric) reaches Tune, and the ASHA scheduler stops the trials that fall behind at each rung;
3. every trial is its own MLflow child run (tag ``mlflow.parentRunId``); a trial that ASHA stopped never
   reaches the end of training, so its run is closed afterwards as ``KILLED``, tagged ``tune.stopped_early``;
4. writes the best trial's config as a YAML train config (``best.yaml``, ready for ``pipelines.train``)
   and a table of the trials, into the output folder and to the parent run.

Ray: the embedded local Ray (started here with enough logical CPUs for the concurrent trials, their
Ray Train workers and Ray Data's read tasks), or the cluster that ``RAY_ADDRESS`` names (then ``out`` and
the features must be on storage every node sees).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray.tune.integration.ray_train import TuneReportCallback

from features.config import invalid
from recsys.experiments.runner import atomic_write
from recsys.runtime import embedded_ray_env

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")
METRIC = "valid_main_metric"  # what recsys.train.loop reports to Ray Train at the end of every epoch


@dataclass(frozen=True)
class Distribution:
    """A search dimension.

    Attributes:
        kind: ``loguniform`` or ``uniform`` (``[low, high]``), ``randint`` (``[low, high)``) or ``choice``
            (a list of values, which may be lists themselves, e.g. layer sizes).
        values: the bounds, or the choices.
    """

    kind: str
    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        where = "search.space"
        if self.kind not in DISTRIBUTIONS:
            raise invalid(where, "kind", self.kind, f"expected one of {list(DISTRIBUTIONS)}")
        if not self.values:
            raise invalid(where, self.kind, list(self.values), "expected values")
        if self.kind != "choice":
            if len(self.values) != 2 or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in self.values
            ):
                raise invalid(where, self.kind, list(self.values), "expected [low, high]")
            low, high = self.values
            if not low < high or (self.kind == "loguniform" and low <= 0):
                raise invalid(where, self.kind, list(self.values), "expected 0 < low < high for loguniform")

    @classmethod
    def from_yaml(cls, path: str, data: Any) -> Distribution:
        """``{loguniform: [1e-4, 1e-2]}``, ``{choice: [4, 8]}``, ...; a bare list means ``choice``."""
        if isinstance(data, list):
            return cls("choice", tuple(data))
        if not isinstance(data, dict) or len(data) != 1:
            raise invalid("search.space", path, data, "expected {kind: values}, e.g. {choice: [4, 8]}")
        ((kind, values),) = data.items()
        if not isinstance(values, list):
            raise invalid("search.space", path, data, "expected a list of values")
        return cls(kind, tuple(values))

    def to_tune(self) -> Any:
        """The Ray Tune search domain."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        return {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[self.kind](
            low, high
        )


@dataclass(frozen=True)
class SearchSpec:
    """A hyperparameter search.

    Attributes:
        space: dotted path in the train config (``training.dense_lr``) -> distribution.
        num_samples: trials.
        max_concurrent_trials: trials at once (each takes ``run.num_workers`` Ray Train workers); two
            at once on a 2-core machine have left both trials waiting on Ray Data reads (see README).
        grace_period: ASHA: epochs every trial gets before it can be stopped.
        reduction_factor: ASHA: 1 in this many trials goes on at each rung.
        seed: the random search's seed.
        name: the search's name (folders, the MLflow parent run).
    """

    space: dict[str, Distribution]
    num_samples: int = 8
    max_concurrent_trials: int = 1
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0
    name: str = "search"

    def __post_init__(self) -> None:
        w = "search"
        if not self.space:
            raise invalid(w, "space", self.space, "expected at least one dimension")
        for name, low in (
            ("num_samples", 1),
            ("max_concurrent_trials", 1),
            ("grace_period", 1),
            ("reduction_factor", 2),
            ("seed", 0),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise invalid(w, name, value, f"expected an integer >= {low}")
        for path in self.space:
            if not path.startswith(("model.", "training.")):
                raise invalid(w, "space", path, "expected paths under 'model.' or 'training.'")

    @classmethod
    def from_dict(cls, data: Any) -> SearchSpec:
        """Builds a spec from plain data (as loaded from YAML)."""
        if not isinstance(data, dict):
            raise ValueError(f"search: expected a mapping, got {data!r}")
        data = dict(data)
        space = data.get("space")
        if not isinstance(space, dict):
            raise invalid("search", "space", space, "expected a mapping of dotted paths to distributions")
        data["space"] = {path: Distribution.from_yaml(path, d) for path, d in space.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"search: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpec:
        """Loads and validates a YAML search spec."""
        with open(path) as fh:
            return cls.from_dict(yaml.safe_load(fh))


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """``base`` (a train config as plain data) with the dotted-path values of ``params`` set.

    Raises:
        ValueError: a path that does not name a field of the config (a typo would search nothing).

    Example:
        >>> apply_params({"training": {"dense_lr": 0.001}}, {"training.dense_lr": 0.01})
        {'training': {'dense_lr': 0.01}}
    """
    out = copy.deepcopy(base)
    for path, value in params.items():
        node = out
        *parents, leaf = path.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise invalid("search", "space", path, "expected a path of the train config")
            node = node[key]
        if leaf not in node:
            raise invalid("search", "space", path, "expected a field of the train config")
        node[leaf] = value
    return out


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

    from recsys.train.config import TrainConfig
    from recsys.train.loop import run_training

    trial_id = ray.tune.get_context().get_trial_id()
    config = TrainConfig.from_dict(apply_params(base, params)).replace(
        run={
            "name": f"trial-{trial_id}",
            "storage_path": storage,
            "parent_run_id": parent_run_id,
            "tags": {"tune.trial_id": trial_id},
        }
    )
    result = run_training(
        config, tracking_uri=tracking_uri, callbacks=[EpochReportCallback(config.training.epochs)]
    )
    final = result.summary.get("final_valid_main_metric")  # the kept epoch's (the best one's)
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


def _init_ray(config: Any, search: SearchSpec) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # Each running trial holds 1 CPU (the trial function) plus its Ray Train workers, and with
    # ``training.ingest: ray_data`` its Ray Data read tasks need 2 more logical CPUs; with 2 spare CPUs for
    # all trials together, a trial's reads waited past Ray Data's no-progress timeout on a loaded machine
    # (see recsys.train.loop.run_training). Logical CPUs only: the default ingest reads in the workers.
    per_trial = 1 + config.run.num_workers * config.run.cpus_per_worker + 2
    num_cpus = None if address else max(os.cpu_count() or 1, search.max_concurrent_trials * per_trial)
    if not address:
        embedded_ray_env()  # trials' workers at the normal priority, not nice 15
    # The dashboard serves the State API, through which Ray Train's PlacementGroupCleaner sees that the
    # controller of a trial ASHA stopped is gone and frees its workers' CPUs; without it, every stopped
    # trial leaked a placement group, and after two the next trial's Ray Data reads waited forever.
    ray.init(address=address, num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")


def _close_stopped_run(tracking_uri: str, experiment: str, run_dir: Path, failed: bool) -> str | None:
    """Closes the MLflow run of a trial that never finished; returns the run's id.

    ``KILLED`` and tagged ``tune.stopped_early`` when ASHA stopped it, ``FAILED`` when it failed.
    """
    from recsys.tracking import Tracker

    state = run_dir / "tracking.json"
    if not state.exists():
        return None
    run_id = json.loads(state.read_text()).get("run_id")
    if run_id and not (run_dir / "result.json").exists():
        tracker = Tracker(tracking_uri, experiment)
        tracker.start_run(run_id=run_id, tags={} if failed else {"tune.stopped_early": "true"})
        tracker.end_run("FAILED" if failed else "KILLED")
    return run_id


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
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from recsys.tracking import Tracker
    from recsys.train.config import TrainConfig

    started = time.perf_counter()
    if num_samples is not None:
        search = dataclasses.replace(search, num_samples=num_samples)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    # Trial reports must all carry the metric: no mid-epoch checkpoint reports.
    config = config.replace(
        features=str(Path(config.features).resolve()),
        truth=str(Path(config.truth).resolve()) if config.truth else "",
        training={"checkpoint_every_steps": 0},
    )
    base = config.to_dict()
    apply_params(base, {path: None for path in search.space})  # fails early on a path that is no field
    experiment = config.run.experiment
    tracker = Tracker(tracking_uri, experiment)
    parent = tracker.start_run(run_name=search.name, tags={"tune.search": search.name})
    status = "FAILED"
    try:
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
        _init_ray(config, search)
        storage = out / "ray"
        trainable = tune.with_parameters(
            _trial, base=base, tracking_uri=tracking_uri, parent_run_id=parent or "", storage=str(storage)
        )
        tuner = tune.Tuner(
            trainable,
            param_space={path: d.to_tune() for path, d in search.space.items()},
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                num_samples=search.num_samples,
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=config.training.epochs,
                    grace_period=search.grace_period,
                    reduction_factor=search.reduction_factor,
                ),
                # The generator itself caps the trials at once: Tune ignores TuneConfig's cap for a
                # generator given explicitly (needed here for the seed).
                search_alg=BasicVariantGenerator(
                    random_state=search.seed, max_concurrent=search.max_concurrent_trials
                ),
            ),
            run_config=tune.RunConfig(name=search.name, storage_path=str(out / "tune"), verbose=1),
        )
        grid = tuner.fit()
        trials = []
        for result in grid:
            metrics = result.metrics or {}
            trial_id = metrics.get("trial_id") or Path(result.path).name
            history = result.metrics_dataframe
            values = (
                [v for v in history[METRIC].tolist() if v == v]
                if history is not None and METRIC in history
                else []
            )
            epochs = int(metrics.get("training_iteration", len(values)))
            if result.error is not None:
                state = "error"
            elif epochs < config.training.epochs:
                state = "stopped early"
            else:
                state = "completed"
            run_id = _close_stopped_run(
                tracking_uri, experiment, storage / f"trial-{trial_id}", failed=state == "error"
            )
            trials.append(
                TrialRecord(
                    trial_id=trial_id,
                    params=dict(result.config or {}),
                    epochs=epochs,
                    last=float(values[-1]) if values else math.nan,
                    best=float(max(values)) if values else math.nan,
                    status=state,
                    mlflow_run_id=run_id,
                )
            )
        scored = [t for t in trials if math.isfinite(t.best)]
        if not scored:
            raise RuntimeError(f"search {search.name}: no trial reported {METRIC}; see {out / 'tune'}")
        best = max(scored, key=lambda t: t.best)
        best_config = TrainConfig.from_dict(apply_params(base, best.params)).replace(
            run={"name": "", "parent_run_id": "", "tags": {}}
        )
        best_path = out / "best.yaml"
        header = (
            f"# Best of {len(trials)} trials of search {search.name!r} (trial {best.trial_id}, "
            f"valid {config.training.main_metric} {best.best:.4f}); train it with\n"
            f"#   python -m pipelines.train --config {best_path}\n"
        )
        atomic_write(best_path, header + yaml.safe_dump(_plain(best_config.to_dict()), sort_keys=False))
        table = out / "trials.csv"
        names = list(search.space)
        lines = ["trial_id,status,epochs,last,best,mlflow_run_id," + ",".join(names)]
        for t in trials:
            values = ",".join(json.dumps(t.params.get(n)).replace(",", ";") for n in names)
            lines.append(
                f"{t.trial_id},{t.status},{t.epochs},{t.last:.6f},{t.best:.6f},{t.mlflow_run_id},{values}"
            )
        atomic_write(table, "\n".join(lines) + "\n")
        tracker.log_artifact(best_path, "search")
        tracker.log_artifact(table, "search")
        tracker.log_metrics(
            {
                f"best/{config.training.main_metric}": best.best,
                "trials": len(trials),
                "trials_stopped_early": sum(t.status == "stopped early" for t in trials),
            }
        )
        tracker.log_params({"best_trial": best.trial_id})
        status = "FINISHED"
    finally:
        tracker.end_run(status)
    return SearchResult(
        best_config, best_path, best.trial_id, best.best, trials, parent, time.perf_counter() - started
    )
