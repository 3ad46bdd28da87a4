"""Offline ranking metrics for the click and purchase tasks, on numpy arrays gathered from all workers.

Every function takes 1-D arrays of one row per impression: ``labels`` (0/1), ``probs`` (predicted
probabilities in [0, 1]) or ``scores`` (any real ranking score), and for GAUC the ``groups`` (user ids).
:func:`evaluate` computes all of them for each task and returns a flat ``dict[str, float]`` ready for
``mlflow.log_metrics``; a metric that is undefined on the data (AUC with a single class, calibration
with no positive) is ``nan`` rather than an arbitrary default, so that it cannot pass for a real value.

Example:
    >>> labels = {"click": np.array([1, 0, 1, 0]), "purchase": np.array([1, 0, 0, 0])}
    >>> probs = {"click": np.array([0.9, 0.2, 0.6, 0.6]), "purchase": np.array([0.5, 0.1, 0.1, 0.2])}
    >>> metrics = evaluate(labels, probs, groups=np.array([7, 7, 8, 8]), prefix="val/")
    >>> metrics["val/click/auc"], metrics["val/click/gauc"], metrics["val/purchase/count"]
    (0.875, 0.75, 4.0)

Note on TorchRec (1.8): its functional helpers were compared with these functions (see
``tests/test_metrics.py``) and are used there as test oracles rather than here, because they are not
exact on tied scores and use other conventions for undefined values:

* ``torchrec.metrics.auc.compute_auc`` sorts by prediction with ``argsort`` and integrates the ROC curve
  row by row, so tied scores are ordered by the sort instead of sharing an average rank: for labels
  ``[1, 0]`` and scores ``[0.5, 0.5]`` it returns 1.0 (or 0.0 with the rows swapped) where the
  Mann-Whitney AUC is 0.5. It agrees with :func:`auc` (weights included) when no scores tie, and
  returns 0.5, not nan, when one class is missing.
* ``compute_auc_per_group`` loops over groups in Python and takes the unweighted mean of group AUCs,
  counting single-class groups as 0.5; ``torchrec.metrics.gauc.compute_gauc_3d`` (dense, padded
  ``[task, group, sample]`` tensors) skips single-class groups and groups whose predictions are all
  equal, takes the unweighted mean over groups, treats a prediction of exactly 0 as padding, and also
  breaks ties by sort order. :func:`gauc` weights groups by their impressions and averages tied ranks;
  the two agree on equal-sized groups without ties.
* ``torchrec.metrics.ne`` (``get_ne_states`` + ``compute_ne``) is exact and agrees with
  :func:`normalized_entropy` for the same ``eps``; its ``compute_logloss`` is in bits (log2), i.e.
  :func:`log_loss` / ln 2, whereas :func:`log_loss` is in nats like ``torch.nn.BCELoss``. Beware that
  ``compute_cross_entropy`` clamps float64 predictions in place (``.double()`` returns the same tensor),
  so it modifies the caller's tensor.
* ``torchrec.metrics.calibration.compute_calibration`` is sum(prediction) / sum(label), as
  :func:`calibration`, but returns 0.0 instead of nan when there is no positive.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "GaucResult",
    "auc",
    "calibration",
    "calibration_curve",
    "evaluate",
    "gauc",
    "gauc_detail",
    "log_loss",
    "normalized_entropy",
    "oracle_gap",
]

CALIBRATION_STRATEGIES = ("quantile", "uniform")


# --------------------------------------------------------------------------- validation


def _as_1d(name: str, values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    return arr


def _check_lengths(**arrays: np.ndarray) -> None:
    lengths = {name: len(arr) for name, arr in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have the same length, got {lengths}")


def _float_1d(
    name: str, values: np.ndarray, requirement: str, is_ok: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Returns ``values`` as float64, shape (N,), after checking ``is_ok`` element-wise.

    Raises:
        ValueError: naming ``name``, the requirement and the first offending value, as given.
    """
    raw = _as_1d(name, values)
    if raw.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric or boolean, got dtype {raw.dtype}")
    arr = raw.astype(np.float64)
    bad = ~is_ok(arr)
    if bad.any():
        idx = np.flatnonzero(bad)
        # .item(): a Python scalar prints as 2, where numpy 2 prints np.int64(2).
        raise ValueError(
            f"{name} must {requirement}, got {raw[idx[0]].item()!r} at index {idx[0]} ({len(idx)} bad values)"
        )
    return arr


