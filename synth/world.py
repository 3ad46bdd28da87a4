"""The simulated world's fixed parameters, its truth model, and the sampling primitives the tables share.

This docstring describes the ``default`` world; the other worlds of the family (:mod:`synth.worlds`) share its
catalogue, users and traffic and change the terms of the truth, the preferences' concentration and the sizes.

The world
---------
* Items: 20 top categories with 10 leaf categories each (``category_id`` 1..200, leaf popularity skewed).
  Popularity is Zipf-like, ``rank**-1.1`` over a random permutation. Price is lognormal around a median
  set per leaf category (top-category level ``exp(N(log 35, 0.9))`` times a leaf factor ``exp(N(0, 0.5))``),
  so categories differ a lot in price. A latent quality ``q_i ~ N(0, 0.4)`` is partly the brand's
  (``0.6 * q_brand + 0.8 * noise``), and the rating (null for ~20% of items) is ``4 + 0.9 q_i + noise``
  clipped to [1, 5]. Most items were listed 60..720 days before the window; a quarter arrive at a steady
  rate from 60 days before it to its end, and an item is shown only from its listing on.
* Users: age bucket, gender, city (Zipf over 50), member level 0..4, sign-up date, and latent traits: an
  activity weight (lognormal, who makes requests), a preference ``pref[u] ~ Dirichlet(0.5)`` over the top
  categories, a price sensitivity ``s_u`` (lognormal, mean 0.6) and a propensity ``a_u ~ N(0, 0.3)``.
* Requests: sessions (activity-weighted user, mostly the user's usual device) start at times drawn from a
  diurnal profile with an evening peak, and hold ~3 page views (geometric) ~50 s apart. Each page view is a
  request with a page type and 4..12 items (mostly 10) at positions 1..n. Each slot shows, with probability
  0.7, an item of a top category drawn from ``pref[u]``, picked by popularity within that category;
  otherwise an item by global popularity. Repeats within a request are redrawn (a repeat may survive
  rarely, when the catalogue is tiny).

The truth
---------
For impression ``(u, i)`` at time ``t`` and position ``pos``, ten components ``z`` are built, each shifted
and scaled by fixed constants to roughly zero mean and unit spread over impressions (see ``Z_CENTER``
and ``Z_SCALE``). Everything is learnable from the contract's columns and features
derived from them:

====  ===========  ======================================================================  ========
k     name         raw value                                                               w_click
====  ===========  ======================================================================  ========
0     propensity   ``a_u`` (the user id)                                                   0.45
1     quality      ``q_i`` (the item id; partly brand and rating)                          0.45
2     affinity     ``log(max(20 * pref[u, topcat(i)], 0.05))`` (user id x top category)    0.45
3     history      1 if ``topcat(i)`` is the top category of the user's most recent click  0.30
                   on an earlier day (UTC; clicks of the same day do not count yet), else 0
4     price        ``-s_u * (log price_i - log median price of i's leaf category)``        0.30
5     rating       ``rating_i - 4`` (0 when null)                                          0.20
6     novelty      ``exp(-item_age_days / 14)``, age = ``ts - listing_ts``                 0.15
7     device       app 1.0, web 0.2, mweb -0.6                                             0.15
8     page         home -0.6, search 0.8, category 0.3, pdp 0.6, cart 0.4                  0.25
9     hour         ``cos(2 pi (hour - 21) / 24)``                                          0.10
====  ===========  ======================================================================  ========

* ``logit p_click = b_c + w_c . z - 0.7 log(pos)`` (position bias on clicks only).
* ``logit p_purchase_given_click = b_p + w_p . z`` with
  ``w_p = rho * w_c + sqrt(1 - rho**2) * w_perp``, where ``w_perp`` is the fixed direction
  ``v = (0.2, 0.5, 0.1, 0.1, 1.0, 0.7, -0.2, 0.2, 0.5, 0.0)`` (price, rating and quality heavy) made
  orthogonal to ``w_c`` by Gram-Schmidt and scaled to ``|w_c|``; ``rho`` is ``task_correlation``. So
  ``rho = 1`` gives both tasks the same ranking signal, ``rho = 0`` an unrelated one, ``rho = -1`` the
  opposite one.
* ``p_purchase = p_click * p_purchase_given_click``; labels are ``click ~ Bernoulli(p_click)`` and
  ``purchase = click * Bernoulli(p_purchase_given_click)``: no noise beyond these draws.
* ``b_c`` and ``b_p`` are solved by bisection on a pilot sample of the same world (users with a synthetic
  click history) so that the mean ``p_click`` is ~5% and the click-weighted mean
  ``p_purchase_given_click`` is ~10%. Their values and all weights are returned in :class:`TruthModel`
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

import numpy as np

START = datetime(2026, 1, 1)
"""First instant of the generated window (tz-naive, read as UTC)."""

TOP_CATEGORIES = (
    "apparel", "shoes", "bags", "beauty", "jewelry", "home", "kitchen", "furniture", "garden", "electronics",
    "phones", "computers", "appliances", "toys", "baby", "sports", "outdoors", "books", "grocery", "pets",
)  # fmt: skip
LEAVES_PER_TOP = 10
N_TOP = len(TOP_CATEGORIES)
N_LEAVES = N_TOP * LEAVES_PER_TOP

AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
AGE_PROBS = (0.16, 0.27, 0.22, 0.16, 0.11, 0.08)
GENDERS = ("f", "m", "u")
GENDER_PROBS = (0.49, 0.44, 0.07)
CITIES = tuple(f"city_{k:02d}" for k in range(1, 51))
MEMBER_PROBS = (0.45, 0.25, 0.15, 0.10, 0.05)  # member levels 0..4
DEVICES = ("app", "web", "mweb")
DEVICE_PROBS = (0.55, 0.20, 0.25)
PAGES = ("home", "search", "category", "pdp", "cart")
PAGE_PROBS = (0.35, 0.25, 0.20, 0.15, 0.05)
REQUEST_SIZES = np.arange(4, 13)
REQUEST_SIZE_PROBS = (0.03, 0.03, 0.04, 0.05, 0.08, 0.12, 0.45, 0.10, 0.10)
# Traffic by hour of day (UTC): quiet at night, evening peak around 20:00-22:00.
HOUR_WEIGHTS = (
    0.35, 0.20, 0.12, 0.08, 0.07, 0.10, 0.25, 0.50, 0.70, 0.80, 0.85, 0.90,
    0.95, 0.90, 0.85, 0.85, 0.90, 0.95, 1.10, 1.35, 1.55, 1.60, 1.30, 0.80,
)  # fmt: skip
WEEKEND_TRAFFIC = 1.15  # Saturdays and Sundays get 15% more page views than weekdays

PREFERRED_SHARE = 0.7  # share of slots filled from a top category the user prefers
MEAN_PAGEVIEWS = 3.0  # per session, geometric
MEAN_GAP_S = 50.0  # seconds between page views of a session, exponential
USUAL_DEVICE_SHARE = 0.8  # sessions on the user's usual device
PILOT_ROWS = 200_000
TARGET_CTR = 0.05
TARGET_CVR = 0.10  # purchase given click

COMPONENTS = (
    "propensity", "quality", "affinity", "history", "price", "rating", "novelty", "device", "page", "hour",
)  # fmt: skip
W_CLICK = np.array([0.45, 0.45, 0.45, 0.30, 0.30, 0.20, 0.15, 0.15, 0.25, 0.10])
PURCHASE_DIRECTION = np.array([0.2, 0.5, 0.1, 0.1, 1.0, 0.7, -0.2, 0.2, 0.5, 0.0])
POSITION_BIAS = 0.7  # click logit gets -POSITION_BIAS * log(position)
DEVICE_EFFECT = np.array([1.0, 0.2, -0.6])
PAGE_EFFECT = np.array([-0.6, 0.8, 0.3, 0.6, 0.4])
# Centre and scale of the raw affinity, history, price, rating and novelty values over impressions,
# measured once on the last 20 days of a 2M-impression world (seed 0) and frozen, so the truth never
# depends on a run's own statistics. Propensity and quality use their prior sd; device, page and hour are
# standardized exactly in synth.truth. History (~7.5% of impressions) and novelty (~3% fresh) are rare,
# so scaled up.
Z_CENTER = np.array([0.0, 0.0, 0.18, 0.075, 0.0, -0.03, 0.025, 0.0, 0.0, 0.0])
Z_SCALE = np.array([0.3, 0.4, 1.31, 0.26, 0.36, 0.53, 0.10, 1.0, 1.0, 1.0])

US_PER_S = 1_000_000
US_PER_DAY = 86_400 * US_PER_S
US_PER_HOUR = 3_600 * US_PER_S
_EPOCH = datetime(1970, 1, 1)

HOUR_PROBS = np.asarray(HOUR_WEIGHTS) / np.sum(HOUR_WEIGHTS)


@dataclass(frozen=True)
class TruthModel:
    """The exact model the labels are drawn from (see the module docstring).

    Attributes:
        task_correlation: ``rho``, the cosine between the click and purchase weight vectors.
        bias_click: ``b_c``.
        bias_purchase: ``b_p`` (of purchase given click).
        w_click: ``w_c``, one weight per entry of ``components``.
        w_purchase: ``w_p``, one weight per entry of ``components``.
        position_bias: click logit gets ``-position_bias * log(position)``.
        components: the world's terms, in order (this world's ``COMPONENTS`` by default).
    """

    task_correlation: float
    bias_click: float
    bias_purchase: float
    w_click: tuple[float, ...]
    w_purchase: tuple[float, ...]
    position_bias: float = POSITION_BIAS
    components: tuple[str, ...] = COMPONENTS

    def to_json(self) -> str:
        """The model as a JSON object, components named."""
        return json.dumps(asdict(self), sort_keys=True)


def purchase_weights(
    task_correlation: float, w_click: np.ndarray = W_CLICK, direction: np.ndarray = PURCHASE_DIRECTION
) -> np.ndarray:
    """``w_p = rho * w_c + sqrt(1 - rho**2) * w_perp``, with ``|w_perp| = |w_c|`` and ``w_perp . w_c = 0``.

    Args:
        task_correlation: ``rho`` in [-1, 1].
        w_click: (K,) ``w_c`` (this world's ``W_CLICK`` by default).
        direction: (K,) the purchase direction ``w_perp`` is made from (not parallel to ``w_click``).

    Returns:
        (K,) float64, one weight per term; ``|w_p| = |w_c|``.

    Raises:
        ValueError: if ``task_correlation`` is outside [-1, 1] or not finite.
    """
    try:
        rho = float(task_correlation)
    except (TypeError, ValueError):
        rho = math.nan
    if isinstance(task_correlation, bool) or not (math.isfinite(rho) and -1.0 <= rho <= 1.0):
        raise ValueError(f"task_correlation: must be in [-1, 1], got {task_correlation!r}")
    norm = np.linalg.norm(w_click)
    unit = w_click / norm
    perp = direction - (direction @ unit) * unit
    perp *= norm / np.linalg.norm(perp)
    return rho * w_click + math.sqrt(max(0.0, 1.0 - rho * rho)) * perp


def zipf_weights(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """(n,) weights ``rank**-exponent`` over a random permutation of the ranks 1..n."""
    return (rng.permutation(n) + 1.0) ** -exponent


def normalized_cdf(weights: np.ndarray) -> np.ndarray:
    """Normalized cumulative sum with the last entry exactly 1, for ``searchsorted`` draws."""
    cdf = np.cumsum(weights, dtype=np.float64)
    cdf /= cdf[-1]
    cdf[-1] = 1.0
    return cdf


def draw(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    """(n,) int64 indices drawn from the categorical distribution with cumulative probabilities ``cdf``."""
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1).astype(np.int64)


def days_before(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    """(n,) int64 microseconds before ``START``: a log-uniform number of days in [low, high]."""
    days = np.exp(rng.uniform(math.log(low), math.log(high), n))
    return (timestamp_us(START) - np.round(days * US_PER_DAY)).astype(np.int64)


def timestamp_us(moment: datetime) -> int:
    """Microseconds since the Unix epoch of a tz-naive datetime."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


@dataclass(frozen=True)
class Guided:
    """A non-decreasing array with a guide table, for fast ``searchsorted(side="right")`` of random queries.

    Binary search over a CDF of millions of entries misses the cache at every step. The guide holds the
    answer for ``len(values)`` evenly spaced queries, so a lookup lands at most a bucket before its answer and
    a short forward scan (one step on average, whatever the distribution) finishes it.
    """

    values: np.ndarray  # (M,) non-decreasing, in [0, span]
    guide: np.ndarray  # (M + 1,) searchsorted(values, b * step, "right") for b = 0..M
    step: float  # span / M

    @classmethod
    def build(cls, values: np.ndarray, span: float) -> Guided:
        """Guide for ``values`` whose queries lie in ``[0, span)``."""
        step = span / len(values)
        return cls(values, np.searchsorted(values, np.arange(len(values) + 1) * step, side="right"), step)

    def search(self, query: np.ndarray) -> np.ndarray:
        """(n,) int64 ``np.searchsorted(values, query, side="right")``, clipped to ``len(values) - 1``."""
        bucket = np.minimum((query / self.step).astype(np.int64), len(self.values) - 1)
        bucket -= bucket * self.step > query  # rounding may pick the next bucket; its guide could overshoot
        last = len(self.values) - 1
        idx = np.minimum(self.guide[bucket], last)
        todo = np.flatnonzero(self.values[idx] <= query)
        while todo.size:
            nxt = idx[todo] + 1
            movable = nxt <= last
            todo, nxt = todo[movable], nxt[movable]
            idx[todo] = nxt
            todo = todo[self.values[nxt] <= query[todo]]
        return idx
