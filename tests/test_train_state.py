"""Fast checks of training's typed state, its reports and the callback that forwards them (no Ray cluster)."""

from __future__ import annotations

import queue

import numpy as np
import pytest
from ray.train import UserCallback

from recsys.train.config import TrainConfig
from recsys.train.evaluation import Predictions, finite_metrics
from recsys.train.recorder import ReportForwarder
from recsys.train.reports import (
    EpochReport,
    FinalReport,
    StartReport,
    StepReport,
    TrainWindow,
    public_metrics,
    read_report,
    report_metrics,
)
from recsys.train.state import TrainingState

MAIN = "valid/click/auc"


def validated(*aucs: float) -> TrainingState:
    state = TrainingState()
    for epoch, auc in enumerate(aucs):
        state = state.after_validation(epoch, 10 * (epoch + 1), {MAIN: auc}, MAIN)
    return state


def test_the_state_keeps_the_best_epoch_and_counts_the_epochs_without_improvement():
    state = validated(0.70, 0.72, 0.71, 0.69)
    assert (state.epoch, state.step, state.best, state.best_epoch, state.bad_epochs) == (4, 40, 0.72, 1, 2)
    assert [h["epoch"] for h in state.history] == [0, 1, 2, 3]
    assert state.latest(MAIN) == 0.69
    assert state.should_stop(2) and not state.should_stop(3) and not state.should_stop(0)
    # the final metric is the kept epoch's, the last one's until an epoch is chosen
    assert state.final_metric(MAIN) == 0.69
    assert TrainingState.from_dict({**state.to_dict(), "final_epoch": 1}).final_metric(MAIN) == 0.72


def test_a_nan_metric_never_counts_as_an_improvement():
    state = validated(0.70, float("nan"))
    assert (state.best, state.best_epoch, state.bad_epochs) == (0.70, 0, 1)


def test_the_state_reads_back_from_plain_data_and_older_checkpoints():
    state = validated(0.7, 0.8)
    assert TrainingState.from_dict(state.to_dict()) == state
    older = {"epoch": 1, "step": 5, "best": 0.6, "bad_epochs": 0, "history": [{"epoch": 0, MAIN: 0.6}]}
    assert TrainingState.from_dict(older) == TrainingState(1, 5, best=0.6, history=({"epoch": 0, MAIN: 0.6},))


@pytest.mark.parametrize(
    "report",
    [
        StartReport(2, "plan", "t_item:[0] t_user:[1]", step=30, resumed_from=1),
        StepReport(0, 10, (TrainWindow(10, {"loss": 0.5}, 1e4, {"moe/click/lb": 0.1}),)),
        EpochReport(1, 40, {MAIN: 0.7}, 0.72, ()),
        FinalReport(validated(0.7, 0.72), {"test/click/auc": 0.71}, (TrainWindow(40, {"loss": 0.4}, 2e4),)),
    ],
)
def test_reports_travel_as_plain_data_and_read_back_typed(report):
    import json

    metrics = json.loads(json.dumps(report_metrics(report, MAIN)))  # as Ray Train's checkpoint index keeps it
    assert read_report(metrics) == report


def test_other_callbacks_see_only_the_public_metrics_of_step_and_epoch_reports():
    epoch = report_metrics(EpochReport(1, 40, {MAIN: 0.7}, 0.72), MAIN)
    assert public_metrics(epoch) == {"epoch": 1, "step": 40, "main_metric": 0.72, "valid_main_metric": 0.7}
    assert public_metrics(report_metrics(StepReport(0, 10), MAIN)) == {"step": 10}
    assert public_metrics(report_metrics(StartReport(1, "", ""))) is None
    assert public_metrics(report_metrics(FinalReport(TrainingState(), {}))) is None
    assert read_report({}) is None


class Seen(UserCallback):
    def __init__(self) -> None:
        self.reports: list[list[dict]] = []

    def after_report(self, run_context, metrics, checkpoint):
        self.reports.append(metrics)


def test_the_forwarder_queues_rank_zeros_records_and_passes_public_metrics_on():
    records: queue.Queue = queue.Queue()
    seen = Seen()
    forwarder = ReportForwarder(records, [seen])
    for report in (
        StartReport(2, "", ""),
        EpochReport(0, 20, {MAIN: 0.7}, 0.7),
        FinalReport(TrainingState(), {}),
    ):
        forwarder.after_report(None, [report_metrics(report, MAIN), {}], checkpoint=None)
    kinds = [type(read_report(records.get_nowait()[0])).__name__ for _ in range(records.qsize())]
    assert kinds == ["StartReport", "EpochReport", "FinalReport"]
    assert seen.reports == [[{"epoch": 0, "step": 20, "main_metric": 0.7, "valid_main_metric": 0.7}, {}]]


def test_predictions_round_trip_through_arrow_and_pick_the_binary_tasks():
    config = TrainConfig.from_dict({"features": "f", "model": "ecommerce_mmoe"})
    tasks = [t for t in config.model.tasks if t.kind == "binary"]
    preds = Predictions(
        labels={t.label: np.array([1.0, 0.0]) for t in tasks},
        probs={t.name: np.array([0.9, 0.2]) for t in tasks},
        keys={"impression_id": np.array([7, 3])},
    )
    back = Predictions.from_arrow(preds.to_arrow())
    labels, probs = back.binary(config)
    assert sorted(labels) == sorted(probs) == sorted(t.name for t in tasks)
    np.testing.assert_array_equal(back.keys["impression_id"], [7, 3])
    np.testing.assert_allclose(probs[tasks[0].name], [0.9, 0.2])
    assert finite_metrics({"a": 1, "b": float("nan"), "c": float("inf")}) == {"a": 1.0}


@pytest.mark.parametrize(("value", "ok"), [(-1, True), (0, True), (-2, False)])
def test_max_failures_takes_minus_one_for_no_limit(value, ok):
    data = {"features": "f", "model": "ecommerce_mmoe", "run": {"max_failures": value}}
    if ok:
        assert TrainConfig.from_dict(data).run.max_failures == value
    else:
        with pytest.raises(ValueError, match=r"run\.max_failures: expected an integer >= -1, got -2"):
            TrainConfig.from_dict(data)
