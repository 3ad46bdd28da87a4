"""One training run for the experiment grid and the search: the one place they call the training driver.

:func:`train` runs :func:`recsys.train.driver.run_training` (the same code path as
``python -m pipelines.train``) and returns what experiments read of it as a :class:`TrainedRun`.

Example:
    >>> trained = train(config, tracking_uri="sqlite:///out/mlflow.db")  # doctest: +SKIP
    >>> trained.test_metrics["test/click/auc"]  # doctest: +SKIP
    0.7123
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrainedRun:
    """What a finished training run gives the experiments.

    Attributes:
        mlflow_run_id: the run's MLflow run (None when tracking was off).
        test_metrics: the test split's metrics, e.g. ``test/click/auc``.
        expert_load: per gate, the test split's share of rows routed to each expert.
        final_valid_main_metric: the kept (best) epoch's main validation metric, if there was one.
        valid_curve: the main validation metric of every epoch.
        seconds: wall time of the run.
    """

    mlflow_run_id: str | None
    test_metrics: dict[str, float] = field(default_factory=dict)
    expert_load: dict[str, list[float]] = field(default_factory=dict)
    final_valid_main_metric: float | None = None
    seconds: float = 0.0
    valid_curve: list[float] = field(default_factory=list)


def train(config: Any, *, tracking_uri: str, callbacks: Sequence[Any] = ()) -> TrainedRun:
    """Trains ``config`` (a :class:`~recsys.train.config.TrainConfig`) and returns what it produced.

    Args:
        config: the run's train config.
        tracking_uri: the MLflow store of the run.
        callbacks: Ray Train callbacks of the run (e.g. a Tune report callback).
    """
    from recsys.train.driver import run_training

    started = time.perf_counter()
    result = run_training(config, tracking_uri=tracking_uri, callbacks=list(callbacks) or None)
    summary = result.summary
    return TrainedRun(
        mlflow_run_id=summary.mlflow_run_id,
        test_metrics=dict(summary.test),
        expert_load=dict(summary.expert_load),
        final_valid_main_metric=summary.final_valid_main_metric,
        seconds=time.perf_counter() - started,
        valid_curve=list(summary.valid_curve),
    )