def _labels(values: np.ndarray, name: str = "labels") -> np.ndarray:
    # NaN fails both comparisons, so it is rejected too.
    return _float_1d(name, values, "be 0 or 1", lambda a: (a == 0.0) | (a == 1.0))


def _probs(values: np.ndarray, name: str = "probs") -> np.ndarray:
    return _float_1d(name, values, "lie in [0, 1]", lambda a: (a >= 0.0) & (a <= 1.0))


def _scores(values: np.ndarray, name: str = "scores") -> np.ndarray:
    # NaN has no place in a ranking, and inf ties with itself.
    return _float_1d(name, values, "be finite", np.isfinite)


def _weights(values: np.ndarray, name: str = "weights") -> np.ndarray:
    return _float_1d(name, values, "be finite and >= 0", lambda a: np.isfinite(a) & (a >= 0.0))


# --------------------------------------------------------------------------- ranking


def _run_starts(*sorted_keys: np.ndarray) -> np.ndarray:
    """Start indices of the runs of equal key tuples in arrays sorted by those keys, shape (B,)."""
    change = np.zeros(len(sorted_keys[0]), dtype=bool)
    change[0] = True
    for key in sorted_keys:
        change[1:] |= key[1:] != key[:-1]
    return np.flatnonzero(change)


def auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """ROC AUC: the probability that a positive is scored above a negative, ties counting 1/2.

    This is exactly the Mann-Whitney statistic ``U / (n_pos * n_neg)`` with tied scores given their
    average rank. With ``weights`` every (positive, negative) pair counts ``w_pos * w_neg``.

    Args:
        labels: 0/1 labels, shape (N,).
        scores: ranking scores (probabilities or logits), finite, shape (N,).
        weights: optional non-negative sample weights, shape (N,).

    Returns:
        The AUC in [0, 1]; nan when only one class is present (or has positive weight), which includes
        empty input, since the AUC is then undefined.

    Raises:
        ValueError: on non-1-D or mismatched arrays, labels other than 0/1, non-finite scores, or
            negative or non-finite weights.
    """
    y = _labels(labels)
    s = _scores(scores)
    w = np.ones_like(y) if weights is None else _weights(weights)
    _check_lengths(labels=y, scores=s, weights=w)
    if len(y) == 0:
        return math.nan

    order = np.argsort(s)  # ties need no particular order: they are summed per block below
    y, s, w = y[order], s[order], w[order]
    starts = _run_starts(s)  # one block per distinct score
    pos = np.add.reduceat(w * y, starts)  # (B,) positive weight at each score
    neg = np.add.reduceat(w * (1.0 - y), starts)  # (B,) negative weight at each score
    pos_total, neg_total = pos.sum(), neg.sum()
    if pos_total == 0.0 or neg_total == 0.0:
        return math.nan
    # A positive beats every negative strictly below its score and half of those tied with it: this is
    # the rank-sum (average rank) formula, written per block of tied scores so that ties cost nothing.
    neg_below = np.cumsum(neg) - neg
    return float(np.sum(pos * (neg_below + 0.5 * neg)) / (pos_total * neg_total))


@dataclass(frozen=True)
class GaucResult:
    """Group AUC and how much of the data it was computed on.

    Attributes:
        value: impression-weighted mean of the per-group AUCs; nan when no group has both classes.
        n_groups: number of groups with both classes, i.e. that entered the mean.
        n_rows: number of rows (impressions) in those groups.
        n_groups_total: number of distinct groups in the input.
    """

    value: float
    n_groups: int
    n_rows: int
    n_groups_total: int


