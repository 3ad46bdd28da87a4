"""Synthetic e-commerce impressions with click and purchase labels whose true probabilities are known.

:func:`generate` writes four Parquet files into a folder: ``impressions``, ``users`` and ``items`` (the data
contract of :mod:`features.contract`) and ``truth`` (``impression_id``, ``p_click``,
``p_purchase_given_click``, ``p_purchase``), so a model's predictions can be scored against the exact
probabilities the labels were drawn from, not only against the noisy labels.

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
and scaled by fixed constants to roughly zero mean and unit spread over impressions (see ``_Z_CENTER``,
``_Z_SCALE``). Everything is learnable from the contract's columns and features derived from them:

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
  and stored as JSON under the ``truth_model`` key of ``truth.parquet``'s schema metadata.

Determinism: every random draw comes from a ``numpy.random.Generator`` seeded from
``SeedSequence(seed)`` (one child per table, one for the pilot, one per chunk), timestamps start at the fixed
``START`` (2026-01-01 00:00, read as UTC), so one seed gives byte-identical files.

Example:
    >>> result = generate("data/demo", n_impressions=100_000, seed=7)  # doctest: +SKIP
    >>> result.click_rate  # doctest: +SKIP
    0.05...
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

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
DEFAULT_CHUNK_ROWS = 1_000_000
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

_US_PER_S = 1_000_000
_US_PER_DAY = 86_400 * _US_PER_S
_US_PER_HOUR = 3_600 * _US_PER_S
_EPOCH = datetime(1970, 1, 1)


def _standardized(effect: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``effect`` shifted and scaled to mean 0, variance 1 under the sampling probabilities ``probs``."""
    probs = probs / probs.sum()
    mean = float(effect @ probs)
    sd = math.sqrt(float(((effect - mean) ** 2) @ probs))
    return (effect - mean) / sd


_HOUR_PROBS = np.asarray(HOUR_WEIGHTS) / np.sum(HOUR_WEIGHTS)
# Piecewise-constant traffic density: knots of its CDF, for the inverse-CDF draw of times within a day.
_DAY_CDF = np.concatenate([[0.0], np.cumsum(_HOUR_PROBS)])
_DAY_CDF[-1] = 1.0
_DAY_SECONDS = np.arange(25, dtype=np.float64) * 3600.0
_DEVICE_Z = _standardized(DEVICE_EFFECT, np.asarray(DEVICE_PROBS))
_PAGE_Z = _standardized(PAGE_EFFECT, np.asarray(PAGE_PROBS))
_HOUR_Z = _standardized(np.cos(2 * np.pi * (np.arange(24) - 21) / 24), _HOUR_PROBS)
# Centre and scale of the raw affinity, history, price, rating and novelty values over impressions,
# measured once on the last 20 days of a 2M-impression world (seed 0) and frozen, so the truth never
# depends on a run's own statistics. Propensity and quality use their prior sd; device, page and hour are
# standardized exactly above. History (~7.5% of impressions) and novelty (~3% fresh) are rare, so scaled up.
_Z_CENTER = np.array([0.0, 0.0, 0.18, 0.075, 0.0, -0.03, 0.025, 0.0, 0.0, 0.0])
_Z_SCALE = np.array([0.3, 0.4, 1.31, 0.26, 0.36, 0.53, 0.10, 1.0, 1.0, 1.0])


@dataclass(frozen=True)
class TruthModel:
    """The exact model the labels are drawn from (see the module docstring).

    Attributes:
        task_correlation: ``rho``, the cosine between the click and purchase weight vectors.
        bias_click: ``b_c``.
        bias_purchase: ``b_p`` (of purchase given click).
        w_click: ``w_c``, one weight per entry of ``COMPONENTS``.
        w_purchase: ``w_p``, one weight per entry of ``COMPONENTS``.
        position_bias: click logit gets ``-position_bias * log(position)``.
    """

    task_correlation: float
    bias_click: float
    bias_purchase: float
    w_click: tuple[float, ...]
    w_purchase: tuple[float, ...]
    position_bias: float = POSITION_BIAS

    def to_json(self) -> str:
        """The model as a JSON object, components named."""
        return json.dumps({"components": list(COMPONENTS), **asdict(self)}, sort_keys=True)


