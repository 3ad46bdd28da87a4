"""What a training run returns: :class:`TrainingSummary`, filled by the driver's recorder."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrainingSummary:
    """The outcome of a training run: the kept epoch, its test metrics, the MLflow run and registered version.

    Attributes:
        mlflow_run_id: the MLflow run (None when tracking was off).
        model_package: the package folder of the kept weights (``<run>/model``).
        best_valid_main_metric: the best main validation metric of any epoch.
        final_valid_main_metric: the main validation metric of the kept epoch, which the registry
            compares (NaN without validation).
        final_epoch: the epoch whose weights the package holds.
        steps: training steps taken (on each worker).
        test: the test metrics of the kept weights that summaries show (``test/click/auc``, ...).
        expert_load: per gate, the share of test rows routed to each expert (empty without gates).
        valid_curve: the main validation metric of every validated epoch, in order.
        model_uri: the logged MLflow model (None when not logged).
        registered_model: the registered model's name (None when not registered).
        version: the registered version (None when not registered).
        alias: ``champion`` or ``challenger`` (None when not registered).

    Example:
        >>> TrainingSummary("abc", "run/model", 0.71, 0.71, 1, 40).to_dict()["final_epoch"]
        1
    """

    mlflow_run_id: str | None
    model_package: str
    best_valid_main_metric: float | None
    final_valid_main_metric: float
    final_epoch: int | None
    steps: int
    test: dict[str, float] = field(default_factory=dict)
    expert_load: dict[str, list[float]] = field(default_factory=dict)
    valid_curve: list[float] = field(default_factory=list)
    model_uri: str | None = None
    registered_model: str | None = None
    version: str | None = None
    alias: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for JSON."""
        return asdict(self)
