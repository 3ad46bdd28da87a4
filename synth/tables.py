"""The catalogue and the users (their latent arrays and contract tables), and the Parquet writer of the rows.

``items`` and ``users`` are drawn whole; impressions and their truth are streamed chunk by chunk through
:class:`ChunkWriter`, one row group per chunk. Column types follow :mod:`features.contract`.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synth.world import (
    AGE_BUCKETS,
    AGE_PROBS,
    CITIES,
    DEVICE_PROBS,
    DEVICES,
    GENDER_PROBS,
    GENDERS,
    LEAVES_PER_TOP,
    MEMBER_PROBS,
    N_LEAVES,
    N_TOP,
    PAGES,
    START,
    TOP_CATEGORIES,
    US_PER_DAY,
    Guided,
    days_before,
    draw,
    normalized_cdf,
    timestamp_us,
    zipf_weights,
)


def _strings(values: tuple[str, ...], codes: np.ndarray) -> pa.Array:
    """Plain string array ``values[codes]`` (not dictionary-typed: polars would read that as Categorical)."""
    return pa.array(values, pa.string()).take(pa.array(codes))


@dataclass(frozen=True)
class Items:
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
    return (timestamp_us(START) - np.round(days_before * US_PER_DAY)).astype(np.int64)


def make_items(rng: np.random.Generator, n_items: int, days: int) -> tuple[Items, pa.Table]:
    """Draws the catalogue: the latent arrays the truth needs and the contract's ``items`` table."""
    leaf_cdf = normalized_cdf(zipf_weights(rng, N_LEAVES, 0.8))
    # The first N_LEAVES items cover every leaf (the first 20 every top category) and are listed before the
    # window, so no top category is ever empty.
    cover = (np.arange(N_LEAVES) % N_TOP) * LEAVES_PER_TOP + np.arange(N_LEAVES) // N_TOP
    leaf = np.concatenate([cover[:n_items], draw(rng, leaf_cdf, max(0, n_items - N_LEAVES))])
    order = rng.permutation(n_items)
    leaf = leaf[order]
    is_cover = order < N_LEAVES
    top = leaf // LEAVES_PER_TOP

    n_brands = max(50, n_items // 20)
    n_shops = max(50, n_items // 10)
    brand = draw(rng, normalized_cdf(zipf_weights(rng, n_brands, 0.9)), n_items)
    shop = draw(rng, normalized_cdf(zipf_weights(rng, n_shops, 0.9)), n_items)
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
    items = Items(
        top=top,
        quality=quality,
        log_price_dev=log_price_dev,
        rating_centered=np.where(has_rating, rating - 4.0, 0.0),
        listing_us=listing_us,
        popularity=zipf_weights(rng, n_items, 1.1),
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
class Users:
    """Per-user latent arrays (index ``u`` is ``user_id - 1``)."""

    activity_cdf: np.ndarray  # (U,) who makes requests
    device: np.ndarray  # (U,) int64 usual device
    pref_cdf: Guided  # (U * 20,) row u's preference CDF plus u, so one search serves all users
    log_pref: np.ndarray  # (U * 20,) log(max(20 * pref, 0.05)), the raw affinity
    price_sensitivity: np.ndarray  # (U,) s_u
    propensity: np.ndarray  # (U,) a_u
    member: np.ndarray  # (U,) int64 member level 0..4, as in the users table


def make_users(
    rng: np.random.Generator, n_users: int, pref_concentration: float = 0.5
) -> tuple[Users, pa.Table]:
    """Draws the users: the latent arrays the truth needs and the contract's ``users`` table.

    ``pref_concentration`` is the Dirichlet concentration of the top-category preferences (smaller: peakier).
    """
    age = draw(rng, normalized_cdf(np.asarray(AGE_PROBS)), n_users)
    gender = draw(rng, normalized_cdf(np.asarray(GENDER_PROBS)), n_users)
    city = draw(rng, normalized_cdf(1.0 / np.arange(1, len(CITIES) + 1)), n_users)
    member = draw(rng, normalized_cdf(np.asarray(MEMBER_PROBS)), n_users)
    signup_us = days_before(rng, n_users, 1.0, 1500.0)
    activity = rng.lognormal(0.0, 1.0, n_users)
    device = draw(rng, normalized_cdf(np.asarray(DEVICE_PROBS)), n_users)
    pref = rng.dirichlet(np.full(N_TOP, pref_concentration), n_users)  # (U, 20)
    pref_cdf = np.cumsum(pref, axis=1)
    pref_cdf /= pref_cdf[:, -1:]
    pref_cdf[:, -1] = 1.0
    pref_cdf += np.arange(n_users)[:, None]
    sigma = 0.5
    users = Users(
        activity_cdf=normalized_cdf(activity),
        device=device,
        pref_cdf=Guided.build(pref_cdf.ravel(), float(n_users)),
        log_pref=np.log(np.maximum(N_TOP * pref, 0.05)).ravel(),
        price_sensitivity=rng.lognormal(math.log(0.6) - sigma**2 / 2, sigma, n_users),
        propensity=rng.normal(0.0, 0.3, n_users),
        member=member,
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
class Impressions:
    """The rows of one chunk, in time order; user and item are 0-based indices."""

    request: np.ndarray  # (N,) int64, 0-based request index within the chunk
    ts_us: np.ndarray  # (N,) int64
    user: np.ndarray  # (N,) int64
    item: np.ndarray  # (N,) int64
    position: np.ndarray  # (N,) int64, 1-based
    device: np.ndarray  # (N,) int64
    page: np.ndarray  # (N,) int64
    n_requests: int


IMPRESSIONS_SCHEMA = pa.schema(
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
TRUTH_SCHEMA = pa.schema(
    [
        ("impression_id", pa.int64()),
        ("p_click", pa.float64()),
        ("p_purchase_given_click", pa.float64()),
        ("p_purchase", pa.float64()),
    ]
)


def impressions_table(
    imps: Impressions, impression_id: np.ndarray, first_request: int, click: np.ndarray, purchase: np.ndarray
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
        schema=IMPRESSIONS_SCHEMA,
    )


def truth_table(
    impression_id: np.ndarray, p_click: np.ndarray, p_given: np.ndarray, p_purchase: np.ndarray
) -> pa.Table:
    """One chunk's truth as an Arrow table: impression id and the three probabilities."""
    return pa.Table.from_arrays(
        [pa.array(impression_id), pa.array(p_click), pa.array(p_given), pa.array(p_purchase)],
        schema=TRUTH_SCHEMA,
    )


class ChunkWriter:
    """Appends chunks to ``impressions`` and ``truth`` on one background thread, one row group per chunk.

    pyarrow releases the GIL while it encodes and compresses, so writing chunk k overlaps generating chunk
    k + 1 on a second core. At most one chunk waits to be written, which bounds memory to about two chunks,
    and writes keep their order, so the files are byte-identical to a sequential write.
    """

    def __init__(self, impressions_path: Path, truth_path: Path, truth_metadata: dict[str, str]) -> None:
        self._impressions = pq.ParquetWriter(
            impressions_path,
            IMPRESSIONS_SCHEMA,
            compression="zstd",
            use_dictionary=["user_id", "item_id", "device", "page"],
        )
        # Probabilities are all distinct: a dictionary attempt would only cost time.
        self._truth = pq.ParquetWriter(
            truth_path,
            TRUTH_SCHEMA.with_metadata(truth_metadata),
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
        # The schemas are compared without metadata; the file keeps the writer's (the truth model, the world).
        self._truth.write_table(truth, row_group_size=truth.num_rows)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown()
            self._impressions.close()
            self._truth.close()


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as the bytes of a zstd-compressed Parquet file (for a whole-file atomic write)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()
