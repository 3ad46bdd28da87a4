"""The truth of each impression (its world's terms, the two probabilities) and the labels drawn from it.

See :mod:`synth.world` for the model and :mod:`synth.worlds` for the worlds; :func:`calibrate` solves its
two biases on a pilot day.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cached_property

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
from synth.worlds import PEAK_HOUR, WEEKEND_LIFT, World


def _standardized(effect: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``effect`` shifted and scaled to mean 0, variance 1 under the sampling probabilities ``probs``."""
    probs = probs / probs.sum()
    mean = float(effect @ probs)
    sd = math.sqrt(float(((effect - mean) ** 2) @ probs))
    return (effect - mean) / sd


_DEVICE_Z = _standardized(DEVICE_EFFECT, np.asarray(DEVICE_PROBS))
_PAGE_Z = _standardized(PAGE_EFFECT, np.asarray(PAGE_PROBS))
_HOUR_Z = _standardized(np.cos(2 * np.pi * (np.arange(24) - 21) / 24), HOUR_PROBS)


class Rows:
    """One chunk's impressions with what their terms read: users, items, history, and shared lookups."""

    def __init__(self, imps: Impressions, users: Users, items: Items, last_click_top: np.ndarray) -> None:
        self.imps, self.users, self.items = imps, users, items
        self.user, self.item = imps.user, imps.item  # (N,) 0-based indices
        self.last_click_top = last_click_top  # (U,) top category of each user's latest earlier-day click

    @cached_property
    def top(self) -> np.ndarray:
        """(N,) top category of the item shown."""
        return self.items.top[self.item]

    @cached_property
    def hour(self) -> np.ndarray:
        """(N,) hour of day, UTC."""
        return (self.imps.ts_us // US_PER_HOUR) % 24

    def age_days(self) -> np.ndarray:
        """(N,) days since the item's listing."""
        return (self.imps.ts_us - self.items.listing_us[self.item]) / US_PER_DAY

    def is_weekend(self) -> np.ndarray:
        """(N,) bool: a Saturday or Sunday (1970-01-01, day 0 of the epoch, was a Thursday)."""
        return (self.imps.ts_us // US_PER_DAY + 3) % 7 >= 5


_PEAK_HOUR = np.asarray(PEAK_HOUR)
_WEEKEND_LIFT = np.asarray(WEEKEND_LIFT)

RAW_TERMS: dict[str, Callable[[Rows], np.ndarray]] = {
    "propensity": lambda r: r.users.propensity[r.user],
    "quality": lambda r: r.items.quality[r.item],
    "affinity": lambda r: r.users.log_pref[r.user * N_TOP + r.top],
    "history": lambda r: (r.last_click_top[r.user] == r.top).astype(np.float64),
    "price": lambda r: -r.users.price_sensitivity[r.user] * r.items.log_price_dev[r.item],
    "rating": lambda r: r.items.rating_centered[r.item],
    "novelty": lambda r: np.exp(-r.age_days() / 14.0),
    "device": lambda r: _DEVICE_Z[r.imps.device],
    "page": lambda r: _PAGE_Z[r.imps.page],
    "hour": lambda r: _HOUR_Z[r.hour],
    "member": lambda r: r.users.member[r.user].astype(np.float64),
    "relative_price": lambda r: -r.items.log_price_dev[r.item],
    "daypart": lambda r: np.cos(2 * np.pi * (r.hour - _PEAK_HOUR[r.top]) / 24),
    "weekend": lambda r: r.is_weekend() * _WEEKEND_LIFT[r.top],
}
"""Raw value of each term a world may use, (N,) float64 per impression (see :mod:`synth.worlds`)."""


def components(world: World, rows: Rows) -> list[np.ndarray]:
    """The world's standardized terms ``z`` (each (N,) float64), in the order of ``world.terms``."""
    return [(RAW_TERMS[t.name](rows) - t.center) / t.scale for t in world.terms]


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
    world: World,
    users: Users,
    items: Items,
    days: int,
    w_click: np.ndarray,
    w_purchase: np.ndarray,
) -> tuple[float, float]:
    """Biases ``(b_c, b_p)`` hitting TARGET_CTR and TARGET_CVR on pilot days mid-window.

    The pilot is ``world.pilot_days`` consecutive days (PILOT_ROWS in all; a week where a term depends on the
    day of the week). Its users get a synthetic click history (70% a top category drawn from their
    preference), close to what they accumulate after a few days, so the real rates stay near the targets
    over the window.
    """
    n_users = len(users.propensity)
    k = min(world.pilot_days, days)
    first = min(max(0, days // 2 - k // 2), days - k)
    pilots = [
        simulate_requests(rng, users, items, Chunk(d, 0.0, 1.0, PILOT_ROWS // k))
        for d in range(first, first + k)
    ]
    history = preferred_top(users, np.arange(n_users), rng.random(n_users))
    history = np.where(rng.random(n_users) < 0.7, history, -1)
    logits = [
        _logits(components(world, Rows(pilot, users, items, history)), pilot.position, w_click, w_purchase)
        for pilot in pilots
    ]
    click, purchase = (np.concatenate(parts) for parts in zip(*logits, strict=True))
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
