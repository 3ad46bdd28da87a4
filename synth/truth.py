"""The truth of each impression (its ten components, the two probabilities) and the labels drawn from it.

See :mod:`synth.world` for the model; :func:`calibrate` solves its two biases on a pilot day.
"""

from __future__ import annotations

import math

import numpy as np

from synth.tables import Impressions, Items, Users
from synth.traffic import Chunk, preferred_top, simulate_requests
from synth.world import (
    DEVICE_EFFECT,
    DEVICE_PROBS,
    HOUR_PROBS,
    N_TOP,
    PAGE_EFFECT,
    PAGE_PROBS,
    PILOT_ROWS,
    POSITION_BIAS,
    TARGET_CTR,
    TARGET_CVR,
    US_PER_DAY,
    US_PER_HOUR,
    TruthModel,
)


def _standardized(effect: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``effect`` shifted and scaled to mean 0, variance 1 under the sampling probabilities ``probs``."""
    probs = probs / probs.sum()
    mean = float(effect @ probs)
    sd = math.sqrt(float(((effect - mean) ** 2) @ probs))
    return (effect - mean) / sd


_DEVICE_Z = _standardized(DEVICE_EFFECT, np.asarray(DEVICE_PROBS))
_PAGE_Z = _standardized(PAGE_EFFECT, np.asarray(PAGE_PROBS))
_HOUR_Z = _standardized(np.cos(2 * np.pi * (np.arange(24) - 21) / 24), HOUR_PROBS)
# Centre and scale of the raw affinity, history, price, rating and novelty values over impressions,
# measured once on the last 20 days of a 2M-impression world (seed 0) and frozen, so the truth never
# depends on a run's own statistics. Propensity and quality use their prior sd; device, page and hour are
# standardized exactly above. History (~7.5% of impressions) and novelty (~3% fresh) are rare, so scaled up.
_Z_CENTER = np.array([0.0, 0.0, 0.18, 0.075, 0.0, -0.03, 0.025, 0.0, 0.0, 0.0])
_Z_SCALE = np.array([0.3, 0.4, 1.31, 0.26, 0.36, 0.53, 0.10, 1.0, 1.0, 1.0])


def components(imps: Impressions, users: Users, items: Items, last_click_top: np.ndarray) -> list[np.ndarray]:
    """The ten standardized components ``z`` (each (N,) float64), in the order of ``COMPONENTS``."""
    u, i = imps.user, imps.item
    top = items.top[i]
    age_days = (imps.ts_us - items.listing_us[i]) / US_PER_DAY
    hour = (imps.ts_us // US_PER_HOUR) % 24
    raw = [
        users.propensity[u],
        items.quality[i],
        users.log_pref[u * N_TOP + top],
        (last_click_top[u] == top).astype(np.float64),
        -users.price_sensitivity[u] * items.log_price_dev[i],
        items.rating_centered[i],
        np.exp(-age_days / 14.0),
    ]
    z = [(x - c) / s for x, c, s in zip(raw, _Z_CENTER, _Z_SCALE, strict=False)]
    return [*z, _DEVICE_Z[imps.device], _PAGE_Z[imps.page], _HOUR_Z[hour]]


def _logits(
    z: list[np.ndarray], position: np.ndarray, w_click: np.ndarray, w_purchase: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Click and purchase-given-click logits without their biases, each (N,) float64."""
    click = -POSITION_BIAS * np.log(position)
    purchase = np.zeros(len(position))
    for zk, wc, wp in zip(z, w_click, w_purchase, strict=True):
        click += wc * zk
        purchase += wp * zk
    return click, purchase


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _solve_bias(logit: np.ndarray, weight: np.ndarray | None, target: float) -> float:
    """Bias ``b`` with weighted mean of ``sigmoid(b + logit)`` equal to ``target``, found by bisection."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if np.average(_sigmoid(mid + logit), weights=weight) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def calibrate(
    rng: np.random.Generator,
    users: Users,
    items: Items,
    days: int,
    w_click: np.ndarray,
    w_purchase: np.ndarray,
) -> tuple[float, float]:
    """Biases ``(b_c, b_p)`` hitting TARGET_CTR and TARGET_CVR on a pilot day mid-window.

    The pilot's users get a synthetic click history (70% a top category drawn from their preference), close
    to what they accumulate after a few days, so the real rates stay near the targets over the window.
    """
    n_users = len(users.propensity)
    pilot = simulate_requests(rng, users, items, Chunk(days // 2, 0.0, 1.0, PILOT_ROWS))
    history = preferred_top(users, np.arange(n_users), rng.random(n_users))
    history = np.where(rng.random(n_users) < 0.7, history, -1)
    click, purchase = _logits(components(pilot, users, items, history), pilot.position, w_click, w_purchase)
    b_click = _solve_bias(click, None, TARGET_CTR)
    b_purchase = _solve_bias(purchase, _sigmoid(b_click + click), TARGET_CVR)
    return b_click, b_purchase


def draw_labels(
    rng: np.random.Generator, z: list[np.ndarray], position: np.ndarray, model: TruthModel
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The truth and the labels of one chunk.

    Returns:
        ``(p_click, p_purchase_given_click, click, purchase)``, each (N,): two float64, two bool.
    """
    click_logit, purchase_logit = _logits(
        z, position, np.asarray(model.w_click), np.asarray(model.w_purchase)
    )
    p_click = _sigmoid(model.bias_click + click_logit)
    p_given = _sigmoid(model.bias_purchase + purchase_logit)
    click = rng.random(len(p_click)) < p_click
    purchase = click & (rng.random(len(p_click)) < p_given)
    return p_click, p_given, click, purchase


def remember_clicks(last_click_top: np.ndarray, clicks: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Sets, in place, each clicking user's latest clicked top category.

    Within one page view, the clicked slot furthest down the page counts as the latest. ``np.unique`` on the
    reversed rows picks each user's last click without relying on the order of repeated fancy-index
    assignments.

    Args:
        last_click_top: (U,) top category of each user's latest click so far, -1 for none.
        clicks: ``(user, top_category)`` arrays of new clicks, in time order within and across entries.
    """
    if not clicks:
        return
    user = np.concatenate([u for u, _ in clicks])
    top = np.concatenate([t for _, t in clicks])
    users_rev, first = np.unique(user[::-1], return_index=True)
    last_click_top[users_rev] = top[::-1][first]
