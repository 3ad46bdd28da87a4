"""Derived e-commerce columns: pure ``LazyFrame -> LazyFrame`` steps, the same for training and scoring.

:func:`derive_ecommerce` joins impressions with users and items and adds, for every impression:

==========================  =========================================================================
column                      meaning
==========================  =========================================================================
``hour``, ``weekday``       of ``ts`` (weekday 1 = Monday)
``item_age_days``           days since the item's ``listing_ts`` (float, clipped at 0)
``user_tenure_days``        days since the user's ``signup_ts`` (float, clipped at 0)
``log_price``               ``log1p(price)``
``hist_item_ids``           the user's last N clicked items, oldest first, strictly before ``ts``
``hist_category_ids``       their leaf categories
``user_clicks_{d}d``        the user's clicks in ``[ts - d days, ts)``
``last_click_same_top``     1 if the item's top category is that of the user's last click before ``ts``
``prev_day_click_same_top`` 1 if it is that of the user's last click before ``ts``'s UTC day began (the
                            state a profile refreshed by a daily batch job would hold), else 0
==========================  =========================================================================

History comes from click events strictly before each row's ``ts``: events at the same instant (the same
page view) never leak into a row's features, and appending later events never changes earlier rows.
For training data the history is the impressions table itself; for scoring data it is the event log the
caller supplies.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from features.affinity import add_affinities, run_starts
from features.config import FeatureDef, HistoryConfig

HIST_ITEMS, HIST_CATEGORIES = "hist_item_ids", "hist_category_ids"
HIST_STATE = "__hist_state"
LAST_CLICK_SAME_TOP, PREV_DAY_CLICK_SAME_TOP = "last_click_same_top", "prev_day_click_same_top"
_LAST_TOP = "__last_top"  # the top category of the last click of a history state
_DAY_S = 86_400.0


def clicks_column(days: int) -> str:
    """Name of the click-count column over the last ``days`` days."""
    return f"user_clicks_{days}d"


def _days_between(later: str, earlier: str) -> pl.Expr:
    return ((pl.col(later) - pl.col(earlier)).dt.total_microseconds() / (_DAY_S * 1e6)).clip(lower_bound=0.0)


def add_time_features(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Adds hour, weekday, item age, user tenure and log price (rows joined with users and items)."""
    return lf.with_columns(
        pl.col("ts").dt.hour().cast(pl.Int64).alias("hour"),
        pl.col("ts").dt.weekday().cast(pl.Int64).alias("weekday"),
        _days_between("ts", "listing_ts").alias("item_age_days"),
        _days_between("ts", "signup_ts").alias("user_tenure_days"),
        pl.col("price").clip(lower_bound=0.0).log1p().alias("log_price"),
    )


def click_history(events: pl.LazyFrame, items: pl.LazyFrame, max_length: int) -> pl.LazyFrame:
    """The state of each user's click history just after each instant at which they clicked.

    Args:
        events: impressions with at least ``user_id``, ``ts``, ``impression_id``, ``item_id``, ``click``.
        items: the items table (for the clicked items' categories).
        max_length: how many recent clicks the lists keep.

    Returns:
        One row per (user_id, ts) with a click, sorted by ``ts``: ``n_clicks`` (the user's clicks up to and
        including ``ts``), the last ``max_length`` clicked items and categories, oldest first, and the top
        category of the last of them (``__last_top``).
    """
    clicks = (
        events.filter(pl.col("click") == 1)
        .select("user_id", "ts", "impression_id", "item_id")
        .join(
            items.select("item_id", "category_id", "top_category"),
            on="item_id",
            how="left",
            maintain_order="left",
        )
        # A user's clicks in time order; impression_id breaks ties within one page view.
        .sort("user_id", "ts", "impression_id")
        .with_row_index("_k")
    )
    state = clicks.rolling(index_column="_k", period=f"{max_length}i", group_by="user_id").agg(
        pl.col("ts").last(),
        pl.col("item_id").alias(HIST_ITEMS),
        pl.col("category_id").fill_null(-1).alias(HIST_CATEGORIES),
        pl.col("top_category").last().alias(_LAST_TOP),
    )
    return (
        state.with_columns(n_clicks=pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over("user_id"))
        # Several clicks at one instant: the state after the last of them is what later rows see.
        .unique(subset=["user_id", "ts"], keep="last", maintain_order=True)
        .drop("_k")
        .sort("ts")
    )


