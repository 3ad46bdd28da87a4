"""Metrics against brute-force references, hand-computed golden values and TorchRec's functional metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchrec.metrics.auc import compute_auc
from torchrec.metrics.calibration import compute_calibration, get_calibration_states
from torchrec.metrics.gauc import compute_gauc_3d
from torchrec.metrics.ne import compute_logloss, compute_ne, get_ne_states

from recsys.metrics import (
    GaucResult,
    auc,
    calibration,
    calibration_curve,
    evaluate,
    gauc,
    gauc_detail,
    log_loss,
    normalized_entropy,
    oracle_gap,
)

# --------------------------------------------------------------------------- references


def brute_force_auc(labels, scores, weights=None) -> float:
    """Every (positive, negative) pair: 1 if the positive is scored higher, 1/2 on a tie."""
    weights = np.ones(len(labels)) if weights is None else weights
    num = den = 0.0
    for i in range(len(labels)):
        for j in range(len(labels)):
            if labels[i] == 1 and labels[j] == 0:
                pair = weights[i] * weights[j]
                num += pair * (1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0)
                den += pair
    return num / den if den > 0 else math.nan


def mann_whitney_auc(labels, scores) -> float:
    """(R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg) with mid-ranks, ranks counted one row at a time."""
    ranks = [sum(t < s for t in scores) + (sum(t == s for t in scores) + 1) / 2 for s in scores]
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    r_pos = sum(r for r, y in zip(ranks, labels, strict=True) if y == 1)
    return (r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def loop_gauc(labels, scores, groups) -> tuple[float, int, int]:
    """Plain per-user loop: (impression-weighted mean AUC, groups used, rows used)."""
    total = rows = used = 0
    for g in np.unique(groups):
        mask = groups == g
        y = labels[mask]
        if 0 < y.sum() < len(y):
            total += brute_force_auc(y, scores[mask]) * len(y)
            rows += len(y)
            used += 1
    return (total / rows if rows else math.nan), used, rows


def random_case(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random(n), 1)  # one decimal: many ties
    labels = (rng.random(n) < scores).astype(np.int64)
    return labels, scores


# --------------------------------------------------------------------------- auc

AUC_CASES = [
    # (labels, scores, golden)
    ([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], 1.0),
    ([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4], 0.0),
    ([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5], 0.5),
    ([1, 0, 1, 0], [0.9, 0.2, 0.6, 0.6], 0.875),  # 1 + 1 + 1 + 1/2 over 4 pairs
    ([0, 1, 0, 1, 1], [1.0, 2.0, 2.0, 3.0, 1.0], 4 / 6),  # (1 + 1/2) + 2 + 1/2 over 6 pairs
    ([1, 0], [-3.0, 5.0], 0.0),  # scores need not be probabilities
]


@pytest.mark.parametrize(("labels", "scores", "golden"), AUC_CASES)
def test_auc_hand_cases(labels, scores, golden):
    assert auc(np.array(labels), np.array(scores)) == pytest.approx(golden, abs=1e-12)
    assert brute_force_auc(labels, scores) == pytest.approx(golden, abs=1e-12)
    assert mann_whitney_auc(labels, scores) == pytest.approx(golden, abs=1e-12)


def test_auc_weighted_hand_case():
    # Pairs (pos 0.5 w=2) x (neg 0.7 w=1): 0, x (neg 0.2 w=3): 2*3 = 6; total pair weight 2 * 4 = 8.
    labels, scores, weights = np.array([1, 0, 0]), np.array([0.5, 0.7, 0.2]), np.array([2.0, 1.0, 3.0])
    assert auc(labels, scores, weights) == pytest.approx(0.75, abs=1e-12)
    # Integer weights are the same as repeating rows.
    reps = weights.astype(int)
    assert auc(labels, scores, weights) == pytest.approx(
        auc(np.repeat(labels, reps), np.repeat(scores, reps))
    )


def test_auc_matches_references_on_random_ties_and_weights():
    labels, scores = random_case(200, seed=0)
    weights = np.random.default_rng(1).uniform(0.0, 3.0, size=200)
    assert auc(labels, scores) == pytest.approx(mann_whitney_auc(labels, scores), abs=1e-12)
    assert auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)
    assert auc(labels, scores, weights) == pytest.approx(brute_force_auc(labels, scores, weights), abs=1e-12)


def test_auc_is_rank_based():
    labels, scores = random_case(100, seed=2)
    probs = np.clip(scores, 0.05, 0.95)
    logits = np.log(probs / (1 - probs))
    assert auc(labels, logits) == pytest.approx(auc(labels, probs), abs=1e-12)
    perm = np.random.default_rng(3).permutation(100)
    assert auc(labels[perm], probs[perm]) == pytest.approx(auc(labels, probs), abs=1e-12)


@pytest.mark.parametrize(
    ("labels", "scores", "weights"),
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], None),
        ([0, 0], [0.1, 0.2], None),
        ([], [], None),
        ([1, 0, 0], [0.1, 0.2, 0.3], [0.0, 1.0, 1.0]),  # the only positive has weight 0
    ],
)
def test_auc_single_class_is_nan(labels, scores, weights):
    w = None if weights is None else np.array(weights)
    assert math.isnan(auc(np.array(labels), np.array(scores, dtype=float), w))


def test_auc_accepts_bool_and_float_labels():
    scores = np.array([0.9, 0.2, 0.6, 0.6])
    expected = auc(np.array([1, 0, 1, 0]), scores)
    assert auc(np.array([True, False, True, False]), scores) == expected
    assert auc(np.array([1.0, 0.0, 1.0, 0.0], dtype=np.float32), scores) == expected


# --------------------------------------------------------------------------- gauc


def test_gauc_hand_case():
    # a: pos 0.3 vs negs 0.3 (1/2) and 0.1 (1) -> 0.75 on 3 rows; b: pos 0.4 below neg 0.9 -> 0 on 2 rows;
    # c (all negative) and d (one positive) are skipped: (3 * 0.75 + 2 * 0) / 5 = 0.45.
    groups = np.array(["a", "b", "c", "a", "d", "b", "a", "c"])
    labels = np.array([1, 0, 0, 0, 1, 1, 0, 0])
    scores = np.array([0.3, 0.9, 0.5, 0.3, 0.8, 0.4, 0.1, 0.2])
    assert gauc_detail(labels, scores, groups) == GaucResult(
        value=pytest.approx(0.45, abs=1e-12), n_groups=2, n_rows=5, n_groups_total=4
    )
    assert gauc(labels, scores, groups) == pytest.approx(0.45, abs=1e-12)


def test_gauc_matches_per_user_loop():
    labels, scores = random_case(300, seed=4)
    groups = np.random.default_rng(5).integers(1000, 1040, size=300)  # ~7 rows per user, some one-class
    value, used, rows = loop_gauc(labels, scores, groups)
    detail = gauc_detail(labels, scores, groups)
    assert detail.value == pytest.approx(value, abs=1e-12)
    assert (detail.n_groups, detail.n_rows, detail.n_groups_total) == (used, rows, 40)
    assert 0 < used < 40  # the case does exercise skipped groups


def test_gauc_of_one_group_is_auc():
    labels, scores = random_case(50, seed=6)
    assert gauc(labels, scores, np.zeros(50, dtype=int)) == pytest.approx(auc(labels, scores), abs=1e-12)


def test_gauc_without_usable_group_is_nan():
    detail = gauc_detail(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.3, 0.4]), np.array([1, 1, 2, 2]))
    assert math.isnan(detail.value)
    assert (detail.n_groups, detail.n_rows, detail.n_groups_total) == (0, 0, 2)
    empty = gauc_detail(np.array([], dtype=int), np.array([]), np.array([], dtype=int))
    assert math.isnan(empty.value)
    assert (empty.n_groups, empty.n_rows, empty.n_groups_total) == (0, 0, 0)


# --------------------------------------------------------------------------- probabilities


def test_log_loss_golden():
    assert log_loss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(0.3669845875401002, rel=1e-12)
    # A confident mistake is clipped to eps = 1e-7: -ln(1e-7).
    assert log_loss(np.array([1]), np.array([0.0])) == pytest.approx(16.11809565095832, rel=1e-12)
    assert math.isnan(log_loss(np.array([], dtype=int), np.array([])))


def test_log_loss_matches_torch_bce():
    labels, scores = random_case(100, seed=7)
    probs = np.clip(scores, 0.01, 0.99)
    bce = torch.nn.functional.binary_cross_entropy(
        torch.tensor(probs), torch.tensor(labels, dtype=torch.float64)
    )
    assert log_loss(labels, probs) == pytest.approx(bce.item(), rel=1e-12)


def test_normalized_entropy_golden():
    labels, probs = np.array([1, 0, 0, 0]), np.array([0.5, 0.2, 0.2, 0.1])
    # log loss 0.3111986997115478 over the entropy of a rate of 1/4, 0.5623351446188083.
    assert normalized_entropy(labels, probs) == pytest.approx(0.5534043224748133, rel=1e-12)
    # Predicting the observed rate everywhere is the baseline: NE = 1.
    assert normalized_entropy(labels, np.full(4, 0.25)) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0], []])
def test_normalized_entropy_single_class_is_nan(labels):
    assert math.isnan(normalized_entropy(np.array(labels, dtype=int), np.full(len(labels), 0.5)))


def test_calibration_golden():
    labels = np.array([1, 0, 0, 0])
    assert calibration(labels, np.array([0.5, 0.2, 0.2, 0.1])) == pytest.approx(1.0, rel=1e-12)
    assert calibration(labels, np.full(4, 0.4)) == pytest.approx(1.6, rel=1e-12)
    assert math.isnan(calibration(np.zeros(3, dtype=int), np.full(3, 0.1)))
    assert math.isnan(calibration(np.array([], dtype=int), np.array([])))


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_calibration_curve_golden(strategy):
    labels, probs = np.array([0, 1, 1, 1]), np.array([0.1, 0.2, 0.6, 0.9])
    mean_pred, rate, count = calibration_curve(labels, probs, bins=2, strategy=strategy)
    np.testing.assert_allclose(mean_pred, [0.15, 0.75])
    np.testing.assert_allclose(rate, [0.5, 1.0])
    np.testing.assert_array_equal(count, [2, 2])
    assert count.dtype == np.int64


def test_calibration_curve_edges_and_empty_bins():
    # Uniform: 0 and 1 land in the first and last bins; the middle bins are empty and dropped.
    mean_pred, rate, count = calibration_curve(
        np.array([0, 1, 1]), np.array([0.0, 1.0, 1.0]), bins=4, strategy="uniform"
    )
    np.testing.assert_allclose(mean_pred, [0.0, 1.0])
    np.testing.assert_allclose(rate, [0.0, 1.0])
    np.testing.assert_array_equal(count, [1, 2])
    # Quantile bins collapse on tied predictions.
    _, _, count = calibration_curve(np.array([0, 1, 0, 0]), np.full(4, 0.1), bins=4)
    np.testing.assert_array_equal(count, [4])
    # Every row lands in exactly one bin.
    labels, scores = random_case(200, seed=8)
    _, rate, count = calibration_curve(labels, scores, bins=7)
    assert count.sum() == 200
    assert np.sum(rate * count) == pytest.approx(labels.sum())
    assert all(len(a) == 0 for a in calibration_curve(np.array([], dtype=int), np.array([])))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"bins": 0}, "bins"), ({"bins": 2.0}, "bins"), ({"strategy": "kmeans"}, "strategy")],
)
def test_calibration_curve_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibration_curve(np.array([0, 1]), np.array([0.2, 0.8]), **kwargs)


# --------------------------------------------------------------------------- reports


def test_evaluate_golden():
    labels = {"click": np.array([1, 0, 1, 0]), "purchase": np.array([1, 0, 0, 0]), "only_labels": np.ones(4)}
    probs = {
        "click": np.array([0.9, 0.2, 0.6, 0.6]),
        "purchase": np.array([0.5, 0.2, 0.2, 0.1]),
        "only_probs": np.ones(4),
    }
    metrics = evaluate(labels, probs, groups=np.array([7, 7, 8, 8]), prefix="val/")
    metrics_keys = ["auc", "gauc", "gauc_groups", "log_loss", "ne", "calibration", "positive_rate", "count"]
    assert list(metrics) == [f"val/{task}/{m}" for task in ("click", "purchase") for m in metrics_keys]
    assert all(type(v) is float for v in metrics.values())
    assert metrics["val/click/auc"] == pytest.approx(0.875)
    assert metrics["val/click/gauc"] == pytest.approx(0.75)  # user 7: 1.0, user 8: tie 0.5
    assert metrics["val/click/gauc_groups"] == 2.0
    assert metrics["val/click/calibration"] == pytest.approx(1.15)
    assert metrics["val/purchase/ne"] == pytest.approx(0.5534043224748133)
    assert metrics["val/purchase/gauc_groups"] == 1.0  # user 8 has no purchase
    assert metrics["val/purchase/positive_rate"] == 0.25
    assert metrics["val/purchase/count"] == 4.0


def test_evaluate_without_groups_has_no_gauc():
    metrics = evaluate({"click": np.array([1, 0])}, {"click": np.array([0.7, 0.2])})
    assert sorted(metrics) == sorted(
        f"click/{m}" for m in ["auc", "log_loss", "ne", "calibration", "positive_rate", "count"]
    )


def test_evaluate_errors_name_the_task():
    with pytest.raises(ValueError, match="share no task"):
        evaluate({"click": np.array([1])}, {"purchase": np.array([0.5])})
    with pytest.raises(ValueError, match=r"labels\['click'\] must be 0 or 1, got 2"):
        evaluate({"click": np.array([1, 2])}, {"click": np.array([0.5, 0.5])})
    with pytest.raises(ValueError, match="groups.*'click'"):
        evaluate({"click": np.array([1, 0])}, {"click": np.array([0.5, 0.5])}, groups=np.array([1, 2, 3]))


def test_oracle_gap_golden():
    labels = np.array([1, 0, 1, 0])
    # Model: pos 0.4 beats only the neg 0.2, pos 0.7 beats both -> 3/4; oracle ranks perfectly.
    gap = oracle_gap(labels, np.array([0.4, 0.6, 0.7, 0.2]), np.array([0.9, 0.1, 0.8, 0.2]))
    assert gap == pytest.approx({"auc": 0.75, "oracle_auc": 1.0, "auc_gap": 0.25})


# --------------------------------------------------------------------------- validation

Y, P = np.array([1, 0, 1]), np.array([0.2, 0.5, 0.9])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: auc(Y, P[:2]), r"same length.*'scores': 2"),
        (lambda: auc(Y, P, np.ones(2)), r"same length.*'weights': 2"),
        (lambda: auc(np.array([0, 2, 1]), P), r"labels must be 0 or 1, got 2 at index 1"),
        (lambda: auc(np.array([0.0, np.nan, 1.0]), P), "labels must be 0 or 1, got nan"),
        (lambda: auc(np.array(["1", "0", "1"]), P), "labels must be numeric or boolean, got dtype <U1"),
        (lambda: auc(Y[None, :], P), r"labels must be a 1-D array, got shape \(1, 3\)"),
        (lambda: auc(Y, np.array([0.1, np.inf, 0.3])), "scores must be finite, got inf"),
        (lambda: auc(Y, P, np.array([1.0, -1.0, 1.0])), r"weights must be finite and >= 0, got -1\.0"),
        (lambda: gauc(Y, P, np.array([1, 2])), r"same length.*'groups': 2"),
        (
            lambda: gauc(np.array([3, 0, 1]), P, np.array([1, 1, 2])),
            r"labels must be 0 or 1, got 3 at index 0",
        ),
        (lambda: log_loss(Y, np.array([0.2, 1.5, 0.9])), r"probs must lie in \[0, 1\], got 1\.5 at index 1"),
        (lambda: log_loss(Y, np.array([0.2, np.nan, 0.9])), r"probs must lie in \[0, 1\], got nan"),
        (lambda: log_loss(np.array([1, -1, 0]), P), r"labels must be 0 or 1, got -1 at index 1"),
        (lambda: log_loss(Y, P, eps=0.0), "eps must lie in"),
        (lambda: log_loss(Y, P[:1]), r"same length.*'probs': 1"),
        (lambda: normalized_entropy(Y, np.array([-0.1, 0.5, 0.9])), r"probs must lie in \[0, 1\], got -0\.1"),
        (lambda: calibration(Y, np.array([0.2, 0.5, 2.0])), r"probs must lie in \[0, 1\], got 2\.0"),
        (lambda: oracle_gap(Y, P, np.array([0.2, 0.5, 7.0])), r"oracle_probs must lie in \[0, 1\], got 7\.0"),
        (lambda: oracle_gap(Y, P, P[:2]), r"same length.*'oracle_probs': 2"),
    ],
)
def test_validation_names_argument_and_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- torchrec


def torchrec_auc(labels, scores, weights) -> float:
    def row(a):
        return [torch.tensor(a, dtype=torch.float64)[None, :]]

    return compute_auc(1, row(scores), row(labels), row(weights)).item()


def test_torchrec_auc_agrees_without_ties():
    rng = np.random.default_rng(9)
    scores = rng.random(500)  # continuous: no ties
    labels = (rng.random(500) < scores).astype(np.int64)
    weights = rng.uniform(0.5, 2.0, size=500)
    assert auc(labels, scores, weights) == pytest.approx(torchrec_auc(labels, scores, weights), abs=1e-10)
    assert auc(labels, scores) == pytest.approx(torchrec_auc(labels, scores, np.ones(500)), abs=1e-10)


def test_torchrec_auc_orders_ties_by_sort_instead_of_averaging():
    # TorchRec's result depends on how argsort orders tied scores: anything between counting ties as
    # losses and counting them as wins. Ours is the Mann-Whitney midpoint.
    labels, scores = random_case(200, seed=10)
    theirs = torchrec_auc(labels, scores, np.ones(200))
    n_pos, n_neg = labels.sum(), len(labels) - labels.sum()
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() / (n_pos * n_neg)
    ties = (pos[:, None] == neg[None, :]).sum() / (n_pos * n_neg)
    assert wins - 1e-12 <= theirs <= wins + ties + 1e-12
    assert auc(labels, scores) == pytest.approx(wins + ties / 2, abs=1e-12)
    # Single class: TorchRec says 0.5, we say nan.
    assert torchrec_auc(np.ones(3), np.array([0.1, 0.2, 0.3]), np.ones(3)) == 0.5


def test_torchrec_gauc_agrees_on_equal_sized_groups_without_ties():
    # compute_gauc_3d takes the unweighted mean over groups, which is the impression-weighted mean
    # when all groups have the same size.
    rng = np.random.default_rng(11)
    n_groups, size = 30, 6
    scores = rng.uniform(0.01, 1.0, size=(n_groups, size))  # no exact 0: TorchRec reads it as padding
    labels = (rng.random((n_groups, size)) < scores).astype(np.int64)
    labels[:3] = 0  # three single-class groups, that both sides skip
    out = compute_gauc_3d(
        torch.tensor(scores[None]),
        torch.tensor(labels[None], dtype=torch.float64),
        torch.ones(1, n_groups, size),
    )
    theirs = (out["auc_sum"] / out["num_samples"]).item()
    groups = np.repeat(np.arange(n_groups), size)
    detail = gauc_detail(labels.ravel(), scores.ravel(), groups)
    assert detail.n_groups == out["num_samples"].item() < n_groups
    assert detail.value == pytest.approx(theirs, abs=1e-8)  # TorchRec adds 1e-10 to each denominator


def test_torchrec_ne_log_loss_and_calibration_agree():
    labels, scores = random_case(300, seed=12)
    probs = np.clip(scores, 0.0, 1.0)  # includes exact 0 and 1: both sides clip with the same eps
    y, p = torch.tensor(labels[None], dtype=torch.float64), torch.tensor(probs[None])
    # clone(): TorchRec clamps float64 predictions in place (.double() returns the same tensor).
    states = get_ne_states(y, p.clone(), torch.ones_like(y), eta=1e-7)
    ne = compute_ne(
        states["cross_entropy_sum"],
        states["weighted_num_samples"],
        states["pos_labels"],
        states["neg_labels"],
        eta=1e-7,
    )
    assert normalized_entropy(labels, probs) == pytest.approx(ne.item(), rel=1e-10)
    bits = compute_logloss(states["cross_entropy_sum"], states["pos_labels"], states["neg_labels"], eta=1e-7)
    assert log_loss(labels, probs) / math.log(2) == pytest.approx(bits.item(), rel=1e-10)  # TorchRec: log2
    cal = compute_calibration(**get_calibration_states(y, p, torch.ones_like(y)))
    assert calibration(labels, probs) == pytest.approx(cal.item(), rel=1e-12)
