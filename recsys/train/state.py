"""Typed state of a training run: where the run stands (:class:`TrainingState`) and what a worker is told.

A :class:`TrainingState` is saved in every checkpoint and is the same on every worker: rank 0 decides it
after each validation and broadcasts it. :class:`WorkerSettings` is what the driver hands each worker.

Example:
    >>> metrics = {"valid/click/auc": 0.7}
    >>> state = TrainingState().after_validation(0, step=40, metrics=metrics, main="valid/click/auc")
    >>> state.epoch, state.best, state.best_epoch, state.bad_epochs
    (1, 0.7, 0, 0)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from recsys.train.config import TrainConfig


@dataclass(frozen=True)
class TrainingState:
    """Where a run stands, saved in each checkpoint.

    Attributes:
        epoch: the next epoch to train (the epochs before it are done).
        step: training steps taken so far (on each worker).
        epoch_step: batches of ``epoch`` trained on already (a checkpoint taken within an epoch).
        data_shards: the run's number of workers when it started (the most, elastic; 0: not started):
            the training rows are cut into as many shards, whose batches make each step's global batch on
            any number of workers (:class:`~recsys.data.shard.ParquetShard`).
        best: the best main validation metric so far (None before the first validation).
        best_epoch: the epoch that reached it.
        bad_epochs: epochs in a row without improvement (early stopping counts them).
        history: per validated epoch, ``{"epoch", "step", **validation metrics}``.
        final_epoch: at the end, the epoch whose weights the model holds (the best one's).
    """

    epoch: int = 0
    step: int = 0
    epoch_step: int = 0
    data_shards: int = 0
    best: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    history: tuple[dict[str, float], ...] = ()
    final_epoch: int | None = None

    def after_validation(self, epoch: int, step: int, metrics: dict[str, float], main: str) -> TrainingState:
        """The state once ``epoch`` is trained and validated; ``main`` names the metric that selects."""
        value = metrics.get(main, float("nan"))
        improved = self.best is None or value > self.best  # NaN never improves on a number
        return replace(
            self,
            epoch=epoch + 1,
            step=step,
            epoch_step=0,
            best=value if improved else self.best,
            best_epoch=epoch if improved else self.best_epoch,
            bad_epochs=0 if improved else self.bad_epochs + 1,
            history=(*self.history, {"epoch": epoch, "step": step, **metrics}),
        )

    def should_stop(self, patience: int) -> bool:
        """Early stopping: ``patience`` epochs in a row without improvement (0: never)."""
        return bool(patience) and self.bad_epochs >= patience

    def latest(self, key: str) -> float | None:
        """The last validated epoch's ``key`` metric, or None."""
        return self.history[-1].get(key) if self.history else None

    def final_metric(self, key: str) -> float:
        """``key`` in the history of the epoch whose weights the model holds (else the last epoch's)."""
        rows = [h for h in self.history if h["epoch"] == self.final_epoch] or list(self.history[-1:])
        return rows[0].get(key, float("nan")) if rows else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for checkpoints and reports); :meth:`from_dict` reads it back."""
        return {**asdict(self), "history": [dict(h) for h in self.history]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingState:
        """Reads :meth:`to_dict`'s data (missing fields take their defaults)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        return cls(**{**values, "history": tuple(dict(h) for h in values.get("history", ()))})


@dataclass(frozen=True)
class WorkerSettings:
    """What the driver hands every worker.

    Attributes:
        config: the run's config, its paths already absolute (workers run in their own folders).
        run_dir: the run's folder, where Ray Train keeps its checkpoints.
        start_from: a checkpoint folder of an earlier run to start from (empty: none).
        mlflow_run_id: the MLflow run the driver records to, stored in the model package's metadata
            (workers never call MLflow).
    """

    config: TrainConfig
    run_dir: str
    start_from: str = ""
    mlflow_run_id: str | None = None
