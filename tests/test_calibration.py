"""Platt scaling after training: the fit, its effect on the metrics, the predictions and the plots."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.calibration import (
    PlattScaling,
    calibrators_from_dict,
    calibrators_to_dict,
    fit_calibrators,
    fit_platt,
    logit_of,
)
from recsys.metrics import auc, calibration, log_loss
from recsys.report import calibration_figure
from recsys.train.config import TrainConfig
from recsys.train.evaluation import Predictions, fit_calibration, split_metrics


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def sample(a: float, b: float, n: int = 200_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Model logits, and labels drawn from sigmoid(a * logit + b): the Platt map that calibrates them."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(-1.0, 1.5, n)
    labels = (rng.random(n) < sigmoid(a * logits + b)).astype(np.float64)
    return logits, labels


@pytest.mark.parametrize(("a", "b"), [(1.0, 0.0), (0.6, -0.8), (1.7, 0.4)])
def test_the_fit_recovers_the_map_the_labels_were_drawn_with(a, b):
    platt = fit_platt(*sample(a, b))
    assert platt.a == pytest.approx(a, abs=0.03)
    assert platt.b == pytest.approx(b, abs=0.03)


def test_calibration_moves_the_mean_prediction_to_the_observed_rate_and_keeps_auc():
    logits, labels = sample(1.0, 0.0)
    # A model 20% too high on average (purchase in the demo): the logit shifted up.
    too_high = sigmoid(logits + 0.4)
    assert calibration(labels, too_high) > 1.15
    platt = fit_platt(logit_of(too_high), labels)
    after = platt.probs(too_high)
    assert calibration(labels, after) == pytest.approx(1.0, abs=0.01)
    assert log_loss(labels, after) < log_loss(labels, too_high)
    assert auc(labels, after) == auc(labels, too_high)  # a > 0: the order of the scores is unchanged
    np.testing.assert_allclose(platt.logit(logits + 0.4), logits, atol=0.05)


def test_the_fit_stays_finite_and_increasing_on_degenerate_labels():
    logits = np.linspace(-3, 3, 50)
    for labels in (np.zeros(50), np.ones(50)):
        platt = fit_platt(logits, labels)
        assert np.isfinite([platt.a, platt.b]).all() and platt.a > 0
    backwards = (logits < 0).astype(float)  # the model ranks these labels backwards
    platt = fit_platt(logits, backwards)
    assert platt.a == 1.0 and np.isfinite(platt.b)
    assert fit_platt(np.zeros(0), np.zeros(0)) == PlattScaling()
    with pytest.raises(ValueError, match="one shape"):
        fit_platt(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="a > 0"):
        PlattScaling(a=-1.0)


def test_calibrators_round_trip_as_plain_data_and_bad_entries_name_the_task():
    calibrators = {"click": PlattScaling(0.9, -0.1), "purchase": PlattScaling(1.1, -0.2)}
    assert calibrators_from_dict(calibrators_to_dict(calibrators)) == calibrators
    assert calibrators_from_dict(None) == {}
    with pytest.raises(ValueError, match=r"package\.json: calibration\.click: expected"):
        calibrators_from_dict({"click": {"method": "isotonic"}}, "package.json: calibration")
    with pytest.raises(ValueError, match=r"calibration\.click: bad Platt parameters"):
        calibrators_from_dict({"click": {"method": "platt", "a": 0.0, "b": 1.0}})


def config(calibration: str = "platt") -> TrainConfig:
    return TrainConfig.from_dict(
        {"features": "f", "model": "ecommerce_mmoe", "training": {"calibration": calibration}}
    )


def predictions(seed: int) -> Predictions:
    """Predictions of every binary task of ``ecommerce_mmoe``, each 20% too high on average."""
    tasks = [t for t in config().model.tasks if t.kind == "binary"]
    logits, labels = sample(1.0, -0.5, n=50_000, seed=seed)
    return Predictions(
        labels={t.label: labels for t in tasks},
        probs={t.name: sigmoid(logits + 0.3) for t in tasks},
        keys={"impression_id": np.arange(labels.size)},
    )


def test_test_metrics_are_after_calibration_with_the_raw_ones_beside_them():
    valid, test = predictions(seed=1), predictions(seed=2)
    calibrators = fit_calibration(valid, config())
    tasks = [t.name for t in config().model.tasks if t.kind == "binary"]
    assert sorted(calibrators) == sorted(tasks)
    assert fit_calibration(valid, config("none")) == {} and fit_calibration(None, config()) == {}

    calibrated = test.calibrated(calibrators)
    metrics = split_metrics(calibrated, config(), None, "test/")
    for task in tasks:
        assert metrics[f"test/{task}/calibration_raw"] > 1.15
        assert 0.97 < metrics[f"test/{task}/calibration"] < 1.03
        assert metrics[f"test/{task}/log_loss"] < metrics[f"test/{task}/log_loss_raw"]
        assert f"test/{task}/auc_raw" not in metrics  # calibration leaves the AUC as it was
        np.testing.assert_array_equal(calibrated.raw_probs[task], test.probs[task])
    back = Predictions.from_arrow(calibrated.to_arrow())
    assert sorted(back.raw_probs) == sorted(tasks) and sorted(back.probs) == sorted(tasks)
    assert "raw_p_click" not in back.keys
    assert not any(k.endswith("_raw") for k in split_metrics(test, config(), None, "test/"))


def test_the_calibration_plot_shows_the_curves_before_and_after():
    test = predictions(seed=3)
    labels, probs = test.binary(config())
    calibrated = test.calibrated(fit_calibrators(labels, probs))
    _, after = calibrated.binary(config())
    figure = calibration_figure(labels, after, "test split", raw=calibrated.raw_probs)
    axes = figure.axes
    assert len(axes) == len(labels)
    assert [line.get_label() for line in axes[0].lines] == ["perfect", "before calibration", "calibrated"]
    assert "calibration, log loss" in axes[0].get_title()
    plain = calibration_figure(labels, probs, "validation")
    assert [line.get_label() for line in plain.axes[0].lines] == ["perfect", "model"]