@dataclass(frozen=True)
class GenerateResult:
    """What :func:`generate` wrote and the label rates it drew.

    Attributes:
        impressions_path: ``impressions.parquet``, the contract's impressions with labels.
        users_path: ``users.parquet``.
        items_path: ``items.parquet``.
        truth_path: ``truth.parquet``: impression_id, p_click, p_purchase_given_click, p_purchase.
        n_impressions: rows of impressions (and of truth).
        n_requests: page views.
        n_users: rows of users.
        n_items: rows of items.
        n_chunks: chunks generated, one or more row groups each.
        click_rate: mean of ``click``.
        purchase_rate: mean of ``purchase``.
        purchase_given_click_rate: purchases per click (NaN without clicks).
        mean_p_click: mean of ``p_click``.
        mean_p_purchase: mean of ``p_purchase``.
        model: the truth model.
    """

    impressions_path: Path
    users_path: Path
    items_path: Path
    truth_path: Path
    n_impressions: int
    n_requests: int
    n_users: int
    n_items: int
    n_chunks: int
    click_rate: float
    purchase_rate: float
    purchase_given_click_rate: float
    mean_p_click: float
    mean_p_purchase: float
    model: TruthModel


def purchase_weights(task_correlation: float) -> np.ndarray:
    """``w_p = rho * w_c + sqrt(1 - rho**2) * w_perp``, with ``|w_perp| = |w_c|`` and ``w_perp . w_c = 0``.

    Args:
        task_correlation: ``rho`` in [-1, 1].

    Returns:
        (10,) float64, one weight per entry of ``COMPONENTS``; ``|w_p| = |w_c|``.

    Raises:
        ValueError: if ``task_correlation`` is outside [-1, 1] or not finite.
    """
    try:
        rho = float(task_correlation)
    except (TypeError, ValueError):
        rho = math.nan
    if isinstance(task_correlation, bool) or not (math.isfinite(rho) and -1.0 <= rho <= 1.0):
        raise ValueError(f"task_correlation: must be in [-1, 1], got {task_correlation!r}")
    norm = np.linalg.norm(W_CLICK)
    unit = W_CLICK / norm
    perp = PURCHASE_DIRECTION - (PURCHASE_DIRECTION @ unit) * unit
    perp *= norm / np.linalg.norm(perp)
    return rho * W_CLICK + math.sqrt(max(0.0, 1.0 - rho * rho)) * perp