def gauc_detail(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> GaucResult:
    """Group AUC with its coverage; see :func:`gauc`.

    Vectorized: rows are sorted once by (group, score) and the per-group rank sums come from
    ``np.add.reduceat`` over blocks of tied (group, score) and ``np.bincount`` over groups, so the cost
    is one O(N log N) sort whatever the number of groups.

    Args:
        labels: 0/1 labels, shape (N,).
        scores: ranking scores, finite, shape (N,).
        groups: group key of each row (e.g. user id), any sortable dtype, shape (N,).

    Returns:
        The :class:`GaucResult`.

    Raises:
        ValueError: on non-1-D or mismatched arrays, labels other than 0/1, or non-finite scores.
    """
    y = _labels(labels)
    s = _scores(scores)
    g_raw = _as_1d("groups", groups)
    _check_lengths(labels=y, scores=s, groups=g_raw)
    if len(y) == 0:
        return GaucResult(value=math.nan, n_groups=0, n_rows=0, n_groups_total=0)

    # Dense group codes 0..G-1, each present, so that bincount gives one entry per group.
    _, g = np.unique(g_raw, return_inverse=True)
    n_groups_total = int(g.max()) + 1
    order = np.lexsort((s, g))  # the last key is the primary one: group, then score ascending
    g, s, y = g[order], s[order], y[order].astype(np.int64)

    starts = _run_starts(g, s)  # one block per (group, tied score)
    block_group = g[starts]  # (B,) sorted, contiguous per group
    pos = np.add.reduceat(y, starts)  # (B,)
    neg = np.diff(np.append(starts, len(y))) - pos  # (B,)
    # Negatives below each block within its group: the global running count minus the count reached
    # at the first block of the group. Integer counts keep the subtraction exact.
    neg_before = np.cumsum(neg) - neg
    group_first_block = np.searchsorted(block_group, np.arange(n_groups_total))
    neg_below = neg_before - neg_before[group_first_block][block_group]
    twice_u = np.bincount(block_group, weights=pos * (2 * neg_below + neg), minlength=n_groups_total)

    n_pos = np.bincount(g, weights=y, minlength=n_groups_total)  # (G,)
    n_rows = np.bincount(g, minlength=n_groups_total)  # (G,)
    n_neg = n_rows - n_pos
    used = (n_pos > 0) & (n_neg > 0)
    if not used.any():
        return GaucResult(value=math.nan, n_groups=0, n_rows=0, n_groups_total=n_groups_total)
    group_auc = twice_u[used] / (2.0 * n_pos[used] * n_neg[used])
    value = float(np.sum(group_auc * n_rows[used]) / np.sum(n_rows[used]))
    return GaucResult(
        value=value,
        n_groups=int(used.sum()),
        n_rows=int(n_rows[used].sum()),
        n_groups_total=n_groups_total,
    )


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Group AUC: the AUC of each group (user), averaged weighted by the group's impressions.

    Groups with a single class have no AUC and are skipped (as in Zhou et al. 2018, "Deep Interest
    Network"); within a group, tied scores get their average rank as in :func:`auc`. Use
    :func:`gauc_detail` to also get how many groups and rows were used.

    Args:
        labels: 0/1 labels, shape (N,).
        scores: ranking scores, finite, shape (N,).
        groups: group key of each row (e.g. user id), shape (N,).

    Returns:
        The GAUC in [0, 1]; nan when no group has both classes.

    Raises:
        ValueError: on non-1-D or mismatched arrays, labels other than 0/1, or non-finite scores.
    """
    return gauc_detail(labels, scores, groups).value


# --------------------------------------------------------------------------- probabilities


def _check_eps(eps: float) -> None:
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps!r}")


def _labels_and_probs(
    labels: np.ndarray, probs: np.ndarray, labels_name: str = "labels", probs_name: str = "probs"
) -> tuple[np.ndarray, np.ndarray]:
    y, p = _labels(labels, labels_name), _probs(probs, probs_name)
    _check_lengths(**{labels_name: y, probs_name: p})
    return y, p


def _mean_log_loss(y: np.ndarray, p: np.ndarray, eps: float) -> float:
    # Clipping keeps a confident wrong prediction (p = 0 for a positive) finite instead of inf.
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy in nats (natural log, as ``torch.nn.BCELoss``).

    Args:
        labels: 0/1 labels, shape (N,).
        probs: predicted probabilities in [0, 1], shape (N,); clipped to [eps, 1 - eps].
        eps: clipping bound, in (0, 0.5).

    Returns:
        The mean log loss; nan on empty input.

    Raises:
        ValueError: on non-1-D or mismatched arrays, labels other than 0/1, probabilities outside
            [0, 1], or ``eps`` outside (0, 0.5).
    """
    _check_eps(eps)
    y, p = _labels_and_probs(labels, probs)
    if len(y) == 0:
        return math.nan
    return _mean_log_loss(y, p, eps)


def _binary_entropy(rate: float) -> float:
    """Entropy in nats of a Bernoulli(rate); 0 at rate 0 or 1."""
    if rate <= 0.0 or rate >= 1.0:
        return 0.0
    return -(rate * math.log(rate) + (1.0 - rate) * math.log1p(-rate))


def normalized_entropy(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Normalized entropy: log loss divided by the entropy of the observed positive rate.

    As in He et al. 2014, "Practical lessons from predicting clicks on ads at Facebook": the log loss
    relative to always predicting the observed rate, so 1.0 means no better than that constant and
    lower is better; unlike the log loss it can be compared across tasks with different rates.

    Args:
        labels: 0/1 labels, shape (N,).
        probs: predicted probabilities in [0, 1], shape (N,); clipped to [eps, 1 - eps].
        eps: clipping bound of the log loss, in (0, 0.5).

    Returns:
        The NE; nan on empty input or when all labels are equal (the baseline entropy is then 0).

    Raises:
        ValueError: as :func:`log_loss`.
    """
    _check_eps(eps)
    y, p = _labels_and_probs(labels, probs)
    if len(y) == 0:
        return math.nan
    baseline = _binary_entropy(float(y.mean()))
    if baseline == 0.0:
        return math.nan
    return _mean_log_loss(y, p, eps) / baseline


def calibration(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean predicted probability divided by the observed positive rate (1.0 is calibrated on average).

    Args:
        labels: 0/1 labels, shape (N,).
        probs: predicted probabilities in [0, 1], shape (N,).

    Returns:
        sum(probs) / sum(labels); nan when there is no positive (empty input included).

    Raises:
        ValueError: on non-1-D or mismatched arrays, labels other than 0/1, or probabilities outside
            [0, 1].
    """
    y, p = _labels_and_probs(labels, probs)
    n_pos = y.sum()
    if n_pos == 0.0:
        return math.nan
    return float(p.sum() / n_pos)


def calibration_curve(
    labels: np.ndarray, probs: np.ndarray, bins: int = 20, strategy: str = "quantile"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability diagram data: mean prediction against observed rate, per bin of predictions.

    Args:
        labels: 0/1 labels, shape (N,).
        probs: predicted probabilities in [0, 1], shape (N,).
        bins: number of bins, >= 1.
        strategy: ``"quantile"`` (bins of about equal counts, edges at quantiles of ``probs``: the
            default, because click and purchase probabilities crowd near 0 and uniform bins would leave
            most bins empty) or ``"uniform"`` (equal widths on [0, 1]).

    Returns:
        ``(mean_pred, observed_rate, count)``, each of shape (K,), K <= bins: the non-empty bins only,
        in increasing order of prediction (quantile bins collapse when many predictions tie). ``count``
        is int64.

    Raises:
        ValueError: on bad ``labels``/``probs`` (as :func:`calibration`), ``bins`` < 1 or not an int,
            or an unknown ``strategy``.
    """
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 1:
        raise ValueError(f"bins must be an int >= 1, got {bins!r}")
    if strategy not in CALIBRATION_STRATEGIES:
        raise ValueError(f"strategy must be one of {CALIBRATION_STRATEGIES}, got {strategy!r}")
    y, p = _labels_and_probs(labels, probs)
    if len(y) == 0:
        return np.empty(0), np.empty(0), np.empty(0, dtype=np.int64)

    if strategy == "quantile":
        edges = np.quantile(p, np.linspace(0.0, 1.0, bins + 1))
    else:
        edges = np.linspace(0.0, 1.0, bins + 1)
    # Inner edges only: the minimum (or 0) falls in bin 0 and the maximum (or 1) in bin bins - 1.
    bin_of = np.searchsorted(edges[1:-1], p, side="right")  # (N,) in [0, bins)
    count = np.bincount(bin_of, minlength=bins)
    pred_sum = np.bincount(bin_of, weights=p, minlength=bins)
    pos_sum = np.bincount(bin_of, weights=y, minlength=bins)
    keep = count > 0
    return pred_sum[keep] / count[keep], pos_sum[keep] / count[keep], count[keep].astype(np.int64)


# --------------------------------------------------------------------------- reports


def evaluate(
    labels: Mapping[str, np.ndarray],
    probs: Mapping[str, np.ndarray],
    groups: np.ndarray | None = None,
    prefix: str = "",
) -> dict[str, float]:
    """All metrics of every task present in both ``labels`` and ``probs``, as a flat dict for MLflow.

    Keys are ``f"{prefix}{task}/{metric}"`` with metric in ``auc``, ``log_loss``, ``ne``,
    ``calibration``, ``positive_rate``, ``count``, plus ``gauc`` and ``gauc_groups`` (the number of
    groups with both classes, that GAUC averages over) when ``groups`` is given. Tasks come in the
    order of ``labels``; undefined metrics are nan (see each function).

    Args:
        labels: task name -> 0/1 labels, shape (N,) (N may differ between tasks).
        probs: task name -> predicted probabilities, shape (N,) as the task's labels.
        groups: optional group key of each row (user id), shape (N,), for GAUC; every task evaluated
            must then have N rows.
        prefix: prepended to every key, e.g. ``"val/"``.

    Returns:
        The metrics, as Python floats.

    Raises:
        ValueError: when no task is in both mappings, or on invalid arrays (see the metric functions).
    """
    tasks = [task for task in labels if task in probs]
    if not tasks:
        raise ValueError(
            f"labels and probs share no task: labels has {list(labels)}, probs has {list(probs)}"
        )
    out: dict[str, float] = {}
    for task in tasks:
        # Validated once here, so that an error names the task.
        y, p = _labels_and_probs(labels[task], probs[task], f"labels[{task!r}]", f"probs[{task!r}]")
        if groups is not None and len(groups) != len(y):
            raise ValueError(
                f"groups must have one entry per row of task {task!r} ({len(y)}), got {len(groups)}"
            )
        key = f"{prefix}{task}/"
        out[key + "auc"] = auc(y, p)
        if groups is not None:
            detail = gauc_detail(y, p, groups)
            out[key + "gauc"] = detail.value
            out[key + "gauc_groups"] = float(detail.n_groups)
        out[key + "log_loss"] = log_loss(y, p)
        out[key + "ne"] = normalized_entropy(y, p)
        out[key + "calibration"] = calibration(y, p)
        out[key + "positive_rate"] = float(y.mean()) if len(y) else math.nan
        out[key + "count"] = float(len(y))
    return out


def oracle_gap(labels: np.ndarray, probs: np.ndarray, oracle_probs: np.ndarray) -> dict[str, float]:
    """Model AUC against the AUC of the true probabilities on the same rows (synthetic data only).

    On synthetic data the generator knows each row's true probability; its AUC is the best any model
    can reach on these labels, so the gap, not the raw AUC, says how much the model leaves on the table.

    Args:
        labels: 0/1 labels, shape (N,).
        probs: model probabilities in [0, 1], shape (N,).
        oracle_probs: true probabilities in [0, 1], shape (N,).

    Returns:
        ``{"auc": model AUC, "oracle_auc": oracle AUC, "auc_gap": oracle_auc - auc}``.

    Raises:
        ValueError: on non-1-D or mismatched arrays, labels other than 0/1, or probabilities outside
            [0, 1] (naming ``probs`` or ``oracle_probs``).
    """
    y, p = _labels_and_probs(labels, probs)
    oracle = _probs(oracle_probs, name="oracle_probs")
    _check_lengths(labels=y, oracle_probs=oracle)
    model_auc, oracle_auc = auc(y, p), auc(y, oracle)
    return {"auc": model_auc, "oracle_auc": oracle_auc, "auc_gap": oracle_auc - model_auc}