def add_history_index(
    lf: pl.LazyFrame, history: pl.LazyFrame, items: pl.LazyFrame, cfg: HistoryConfig
) -> tuple[pl.LazyFrame, pl.DataFrame]:
    """Adds, point in time, an index into the user's click-history states and windowed click counts.

    The history lists are kept once per state (one per user and click instant) instead of once per row:
    many impressions share a state, and gathering lists late, after their ids are mapped, is much cheaper.

    Args:
        lf: rows sorted by ``ts`` with ``user_id``, ``ts`` and ``top_category``.
        history: the click event log (impressions with labels).
        items: the items table.
        cfg: history settings.

    Returns:
        ``lf`` with ``__hist_state`` (row of the returned table, null without earlier clicks), one
        ``user_clicks_{d}d`` column (Int64) per window and the 0/1 (Int64) ``last_click_same_top`` and
        ``prev_day_click_same_top``; and the table of states with the list columns ``hist_item_ids`` and
        ``hist_category_ids``.
    """
    state = click_history(history, items, cfg.max_length).collect().with_row_index(HIST_STATE)
    asof = {"by": "user_id", "strategy": "backward", "allow_exact_matches": False, "check_sortedness": False}
    frame = lf.collect()
    # The rows of one page view share user and instant, and so every value joined here: the joins run
    # once per run of such rows (a tenth of the rows), on a narrow frame of keys, and are gathered back.
    starts, runs = run_starts(frame.select("user_id", "ts"))
    keys = (
        starts.lazy()
        .join_asof(state.lazy().select("user_id", "ts", HIST_STATE, "n_clicks", _LAST_TOP), on="ts", **asof)
        .with_columns(_day=pl.col("ts").dt.truncate("1d"))
        .join_asof(
            state.lazy().select("user_id", pl.col("ts").alias("_day"), pl.col(_LAST_TOP).alias("_prev_top")),
            on="_day",
            **asof,
        )
    )
    counts = state.lazy().select("user_id", "ts", "n_clicks")
    for days in cfg.windows_days:
        start = f"_start_{days}d"
        keys = (
            keys.with_columns((pl.col("ts") - pl.duration(days=days)).alias(start))
            .join_asof(counts.rename({"ts": start, "n_clicks": "_n_before"}), on=start, **asof)
            .with_columns(
                (pl.col("n_clicks").fill_null(0) - pl.col("_n_before").fill_null(0)).alias(
                    clicks_column(days)
                )
            )
            .drop(start, "_n_before")
        )
    per_run = keys.select(
        HIST_STATE, *[clicks_column(d) for d in cfg.windows_days], _LAST_TOP, "_prev_top"
    ).collect()
    per_row = frame.select("top_category").with_columns(
        per_run[name].gather(runs) for name in per_run.columns
    )

    def same_top(column: str) -> pl.Expr:
        return (pl.col(column) == pl.col("top_category")).fill_null(False).cast(pl.Int64)

    added = per_row.select(
        HIST_STATE,
        *[clicks_column(d) for d in cfg.windows_days],
        same_top(_LAST_TOP).alias(LAST_CLICK_SAME_TOP),
        same_top("_prev_top").alias(PREV_DAY_CLICK_SAME_TOP),
    )
    return frame.hstack(added.get_columns()).lazy(), state.select(HIST_ITEMS, HIST_CATEGORIES)


def gather_lists(lf: pl.LazyFrame, lists: pl.DataFrame) -> pl.LazyFrame:
    """Replaces ``__hist_state`` by the list columns it points to (empty lists where it is null)."""
    empty = pl.lit([], dtype=pl.List(pl.Int64))
    return lf.with_columns(
        pl.lit(lists[name]).gather(pl.col(HIST_STATE)).fill_null(empty).alias(name) for name in lists.columns
    ).drop(HIST_STATE)


def in_time_order(impressions: pl.LazyFrame) -> bool:
    """Whether the impressions are sorted by ``ts``, then ``impression_id``.

    Logs usually are; checking (two columns, one pass) costs a tenth of sorting 10M rows again.
    """
    ts, ids = pl.col("ts"), pl.col("impression_id")
    later = (ts.diff() > 0) | ((ts.diff() == 0) & (ids.diff() > 0))
    return bool(impressions.select(later.slice(1).fill_null(False).all()).collect().item())


def derive_ecommerce_indexed(
    impressions: pl.LazyFrame,
    users: pl.LazyFrame,
    items: pl.LazyFrame,
    cfg: HistoryConfig,
    history: pl.LazyFrame | None = None,
    affinities: Sequence[FeatureDef] = (),
) -> tuple[pl.LazyFrame, pl.DataFrame]:
    """:func:`derive_ecommerce` with the history lists kept in their own table.

    See :func:`add_history_index`; ``features.spec.apply`` takes both parts and gives the same output.
    ``affinities`` adds one column per affinity feature (:func:`features.affinity.add_affinities`).
    """
    log = impressions if history is None else history
    base = (
        (impressions if in_time_order(impressions) else impressions.sort("ts", "impression_id"))
        .join(users, on="user_id", how="left", maintain_order="left")
        .join(items, on="item_id", how="left", maintain_order="left")
        .pipe(add_time_features)
    )
    rows, lists = add_history_index(base, log, items, cfg)
    return add_affinities(rows, history, items, affinities), lists


def derive_ecommerce(
    impressions: pl.LazyFrame,
    users: pl.LazyFrame,
    items: pl.LazyFrame,
    cfg: HistoryConfig,
    history: pl.LazyFrame | None = None,
    affinities: Sequence[FeatureDef] = (),
) -> pl.LazyFrame:
    """Joins the three contract tables and adds every derived column, sorted by (ts, impression_id).

    Args:
        impressions: the rows to derive features for (training or scoring).
        users: the users table; unknown users get nulls (and so out-of-vocabulary ids later).
        items: the items table; unknown items likewise.
        cfg: history settings.
        history: the click log to take history from; ``None`` means ``impressions`` itself (training).
        affinities: the affinity features to add (:func:`features.affinity.add_affinities`).

    Returns:
        One row per impression, every input column kept.
    """
    rows, lists = derive_ecommerce_indexed(impressions, users, items, cfg, history, affinities)
    return gather_lists(rows, lists)
