"""What the workers report to the driver through ``ray.train.report``: one schema, read back in one place.

Rank 0's report carries a typed record (a :class:`StartReport`, :class:`StepReport`, :class:`EpochReport` or
:class:`FinalReport`) as plain data under :data:`RECORD`, beside the few public metrics that Ray Train's
other callbacks (Ray Tune's) have always seen: ``epoch``, ``step``, ``main_metric`` (the best so far) and
``valid_main_metric`` (this epoch's). Larger things travel in a folder of the run beside the report's
checkpoint (:func:`records_folder`, named after it): the validation predictions of the epoch
(:data:`VALID_PREDICTIONS`), and at the end the test predictions (:data:`TEST_PREDICTIONS`) and the gathered
model package (:data:`PACKAGE_DIR`). Not inside the checkpoint: Ray Train deletes old checkpoints
(``run.checkpoints_to_keep``) while the driver's recorder may still be behind; the recorder removes a
records folder once it has logged it.

Example:
    >>> metrics = report_metrics(StepReport(epoch=0, step=10))
    >>> metrics["step"], read_report(metrics)
    (10, StepReport(epoch=0, step=10, windows=()))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recsys.train.state import TrainingState

RECORD = "record"  # the key of the typed record in a report's metrics
VALID_PREDICTIONS = "valid_predictions.parquet"
TEST_PREDICTIONS = "test_predictions.parquet"
PACKAGE_DIR = "model"
RECORDS_DIR = "records"


def records_folder(run_dir: str | Path, checkpoint_name: str) -> Path:
    """Where rank 0 leaves the files of the report of checkpoint ``checkpoint_name`` for the recorder."""
    return Path(run_dir) / RECORDS_DIR / checkpoint_name


@dataclass(frozen=True)
class TrainWindow:
    """Training over the last ``log_every_steps`` steps.

    Attributes:
        step: the step the window ends at.
        losses: the mean of each loss part over the window (``loss``, ``click``, ...).
        examples_per_s: training rows per second, all workers together.
        gate_stats: the gates' scalar statistics at the window's last step.
    """

    step: int
    losses: dict[str, float]
    examples_per_s: float
    gate_stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StartReport:
    """The workers have built the sharded model (and restored a checkpoint, if any).

    Attributes:
        world_size: the number of workers.
        plan: the sharding plan, as TorchRec prints it.
        plan_ranks: ``table:ranks`` per table.
        step: the step the workers start at.
        resumed_from: the epoch of the checkpoint they restored (None: a fresh start).
    """

    world_size: int
    plan: str
    plan_ranks: str
    step: int = 0
    resumed_from: int | None = None


@dataclass(frozen=True)
class StepReport:
    """A checkpoint within an epoch (``checkpoint_every_steps``), with the train windows since the last."""

    epoch: int
    step: int
    windows: tuple[TrainWindow, ...] = ()


@dataclass(frozen=True)
class EpochReport:
    """An epoch trained and validated; its records folder holds :data:`VALID_PREDICTIONS`.

    Attributes:
        epoch: the epoch (from 0).
        step: training steps so far.
        metrics: the validation metrics (``valid/...``).
        best: the best main validation metric so far.
        windows: the train windows since the last report.
    """

    epoch: int
    step: int
    metrics: dict[str, float]
    best: float | None
    windows: tuple[TrainWindow, ...] = ()


@dataclass(frozen=True)
class FinalReport:
    """The end: test metrics; its records folder holds :data:`TEST_PREDICTIONS` and the package.

    Attributes:
        state: the run's final state (history of every epoch, best and final epoch).
        metrics: the test metrics (``test/...``), of the final epoch's weights.
        windows: the train windows since the last report.
    """

    state: TrainingState
    metrics: dict[str, float]
    windows: tuple[TrainWindow, ...] = ()


@dataclass(frozen=True)
class DivergedReport:
    """A training loss went non-finite (:mod:`recsys.train.divergence`): the run stops, nothing is logged.

    Attributes:
        epoch: the epoch (from 0).
        step: the first step at which a worker found it.
        task: the loss part (a task's name, or ``loss`` for the total).
        value: its value, as text (``nan``, ``inf``).
        rank: the worker that found it.
    """

    epoch: int
    step: int
    task: str
    value: str
    rank: int


class NonFiniteLossError(RuntimeError):
    """Raised by the driver when the workers report a :class:`DivergedReport`."""

    def __init__(self, report: DivergedReport) -> None:
        super().__init__(
            f"training stopped: the {report.task} loss is {report.value} at step {report.step} (epoch "
            f"{report.epoch + 1}, worker {report.rank}); no model was logged. Look for non-finite values in "
            "the features, or lower training.dense_lr and training.embedding_lr"
        )
        self.report = report


Report = StartReport | StepReport | EpochReport | FinalReport | DivergedReport
_KINDS: dict[str, type] = {
    "start": StartReport,
    "step": StepReport,
    "epoch": EpochReport,
    "final": FinalReport,
    "diverged": DivergedReport,
}


def report_metrics(report: Report, main_metric: str = "") -> dict[str, Any]:
    """The metrics dict of rank 0's ``ray.train.report``: the public metrics and the typed record.

    Args:
        report: the record.
        main_metric: the validation metric that selects the model (``valid/click/auc``).
    """
    kind = next(k for k, cls in _KINDS.items() if isinstance(report, cls))
    record = {"kind": kind, **asdict(report)}
    if isinstance(report, FinalReport):
        record["state"] = report.state.to_dict()
    public: dict[str, Any] = {}
    if isinstance(report, StepReport):
        public = {"step": report.step}
    elif isinstance(report, EpochReport):
        latest = report.metrics.get(main_metric)
        public = {"epoch": report.epoch, "step": report.step, "main_metric": report.best}
        public["valid_main_metric"] = latest
    return {**{k: v for k, v in public.items() if v is not None}, RECORD: record}


def public_metrics(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """What Ray Train's other callbacks see of a report: its public metrics; None for internal reports."""
    record = metrics.get(RECORD) or {}
    if record.get("kind") not in ("step", "epoch"):
        return None
    return {k: v for k, v in metrics.items() if k != RECORD}


def read_report(metrics: dict[str, Any]) -> Report | None:
    """The typed record of rank 0's report metrics (None if it carries none)."""
    record = dict(metrics.get(RECORD) or {})
    if not record:
        return None
    cls = _KINDS[record.pop("kind")]
    if "windows" in record:
        record["windows"] = tuple(TrainWindow(**w) for w in record["windows"])
    if "state" in record:
        record["state"] = TrainingState.from_dict(record["state"])
    return cls(**record)
