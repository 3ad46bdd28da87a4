"""One schema for metric names: built and parsed here only.

Names are ``{split}/{task}/{metric}`` (``valid/click/auc``) for ranking metrics and
``{split}/{gate}/load/expert{e}`` (``valid/moe/click/load/expert3``) for the share of rows a gate routed to
each expert. After calibration (:mod:`recsys.calibration`) a split's metrics are those of the calibrated
probabilities, and the metrics calibration changes are also given before it, as
``{split}/{task}/{metric}_raw`` (``test/purchase/calibration_raw``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_LOAD = "/load/expert"
RAW = "_raw"  # the suffix of a metric of the model's own probabilities, before calibration
# What calibration changes: a monotone map of the scores leaves AUC, GAUC and the oracle gap as they were.
CALIBRATION_SENSITIVE = ("log_loss", "ne", "calibration")


def expert_load_metrics(prefix: str, loads: Mapping[str, Any]) -> dict[str, float]:
    """Metrics of the share of rows routed to each expert, one per gate and expert.

    Args:
        prefix: the split's prefix, e.g. ``"valid/"``.
        loads: per routing statistic ``{gate}/load`` (as the model reports it), the ``(E,)`` shares.

    Example:
        >>> expert_load_metrics("valid/", {"moe/click/load": [0.75, 0.25]})
        {'valid/moe/click/load/expert0': 0.75, 'valid/moe/click/load/expert1': 0.25}
    """
    return {
        f"{prefix}{name}/expert{e}": float(share)
        for name, load in loads.items()
        for e, share in enumerate(load)
    }


def parse_expert_load(key: str, prefix: str) -> tuple[str, int] | None:
    """``(gate, expert)`` of an expert-load metric name under ``prefix``; None for any other name.

    Example:
        >>> parse_expert_load("test/moe/click/load/expert2", "test/")
        ('moe/click', 2)
    """
    if not key.startswith(prefix) or _LOAD not in key:
        return None
    gate, expert = key[len(prefix) :].split(_LOAD)
    return gate, int(expert)


def expert_loads(metrics: Mapping[str, float], prefix: str) -> dict[str, list[float]]:
    """The share of rows routed to each expert, per gate, from expert-load metrics under ``prefix``.

    Example:
        >>> expert_loads({"test/moe/click/load/expert0": 0.7, "test/moe/click/load/expert1": 0.3}, "test/")
        {'moe/click': [0.7, 0.3]}
    """
    cells: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        parsed = parse_expert_load(key, prefix)
        if parsed is not None:
            cells.setdefault(parsed[0], {})[parsed[1]] = float(value)
    return {gate: [shares[e] for e in sorted(shares)] for gate, shares in sorted(cells.items())}


def uncalibrated_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics calibration changes, of the model's own probabilities, named with :data:`RAW`.

    Example:
        >>> uncalibrated_metrics({"test/click/auc": 0.7, "test/click/calibration": 1.2})
        {'test/click/calibration_raw': 1.2}
    """
    return {
        f"{key}{RAW}": float(value)
        for key, value in metrics.items()
        if key.rsplit("/", 1)[-1] in CALIBRATION_SENSITIVE
    }
