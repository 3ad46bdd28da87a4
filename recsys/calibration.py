"""Platt scaling: a monotone map of each binary task's logit, fitted after training on the validation split.

A trained model can rank well and still predict too high or too low on average (the purchase tower of the
demo predicted 20% above the observed rate). :func:`fit_platt` fits ``p = sigmoid(a * logit + b)`` to one
task's labels by minimising the log loss; the package applies it to the model's logit before the sigmoid
(:func:`recsys.package.save_package` stores it, ``recsys.package._score`` applies it).

Why Platt rather than isotonic regression: two numbers per task, fitted in a few Newton steps; with
``a > 0`` it is strictly increasing, so the ranking and AUC stay exactly as they were; it is smooth and
cannot overfit a small validation split, where isotonic regression is a step function that ties the scores
of a whole step (changing AUC) and needs many rows per step.

Example:
    >>> rng = np.random.default_rng(0)
    >>> logit = rng.normal(size=100_000)
    >>> labels = (rng.random(100_000) < 1 / (1 + np.exp(-(0.5 * logit - 1.0)))).astype(float)
    >>> platt = fit_platt(logit, labels)
    >>> round(platt.a, 1), round(platt.b, 1)
    (0.5, -1.0)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

METHODS = ("platt", "none")  # training.calibration
_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before their logit: float32 sigmoids saturate


@dataclass(frozen=True)
class PlattScaling:
    """``p = sigmoid(a * logit + b)``: a task's calibrated probability from the model's logit.

    Attributes:
        a: the slope, > 0 (the map keeps the order of the scores).
        b: the intercept.
    """

    a: float = 1.0
    b: float = 0.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.a) and self.a > 0 and np.isfinite(self.b)):
            raise ValueError(
                f"PlattScaling: expected a finite a > 0 and a finite b, got a={self.a}, b={self.b}"
            )

    def logit(self, logit: np.ndarray) -> np.ndarray:
        """The calibrated logit of model logits, any shape."""
        return self.a * logit + self.b

    def probs(self, probs: np.ndarray) -> np.ndarray:
        """The calibrated probabilities of model probabilities, (N,) float64."""
        return _sigmoid(self.logit(logit_of(probs)))


def logit_of(probs: np.ndarray) -> np.ndarray:
    """The logit of probabilities clipped to ``[1e-7, 1 - 1e-7]``, float64."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


def _newton(x: np.ndarray, t: np.ndarray, a: float, b: float, fit_a: bool) -> tuple[float, float]:
    """Minimises the mean cross-entropy of ``sigmoid(a x + b)`` against targets ``t`` (damped Newton)."""

    def loss(a: float, b: float) -> float:
        z = a * x + b
        return float(np.mean(np.logaddexp(0.0, z) - t * z))

    current = loss(a, b)
    for _ in range(100):
        p = _sigmoid(a * x + b)
        r, w = p - t, p * (1 - p)
        if fit_a:
            grad = np.array([np.mean(r * x), np.mean(r)])
            hess = np.array([[np.mean(w * x * x), np.mean(w * x)], [np.mean(w * x), np.mean(w)]])
            step = np.linalg.solve(hess + 1e-12 * np.eye(2), grad)
        else:
            grad = np.array([0.0, np.mean(r)])
            step = np.array([0.0, grad[1] / (np.mean(w) + 1e-12)])
        if np.max(np.abs(grad)) < 1e-10:
            break
        scale = 1.0
        while scale > 1e-6:  # halve the step until the loss does not rise
            na, nb = a - scale * step[0], b - scale * step[1]
            new = loss(na, nb)
            if new <= current:
                break
            scale /= 2
        else:
            break
        a, b, current = na, nb, new
    return a, b


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> PlattScaling:
    """Fits Platt scaling to one task's model logits and 0/1 labels by minimising the log loss.

    The targets are Platt's (1999): ``(N+ + 1) / (N+ + 2)`` for positives and ``1 / (N- + 2)`` for
    negatives rather than 1 and 0, so that the fit stays finite when a split has few or no positives (and
    moves nothing measurable on a split of thousands of rows). Should the best slope not be positive (a
    model that ranks the split backwards), only the intercept is fitted, with ``a = 1``: the map must keep
    the model's ranking. No rows give the identity.

    Args:
        logits: the model's logits, (N,).
        labels: 0/1 labels, (N,).

    Returns:
        The fitted map.

    Raises:
        ValueError: mismatched or non-finite inputs.
    """
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(
            f"fit_platt: expected logits and labels of one shape (N,), got {x.shape} and {y.shape}"
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("fit_platt: logits and labels must be finite")
    if x.size == 0:
        return PlattScaling()
    positives = float(y.sum())
    t = np.where(y > 0.5, (positives + 1) / (positives + 2), 1 / (y.size - positives + 2))
    a, b = _newton(x, t, 1.0, 0.0, fit_a=True)
    if not (np.isfinite(a) and a > 0 and np.isfinite(b)):
        a, b = _newton(x, t, 1.0, 0.0, fit_a=False)
    return PlattScaling(float(a), float(b))


def fit_calibrators(
    labels: Mapping[str, np.ndarray], probs: Mapping[str, np.ndarray]
) -> dict[str, PlattScaling]:
    """Per binary task (the keys of ``labels``), Platt scaling fitted to its predicted probabilities."""
    return {task: fit_platt(logit_of(probs[task]), labels[task]) for task in labels}


def calibrate(
    probs: Mapping[str, np.ndarray], calibrators: Mapping[str, PlattScaling]
) -> dict[str, np.ndarray]:
    """The probabilities with each task's calibrator applied (tasks without one are left as they are)."""
    return {task: calibrators[task].probs(p) if task in calibrators else p for task, p in probs.items()}


def calibrators_to_dict(calibrators: Mapping[str, PlattScaling]) -> dict[str, dict[str, Any]]:
    """Plain data, ``{task: {"method": "platt", "a": ..., "b": ...}}``."""
    return {task: {"method": "platt", **asdict(c)} for task, c in calibrators.items()}


def calibrators_from_dict(
    data: Mapping[str, Any] | None, where: str = "calibration"
) -> dict[str, PlattScaling]:
    """Reads :func:`calibrators_to_dict`'s data (None or empty: no calibrators).

    Raises:
        ValueError: an unknown method or bad parameters; the message names ``where`` and the task.
    """
    out = {}
    for task, entry in (data or {}).items():
        if not isinstance(entry, Mapping) or entry.get("method") != "platt":
            raise ValueError(
                f"{where}.{task}: expected {{'method': 'platt', 'a': ..., 'b': ...}}, got {entry!r}"
            )
        try:
            out[task] = PlattScaling(float(entry["a"]), float(entry["b"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}.{task}: bad Platt parameters {entry!r} ({e})") from e
    return out