def _zipf_weights(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """(n,) weights ``rank**-exponent`` over a random permutation of the ranks 1..n."""
    return (rng.permutation(n) + 1.0) ** -exponent


def _cdf(weights: np.ndarray) -> np.ndarray:
    """Normalized cumulative sum with the last entry exactly 1, for ``searchsorted`` draws."""
    cdf = np.cumsum(weights, dtype=np.float64)
    cdf /= cdf[-1]
    cdf[-1] = 1.0
    return cdf


def _draw(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    """(n,) int64 indices drawn from the categorical distribution with cumulative probabilities ``cdf``."""
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1).astype(np.int64)


def _days_before(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    """(n,) int64 microseconds before ``START``: a log-uniform number of days in [low, high]."""
    days = np.exp(rng.uniform(math.log(low), math.log(high), n))
    return (_us(START) - np.round(days * _US_PER_DAY)).astype(np.int64)


def _us(moment: datetime) -> int:
    """Microseconds since the Unix epoch of a tz-naive datetime."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _strings(values: tuple[str, ...], codes: np.ndarray) -> pa.Array:
    """Plain string array ``values[codes]`` (not dictionary-typed: polars would read that as Categorical)."""
    return pa.array(values, pa.string()).take(pa.array(codes))


@dataclass(frozen=True)
class _Guided:
    """A non-decreasing array with a guide table, for fast ``searchsorted(side="right")`` of random queries.

    Binary search over a CDF of millions of entries misses the cache at every step. The guide holds the
    answer for ``len(values)`` evenly spaced queries, so a lookup lands at most a bucket before its answer and
    a short forward scan (one step on average, whatever the distribution) finishes it.
    """

    values: np.ndarray  # (M,) non-decreasing, in [0, span]
    guide: np.ndarray  # (M + 1,) searchsorted(values, b * step, "right") for b = 0..M
    step: float  # span / M

    @classmethod
    def build(cls, values: np.ndarray, span: float) -> _Guided:
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


@dataclass(frozen=True)
class _Items:
    """Per-item arrays; index ``i`` is ``item_id - 1``."""

    top: np.ndarray  # (I,) int64 top-category index
    quality: np.ndarray  # (I,) float64 q_i
    log_price_dev: np.ndarray  # (I,) log price - log median price of the leaf category
    rating_centered: np.ndarray  # (I,) rating - 4, 0 when null
    listing_us: np.ndarray  # (I,) int64
    popularity: np.ndarray  # (I,) float64 exposure weight once listed
    by_top: np.ndarray  # (I,) item indices sorted by top category
    top_start: np.ndarray  # (20,) first position of each top category in by_top
    top_end: np.ndarray  # (20,) one past its last position


def _listing_times(rng: np.random.Generator, n_items: int, days: int, old: np.ndarray) -> np.ndarray:
    """(I,) int64 listing times: a steady stream of new items through the window, on top of an older stock.

    A quarter of the items (never those flagged ``old``) are listed at a constant rate from 60 days before the
    window to its end, the rest 60..720 days (log-uniform) before it. The constant rate keeps the share of
    fresh items, hence the novelty effect and the click rate, steady across the window.
    """
    stock = np.exp(rng.uniform(math.log(60.0), math.log(720.0), n_items))
    stream = rng.uniform(-days, 60.0, n_items)  # days before START; negative is inside the window
    days_before = np.where((rng.random(n_items) < 0.25) & ~old, stream, stock)
    return (_us(START) - np.round(days_before * _US_PER_DAY)).astype(np.int64)


def _make_items(rng: np.random.Generator, n_items: int, days: int) -> tuple[_Items, pa.Table]:
    """Draws the catalogue: the latent arrays the truth needs and the contract's ``items`` table."""
    leaf_cdf = _cdf(_zipf_weights(rng, N_LEAVES, 0.8))
    # The first N_LEAVES items cover every leaf (the first 20 every top category) and are listed before the
    # window, so no top category is ever empty.
    cover = (np.arange(N_LEAVES) % N_TOP) * LEAVES_PER_TOP + np.arange(N_LEAVES) // N_TOP
    leaf = np.concatenate([cover[:n_items], _draw(rng, leaf_cdf, max(0, n_items - N_LEAVES))])
    order = rng.permutation(n_items)
    leaf = leaf[order]
    is_cover = order < N_LEAVES
    top = leaf // LEAVES_PER_TOP

    n_brands = max(50, n_items // 20)
    n_shops = max(50, n_items // 10)
    brand = _draw(rng, _cdf(_zipf_weights(rng, n_brands, 0.9)), n_items)
    shop = _draw(rng, _cdf(_zipf_weights(rng, n_shops, 0.9)), n_items)
    brand_quality = rng.normal(0.0, 0.4, n_brands)
    quality = 0.6 * brand_quality[brand] + 0.8 * rng.normal(0.0, 0.4, n_items)

    top_log_median = math.log(35.0) + rng.normal(0.0, 0.9, N_TOP)
    leaf_log_median = np.repeat(top_log_median, LEAVES_PER_TOP) + rng.normal(0.0, 0.5, N_LEAVES)
    price = np.maximum(np.round(np.exp(leaf_log_median[leaf] + rng.normal(0.0, 0.55, n_items)), 2), 0.01)
    log_price = np.log(price)
    log_price_dev = log_price - _group_median(log_price, leaf, N_LEAVES)[leaf]

    has_rating = rng.random(n_items) >= 0.2
    rating = np.clip(np.round(4.0 + 0.9 * quality + rng.normal(0.0, 0.45, n_items), 1), 1.0, 5.0)
    listing_us = _listing_times(rng, n_items, days, is_cover)
    counts = np.bincount(top, minlength=N_TOP)
    items = _Items(
        top=top,
        quality=quality,
        log_price_dev=log_price_dev,
        rating_centered=np.where(has_rating, rating - 4.0, 0.0),
        listing_us=listing_us,
        popularity=_zipf_weights(rng, n_items, 1.1),
        by_top=np.argsort(top, kind="stable"),
        top_start=np.cumsum(counts) - counts,
        top_end=np.cumsum(counts),
    )
    table = pa.table(
        {
            "item_id": pa.array(np.arange(1, n_items + 1, dtype=np.int64)),
            "category_id": pa.array(leaf + 1),
            "top_category": _strings(TOP_CATEGORIES, top),
            "brand_id": pa.array(brand + 1),
            "shop_id": pa.array(shop + 1),
            "price": pa.array(price),
            "rating": pa.array(rating.astype(np.float32), mask=~has_rating),
            "listing_ts": pa.array(listing_us.view("datetime64[us]")),
        }
    )
    return items, table


@dataclass(frozen=True)
class _Shelf:
    """Popularity samplers over the items listed before some time (unlisted items weigh 0)."""

    by_top: np.ndarray  # (I,) item indices sorted by top category
    global_cdf: _Guided  # (I,) normalized cumulative popularity
    global_last: int  # last listed item, the upper clip of a global draw
    top_cdf: _Guided  # (I,) over by_top: block c runs from c to c + 1, so ``c + uniform`` draws within c
    top_first: np.ndarray  # (20,) first listed position of each block in by_top
    top_last: np.ndarray  # (20,) last listed position of each block in by_top


def _shelf(items: _Items, before_us: int) -> _Shelf:
    """Samplers over the items listed strictly before ``before_us`` (the start of the chunk)."""
    weight = np.where(items.listing_us < before_us, items.popularity, 0.0)
    global_cdf = np.cumsum(weight)
    global_cdf /= global_cdf[-1]
    sorted_weight = weight[items.by_top]
    sorted_top = items.top[items.by_top]
    cum = np.cumsum(sorted_weight)
    mass_before = np.concatenate([[0.0], cum])[items.top_start]  # (20,) popularity of the blocks before
    block_mass = cum[items.top_end - 1] - mass_before  # > 0: the cover items are listed before the window
    top_cdf = sorted_top + (cum - mass_before[sorted_top]) / block_mass[sorted_top]
    # Rounding can push a draw just outside its block or onto a trailing unlisted item; the clips to the
    # first and last listed positions keep every draw on a listed item of the right block.
    listed = np.flatnonzero(sorted_weight > 0)
    blocks = np.arange(N_TOP)
    return _Shelf(
        by_top=items.by_top,
        global_cdf=_Guided.build(global_cdf, 1.0),
        global_last=int(np.flatnonzero(weight > 0)[-1]),
        top_cdf=_Guided.build(top_cdf, float(N_TOP)),
        top_first=listed[np.searchsorted(sorted_top[listed], blocks, side="left")],
        top_last=listed[np.searchsorted(sorted_top[listed], blocks, side="right") - 1],
    )


def _group_median(values: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """(n_groups,) median of ``values`` within each group (0 for an empty group)."""
    order = np.lexsort((values, group))
    counts = np.bincount(group, minlength=n_groups)
    start = np.cumsum(counts) - counts
    sorted_values = values[order]
    lo = np.minimum(start + (counts - 1) // 2, len(values) - 1)
    hi = np.minimum(start + counts // 2, len(values) - 1)
    return np.where(counts > 0, 0.5 * (sorted_values[lo] + sorted_values[hi]), 0.0)


@dataclass(frozen=True)
class _Users:
    """Per-user latent arrays (index ``u`` is ``user_id - 1``)."""

    activity_cdf: np.ndarray  # (U,) who makes requests
    device: np.ndarray  # (U,) int64 usual device
    pref_cdf: _Guided  # (U * 20,) row u's preference CDF plus u, so one search serves all users
    log_pref: np.ndarray  # (U * 20,) log(max(20 * pref, 0.05)), the raw affinity
    price_sensitivity: np.ndarray  # (U,) s_u
    propensity: np.ndarray  # (U,) a_u


def _make_users(rng: np.random.Generator, n_users: int) -> tuple[_Users, pa.Table]:
    """Draws the users: the latent arrays the truth needs and the contract's ``users`` table."""
    age = _draw(rng, _cdf(np.asarray(AGE_PROBS)), n_users)
    gender = _draw(rng, _cdf(np.asarray(GENDER_PROBS)), n_users)
    city = _draw(rng, _cdf(1.0 / np.arange(1, len(CITIES) + 1)), n_users)
    member = _draw(rng, _cdf(np.asarray(MEMBER_PROBS)), n_users)
    signup_us = _days_before(rng, n_users, 1.0, 1500.0)
    activity = rng.lognormal(0.0, 1.0, n_users)
    device = _draw(rng, _cdf(np.asarray(DEVICE_PROBS)), n_users)
    pref = rng.dirichlet(np.full(N_TOP, 0.5), n_users)  # (U, 20)
    pref_cdf = np.cumsum(pref, axis=1)
    pref_cdf /= pref_cdf[:, -1:]
    pref_cdf[:, -1] = 1.0
    pref_cdf += np.arange(n_users)[:, None]
    sigma = 0.5
    users = _Users(
        activity_cdf=_cdf(activity),
        device=device,
        pref_cdf=_Guided.build(pref_cdf.ravel(), float(n_users)),
        log_pref=np.log(np.maximum(N_TOP * pref, 0.05)).ravel(),
        price_sensitivity=rng.lognormal(math.log(0.6) - sigma**2 / 2, sigma, n_users),
        propensity=rng.normal(0.0, 0.3, n_users),
    )
    table = pa.table(
        {
            "user_id": pa.array(np.arange(1, n_users + 1, dtype=np.int64)),
            "age_bucket": _strings(AGE_BUCKETS, age),
            "gender": _strings(GENDERS, gender),
            "city": _strings(CITIES, city),
            "member_level": pa.array(member.astype(np.int8)),
            "signup_ts": pa.array(signup_us.view("datetime64[us]")),
        }
    )
    return users, table


@dataclass(frozen=True)
class _Chunk:
    """One chunk to generate: a slice ``[u_lo, u_hi)`` of one day's traffic (in traffic quantiles)."""

    day: int
    u_lo: float
    u_hi: float
    n_rows: int


def _plan_chunks(n_impressions: int, days: int, chunk_rows: int) -> list[_Chunk]:
    """Splits the impressions over days (weekends busier) and each day into chunks of <= chunk_rows rows.

    Chunks are in time order; a day split in k chunks gets k equal slices of its traffic quantiles, so each
    chunk covers a contiguous time range and timestamps increase across chunks.
    """
    weights = np.array(
        [WEEKEND_TRAFFIC if (START + timedelta(days=d)).weekday() >= 5 else 1.0 for d in range(days)]
    )
    exact = n_impressions * weights / weights.sum()
    per_day = np.floor(exact).astype(np.int64)
    # Largest remainder, ties to the earlier day, so the days add up to n_impressions exactly.
    short = n_impressions - int(per_day.sum())
    per_day[np.argsort(-(exact - per_day), kind="stable")[:short]] += 1
    chunks = []
    for day, n_day in enumerate(per_day.tolist()):
        k = -(-n_day // chunk_rows)
        for j in range(k):
            chunks.append(_Chunk(day, j / k, (j + 1) / k, n_day // k + (1 if j < n_day % k else 0)))
    return chunks


@dataclass(frozen=True)
class _Impressions:
    """The rows of one chunk, in time order; user and item are 0-based indices."""

    request: np.ndarray  # (N,) int64, 0-based request index within the chunk
    ts_us: np.ndarray  # (N,) int64
    user: np.ndarray  # (N,) int64
    item: np.ndarray  # (N,) int64
    position: np.ndarray  # (N,) int64, 1-based
    device: np.ndarray  # (N,) int64
    page: np.ndarray  # (N,) int64
    n_requests: int


_SIZE_CDF = _cdf(np.asarray(REQUEST_SIZE_PROBS))
_DEVICE_CDF = _cdf(np.asarray(DEVICE_PROBS))
_PAGE_CDF = _cdf(np.asarray(PAGE_PROBS))
_MEAN_SIZE = float(REQUEST_SIZES @ np.asarray(REQUEST_SIZE_PROBS))


def _simulate_requests(rng: np.random.Generator, users: _Users, items: _Items, chunk: _Chunk) -> _Impressions:
    """Sessions, page views and the items shown for one chunk: exactly ``chunk.n_rows`` impressions."""
    day_us = _us(START) + chunk.day * _US_PER_DAY
    lo_us = day_us + int(np.interp(chunk.u_lo, _DAY_CDF, _DAY_SECONDS) * _US_PER_S)
    hi_us = day_us + int(np.interp(chunk.u_hi, _DAY_CDF, _DAY_SECONDS) * _US_PER_S)
    parts: list[tuple[np.ndarray, ...]] = []
    total = 0
    while total < chunk.n_rows:  # almost always one pass; the margin makes a second one rare
        n_sessions = int((chunk.n_rows - total) / (_MEAN_SIZE * MEAN_PAGEVIEWS) * 1.2) + 8
        s_user = _draw(rng, users.activity_cdf, n_sessions)
        s_device = np.where(
            rng.random(n_sessions) < USUAL_DEVICE_SHARE,
            users.device[s_user],
            _draw(rng, _DEVICE_CDF, n_sessions),
        )
        start_s = np.interp(rng.uniform(chunk.u_lo, chunk.u_hi, n_sessions), _DAY_CDF, _DAY_SECONDS)
        n_views = rng.geometric(1.0 / MEAN_PAGEVIEWS, n_sessions)
        session = np.repeat(np.arange(n_sessions), n_views)  # (R,)
        first = np.cumsum(n_views) - n_views
        gaps = rng.exponential(MEAN_GAP_S, len(session))
        gaps[first] = 0.0
        offset_s = np.cumsum(gaps)
        offset_s -= offset_s[first][session]
        # Page views that run past the chunk's end are held at its last microsecond, keeping chunks ordered.
        ts_us = np.clip(
            day_us + ((start_s[session] + offset_s) * _US_PER_S).astype(np.int64), lo_us, hi_us - 1
        )
        size = REQUEST_SIZES[_draw(rng, _SIZE_CDF, len(session))]
        page = _draw(rng, _PAGE_CDF, len(session))
        parts.append((ts_us, s_user[session], s_device[session], page, size))
        total += int(size.sum())
    ts_us, user, device, page, size = (np.concatenate(column) for column in zip(*parts, strict=True))

    # Sessions are in random order, so keeping a prefix keeps a random subset of them.
    end = np.cumsum(size)
    keep = int(np.searchsorted(end, chunk.n_rows, side="left")) + 1
    size = size[:keep].copy()
    size[-1] -= int(end[keep - 1]) - chunk.n_rows
    order = np.argsort(ts_us[:keep], kind="stable")
    ts_us, user, device, page, size = (a[:keep][order] for a in (ts_us, user, device, page, size))

    request = np.repeat(np.arange(keep), size)  # (N,)
    first = np.cumsum(size) - size
    position = np.arange(chunk.n_rows) - first[request] + 1
    imp_user = user[request]
    shelf = _shelf(items, lo_us)
    item = _sample_items(rng, users, shelf, imp_user)
    _redraw_repeats(rng, users, shelf, request, imp_user, item)
    return _Impressions(
        request=request,
        ts_us=ts_us[request],
        user=imp_user,
        item=item,
        position=position,
        device=device[request],
        page=page[request],
        n_requests=keep,
    )


def _preferred_top(users: _Users, user: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """(n,) top categories drawn from each row's user preference, given (n,) uniforms in [0, 1)."""
    return np.clip(users.pref_cdf.search(user + uniform) - user * N_TOP, 0, N_TOP - 1)


def _sample_items(rng: np.random.Generator, users: _Users, shelf: _Shelf, user: np.ndarray) -> np.ndarray:
    """(N,) item indices: a preferred top category then popularity within it, else global popularity."""
    n = len(user)
    item = np.empty(n, dtype=np.int64)
    preferred = rng.random(n) < PREFERRED_SHARE
    pu = user[preferred]
    top = _preferred_top(users, pu, rng.random(len(pu)))
    pos = shelf.top_cdf.search(top + rng.random(len(pu)))
    item[preferred] = shelf.by_top[np.clip(pos, shelf.top_first[top], shelf.top_last[top])]
    other = shelf.global_cdf.search(rng.random(n - len(pu)))
    item[~preferred] = np.minimum(other, shelf.global_last)
    return item


def _redraw_repeats(
    rng: np.random.Generator,
    users: _Users,
    shelf: _Shelf,
    request: np.ndarray,
    user: np.ndarray,
    item: np.ndarray,
    rounds: int = 10,
) -> None:
    """Redraws, in place, items shown twice on one page (up to ``rounds`` times; rare leftovers stay).

    Rows of a request are contiguous and at most ``max(REQUEST_SIZES)`` long, so comparing each row with
    its neighbours up to that distance finds every repeat. The first pass flags the later row of each pair;
    later passes only check the redrawn rows, as any new repeat involves one of them.
    """
    reach = int(REQUEST_SIZES.max()) - 1
    repeat = np.zeros(len(item), dtype=bool)
    for lag in range(1, reach + 1):
        repeat[lag:] |= (item[lag:] == item[:-lag]) & (request[lag:] == request[:-lag])
    rows = np.flatnonzero(repeat)
    for _ in range(rounds):
        if rows.size == 0:
            return
        item[rows] = _sample_items(rng, users, shelf, user[rows])
        clash = np.zeros(len(rows), dtype=bool)
        for lag in (*range(-reach, 0), *range(1, reach + 1)):
            other = np.clip(rows + lag, 0, len(item) - 1)
            clash |= (other != rows) & (item[other] == item[rows]) & (request[other] == request[rows])
        rows = rows[clash]


def _components(
    imps: _Impressions, users: _Users, items: _Items, last_click_top: np.ndarray
) -> list[np.ndarray]:
    """The ten standardized components ``z`` (each (N,) float64), in the order of ``COMPONENTS``."""
    u, i = imps.user, imps.item
    top = items.top[i]
    age_days = (imps.ts_us - items.listing_us[i]) / _US_PER_DAY
    hour = (imps.ts_us // _US_PER_HOUR) % 24
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


def _calibrate(
    rng: np.random.Generator,
    users: _Users,
    items: _Items,
    days: int,
    w_click: np.ndarray,
    w_purchase: np.ndarray,
) -> tuple[float, float]:
    """Biases ``(b_c, b_p)`` hitting TARGET_CTR and TARGET_CVR on a pilot day mid-window.

    The pilot's users get a synthetic click history (70% a top category drawn from their preference), close
    to what they accumulate after a few days, so the real rates stay near the targets over the window.
    """
    n_users = len(users.propensity)
    pilot = _simulate_requests(rng, users, items, _Chunk(days // 2, 0.0, 1.0, PILOT_ROWS))
    history = _preferred_top(users, np.arange(n_users), rng.random(n_users))
    history = np.where(rng.random(n_users) < 0.7, history, -1)
    click, purchase = _logits(_components(pilot, users, items, history), pilot.position, w_click, w_purchase)
    b_click = _solve_bias(click, None, TARGET_CTR)
    b_purchase = _solve_bias(purchase, _sigmoid(b_click + click), TARGET_CVR)
    return b_click, b_purchase


_IMPRESSIONS_SCHEMA = pa.schema(
    [
        ("impression_id", pa.int64()),
        ("request_id", pa.int64()),
        ("ts", pa.timestamp("us")),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("position", pa.int16()),
        ("device", pa.string()),
        ("page", pa.string()),
        ("click", pa.int8()),
        ("purchase", pa.int8()),
    ]
)
_TRUTH_SCHEMA = pa.schema(
    [
        ("impression_id", pa.int64()),
        ("p_click", pa.float64()),
        ("p_purchase_given_click", pa.float64()),
        ("p_purchase", pa.float64()),
    ]
)


class _ChunkWriter:
    """Appends chunks to ``impressions`` and ``truth`` on one background thread, one row group per chunk.

    pyarrow releases the GIL while it encodes and compresses, so writing chunk k overlaps generating chunk
    k + 1 on a second core. At most one chunk waits to be written, which bounds memory to about two chunks,
    and writes keep their order, so the files are byte-identical to a sequential write.
    """

    def __init__(self, impressions_path: Path, truth_path: Path, model: TruthModel) -> None:
        self._impressions = pq.ParquetWriter(
            impressions_path,
            _IMPRESSIONS_SCHEMA,
            compression="zstd",
            use_dictionary=["user_id", "item_id", "device", "page"],
        )
        # Probabilities are all distinct: a dictionary attempt would only cost time.
        self._truth = pq.ParquetWriter(
            truth_path,
            _TRUTH_SCHEMA.with_metadata({"truth_model": model.to_json()}),
            use_dictionary=False,
        )
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-writer")
        self._pending: Future[None] | None = None

    def write(self, impressions: pa.Table, truth: pa.Table) -> None:
        """Queues one chunk, after waiting for the previous one (re-raising its error, if any)."""
        self._wait()
        self._pending = self._pool.submit(self._write, impressions, truth)

    def _write(self, impressions: pa.Table, truth: pa.Table) -> None:
        self._impressions.write_table(impressions, row_group_size=impressions.num_rows)
        # The schemas are compared without metadata; the file keeps the writer's (the truth model).
        self._truth.write_table(truth, row_group_size=truth.num_rows)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> _ChunkWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown()
            self._impressions.close()
            self._truth.close()


@contextmanager
def _staged(paths: list[Path]) -> Iterator[list[Path]]:
    """Yields temporary paths beside ``paths`` and renames them onto ``paths`` only if the block succeeds."""
    temps = [p.with_name(f".{p.name}.tmp") for p in paths]
    try:
        yield temps
    except BaseException:
        for temp in temps:
            temp.unlink(missing_ok=True)
        raise
    for temp, path in zip(temps, paths, strict=True):
        os.replace(temp, path)


def _check_arguments(
    n_impressions: int, seed: int, n_users: int | None, n_items: int | None, days: int, chunk_rows: int
) -> None:
    """Raises ValueError naming the first bad argument (``None`` sizes take their defaults later)."""
    for name, value, low in (
        ("n_impressions", n_impressions, 1),
        ("seed", seed, 0),
        ("n_users", n_users, 1),
        ("n_items", n_items, N_TOP),
        ("days", days, 1),
        ("chunk_rows", chunk_rows, 1),
    ):
        if value is None and name in ("n_users", "n_items"):
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")


def generate(
    out_dir: str | Path,
    n_impressions: int,
    seed: int,
    task_correlation: float = 0.5,
    n_users: int | None = None,
    n_items: int | None = None,
    days: int = 30,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: bool = True,
) -> GenerateResult:
    """Writes a synthetic world and its labelled impressions into ``out_dir`` (see the module docstring).

    Impressions are generated in time order, one chunk per day (split further so no chunk exceeds
    ``chunk_rows`` rows), and streamed to Parquet one row group per chunk, so memory stays bounded by the
    chunk size, not by ``n_impressions``. Each file is written under a temporary name and renamed at the end.

    Args:
        out_dir: folder for ``impressions.parquet``, ``users.parquet``, ``items.parquet``,
            ``truth.parquet``; created if missing, files in it replaced.
        n_impressions: rows of ``impressions`` (>= 1).
        seed: non-negative seed; the same seed gives byte-identical files.
        task_correlation: ``rho`` in [-1, 1], the cosine between the click and purchase weight vectors.
        n_users: users (default ``max(100, n_impressions // 100)``).
        n_items: items, >= 20 (default ``max(200, n_impressions // 50)``).
        days: length of the window in days, starting at ``START``.
        chunk_rows: most rows generated and written at once.
        progress: show a progress bar over chunks on stderr.

    Returns:
        The paths written, the row counts, the label rates and the truth model.

    Raises:
        ValueError: naming the argument, if one is out of range.
    """
    _check_arguments(n_impressions, seed, n_users, n_items, days, chunk_rows)
    w_purchase = purchase_weights(task_correlation)
    n_users = max(100, n_impressions // 100) if n_users is None else int(n_users)
    n_items = max(200, n_impressions // 50) if n_items is None else int(n_items)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.parquet" for name in ("impressions", "users", "items", "truth")]
    items_seq, users_seq, pilot_seq, chunks_seq = np.random.SeedSequence(seed).spawn(4)
    items, items_table = _make_items(np.random.default_rng(items_seq), n_items, days)
    users, users_table = _make_users(np.random.default_rng(users_seq), n_users)
    b_click, b_purchase = _calibrate(
        np.random.default_rng(pilot_seq), users, items, days, W_CLICK, w_purchase
    )
    model = TruthModel(
        task_correlation=float(task_correlation),
        bias_click=b_click,
        bias_purchase=b_purchase,
        w_click=tuple(float(w) for w in W_CLICK),
        w_purchase=tuple(float(w) for w in w_purchase),
    )
    chunks = _plan_chunks(n_impressions, days, chunk_rows)

    last_click_top = np.full(n_users, -1, dtype=np.int64)  # top category of each user's latest click
    todays_clicks: list[tuple[np.ndarray, np.ndarray]] = []  # (user, top category), applied at midnight
    today = 0
    next_request = next_impression = 1
    sums = np.zeros(4)  # clicks, purchases, sum p_click, sum p_purchase
    with _staged(paths) as (imp_tmp, users_tmp, items_tmp, truth_tmp):
        pq.write_table(users_table, users_tmp, compression="zstd")
        pq.write_table(items_table, items_tmp, compression="zstd")
        with _ChunkWriter(imp_tmp, truth_tmp, model) as writer:
            chunk_seqs = chunks_seq.spawn(len(chunks))
            bar = tqdm(chunks, desc="generate", unit="chunk", disable=not progress, file=sys.stderr)
            for chunk, chunk_seq in zip(bar, chunk_seqs, strict=True):
                if chunk.day != today:
                    # The history effect counts clicks of earlier days only, however a day is chunked.
                    _remember_clicks(last_click_top, todays_clicks)
                    todays_clicks, today = [], chunk.day
                rng = np.random.default_rng(chunk_seq)
                imps = _simulate_requests(rng, users, items, chunk)
                z = _components(imps, users, items, last_click_top)
                p_click, p_given, click, purchase = _draw_labels(rng, z, imps.position, model)
                p_purchase = p_click * p_given
                todays_clicks.append((imps.user[click], items.top[imps.item[click]]))

                impression_id = np.arange(next_impression, next_impression + chunk.n_rows, dtype=np.int64)
                writer.write(
                    _impressions_table(imps, impression_id, next_request, click, purchase),
                    pa.Table.from_arrays(
                        [pa.array(impression_id), pa.array(p_click), pa.array(p_given), pa.array(p_purchase)],
                        schema=_TRUTH_SCHEMA,
                    ),
                )
                next_impression += chunk.n_rows
                next_request += imps.n_requests
                sums += (click.sum(), purchase.sum(), p_click.sum(), p_purchase.sum())

    clicks, purchases, sum_p_click, sum_p_purchase = sums.tolist()
    return GenerateResult(
        impressions_path=paths[0],
        users_path=paths[1],
        items_path=paths[2],
        truth_path=paths[3],
        n_impressions=n_impressions,
        n_requests=next_request - 1,
        n_users=n_users,
        n_items=n_items,
        n_chunks=len(chunks),
        click_rate=clicks / n_impressions,
        purchase_rate=purchases / n_impressions,
        purchase_given_click_rate=purchases / clicks if clicks else math.nan,
        mean_p_click=sum_p_click / n_impressions,
        mean_p_purchase=sum_p_purchase / n_impressions,
        model=model,
    )


def _draw_labels(
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


def _remember_clicks(last_click_top: np.ndarray, clicks: list[tuple[np.ndarray, np.ndarray]]) -> None:
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


def _impressions_table(
    imps: _Impressions, impression_id: np.ndarray, first_request: int, click: np.ndarray, purchase: np.ndarray
) -> pa.Table:
    """One chunk's rows as an Arrow table with the contract's column types."""
    return pa.Table.from_arrays(
        [
            pa.array(impression_id),
            pa.array(imps.request + first_request),
            pa.array(imps.ts_us.view("datetime64[us]")),
            pa.array(imps.user + 1),
            pa.array(imps.item + 1),
            pa.array(imps.position.astype(np.int16)),
            _strings(DEVICES, imps.device),
            _strings(PAGES, imps.page),
            pa.array(click.astype(np.int8)),
            pa.array(purchase.astype(np.int8)),
        ],
        schema=_IMPRESSIONS_SCHEMA,
    )
