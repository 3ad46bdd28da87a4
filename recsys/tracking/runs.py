"""Reading runs back from MLflow: metric histories, test predictions, expert load per epoch, the latest run.

For notebooks, reports and benchmarks. Reading creates nothing in the store (no experiment, no run): the
readers use a bare client under the default request settings, not a :class:`~recsys.tracking.Tracker`.

Example:
    >>> run = latest_run("sqlite:///data/demo/mlflow.db", "recsys-demo")  # doctest: +SKIP
    >>> history = run_metric_history("sqlite:///data/demo/mlflow.db", run["run_id"])  # doctest: +SKIP
    >>> expert_load_history(history, "valid")["moe/click"].shape  # (epochs, experts)  # doctest: +SKIP
    (3, 4)
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from recsys.metric_names import parse_expert_load
from recsys.tracking.settings import MAX_RETRIES, TIMEOUT, env_int, mlflow_settings

History = dict[str, list[tuple[int, float]]]  # metric name -> [(step, value), ...] sorted by step


@contextlib.contextmanager
def _reader(tracking_uri: str) -> Iterator[mlflow.MlflowClient]:
    """A client on ``tracking_uri`` for the block, under the request settings a Tracker would use."""
    settings = mlflow_settings(
        tracking_uri, max_retries=env_int(MAX_RETRIES, 2), timeout_s=env_int(TIMEOUT, 60)
    )
    with settings:
        yield mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """One metric of a run with its history: ``[(step, value), ...]`` sorted by step."""
    with _reader(tracking_uri) as client:
        return sorted((int(m.step), float(m.value)) for m in client.get_metric_history(run_id, key))


def run_metric_history(tracking_uri: str, run_id: str, experiment: str = "") -> History:
    """Every metric of an MLflow run with its history: name -> ``[(step, value), ...]`` sorted by step.

    Args:
        tracking_uri: the MLflow store.
        run_id: the run (in any experiment).
        experiment: unused: a run id names the run in any experiment (kept for callers that name it).
    """
    with _reader(tracking_uri) as client:
        run = client.get_run(run_id)
        return {
            key: sorted((int(m.step), float(m.value)) for m in client.get_metric_history(run_id, key))
            for key in run.data.metrics
        }


def expert_load_history(
    history: Mapping[str, Sequence[tuple[int, float]]], split: str = "valid"
) -> dict[str, np.ndarray]:
    """Expert load per gate at every evaluation: gate -> ``(evaluations, experts)`` array, by step.

    Args:
        history: :func:`run_metric_history`'s output.
        split: ``valid`` (every epoch) or ``test`` (the end).

    Example:
        >>> expert_load_history({"valid/moe/click/load/expert1": [(2, 0.4), (1, 0.5)]})["moe/click"]
        array([[nan, 0.5],
               [nan, 0.4]])
    """
    cells: dict[str, dict[int, dict[int, float]]] = {}
    for key, points in history.items():
        parsed = parse_expert_load(key, f"{split}/")
        if parsed is None:
            continue
        gate, expert = parsed
        for step, value in points:
            cells.setdefault(gate, {}).setdefault(step, {})[expert] = value
    out = {}
    for gate, by_step in sorted(cells.items()):
        steps = sorted(by_step)
        experts = max(max(row) for row in by_step.values()) + 1
        grid = np.full((len(steps), experts), np.nan)  # (evaluations, experts)
        for i, step in enumerate(steps):
            for e, v in by_step[step].items():
                grid[i, e] = v
        out[gate] = grid
    return out


def run_test_predictions(tracking_uri: str, run_id: str, features: str | Path, experiment: str = "") -> Any:
    """A run's test predictions (``p_<task>``) joined with the labels of the features' test split.

    Args:
        tracking_uri: the MLflow store.
        run_id: the run (in any experiment).
        features: the model-ready data set the run trained on (its ``test`` split has the labels).
        experiment: unused, as in :func:`run_metric_history`.

    Returns:
        A polars DataFrame: ``impression_id``, the label columns and ``p_<task>`` columns.
    """
    import polars as pl

    from features.spec import FeatureSpec

    with _reader(tracking_uri) as client, tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "report/test_predictions.parquet", tmp)
        preds = pl.read_parquet(path)
    spec = FeatureSpec.load(Path(features) / "spec.json")
    labels = [label.name for label in spec.feature_config.labels]
    test = pl.read_parquet(Path(features) / "test" / "*.parquet", columns=["impression_id", *labels])
    return preds.join(test, on="impression_id", how="inner")


def latest_run(tracking_uri: str, experiment: str, run_id: str = "") -> dict[str, Any]:
    """A training run of an MLflow experiment: ``run_id`` if given, else the latest finished one.

    Grid and search parent runs (which train nothing) are skipped: a training run has a ``features``
    parameter.

    Returns:
        ``{"run_id", "run_name", "params"}``.

    Raises:
        ValueError: the experiment has no finished training run.
    """
    with _reader(tracking_uri) as client:
        if run_id:
            run = client.get_run(run_id)
        else:
            found = client.get_experiment_by_name(experiment)
            runs = (
                client.search_runs(
                    [found.experiment_id],
                    filter_string="attributes.status = 'FINISHED'",
                    order_by=["attributes.start_time DESC"],
                    max_results=100,
                )
                if found is not None
                else []
            )
            run = next((r for r in runs if "features" in r.data.params), None)
            if run is None:
                raise ValueError(f"experiment {experiment!r} at {tracking_uri}: no finished training run")
    return {"run_id": run.info.run_id, "run_name": run.info.run_name, "params": dict(run.data.params)}


@dataclass(frozen=True)
class RunStatus:
    """A run's id, status (``RUNNING``, ``FINISHED``, ``FAILED``, ``KILLED``) and tags."""

    run_id: str
    status: str
    tags: dict[str, str]


def child_runs(tracking_uri: str, parent_run_id: str) -> list[RunStatus]:
    """The runs nested in ``parent_run_id`` (tag ``mlflow.parentRunId``), in its experiment."""
    with _reader(tracking_uri) as client:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        runs = client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10_000
        )
    return [RunStatus(r.info.run_id, r.info.status, dict(r.data.tags)) for r in runs]
