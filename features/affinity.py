"""Affinity features: what the user, or everybody, did with the candidate's item, category, brand or shop.

A feature of kind ``affinity`` (see :class:`features.config.FeatureDef`) is a number computed, for every
impression, from the event log strictly before it, then fitted and transformed like a ``numeric`` feature
(``fill_null``, ``log1p``, ``standardize``, ``bucketize``). Its fields:

==============  ===========================================================================================
``by``          ``user``: the impression's user's events; ``all``: every user's events (popularity).
``key``         the candidate's attribute the events must share: ``item_id``, ``category_id``,
                ``top_category``, ``brand_id``, ``shop_id``; empty: any item (``by: user`` only).
``event``       ``impression``, ``click`` or ``purchase``.
``stat``        ``count``: the events; ``rate``: ``(events + m * prior) / (trials + m)``, trials the ``per``
                events, prior everybody's rate before the impression's day; ``share``: ``(events on the
                key + m * prior) / (the user's events on any key + m)``, prior everybody's share of the key
                before the impression's day; ``mean``: the mean ``value`` of the event's items; ``gap``:
                the candidate's ``value`` minus that mean (the user's price profile).
``per``         rate only: ``impression`` or ``click`` (default: ``impression`` for clicks, ``click`` for
                purchases).
``window_days`` count only the events of the last ``window_days`` days; 0 (default) counts all.
``smoothing``   ``m`` above (default 10).
``value``       mean and gap: ``log_price`` or ``rating`` of the items.
==============  ===========================================================================================

When "before" is. ``by: user`` counts every event strictly before the impression's instant: the page view's
own clicks never count, and appending later events never changes earlier rows. ``by: all`` counts, and the
priors, are as of the start of the impression's UTC day: what a daily batch job over the whole log would
hold (a same-day global counter needs a streaming system; a day's own events of one item would also leak
the labels of a busy page).

Cost. ``by: user`` features over clicks and purchases read only the click events (a few per cent of the
impressions); ``by: user`` with ``event: impression`` or ``per: impression`` reads every impression and is
several times slower. Features that share ``by``, ``key`` and ``window_days`` share one point-in-time join.

For training data the event log is the impressions themselves; for scoring it is the history the caller
supplies (it must hold non-click impressions when a feature counts impressions, and ``purchase`` when one
counts purchases: see :func:`history_needs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import polars as pl

AFFINITY = "affinity"
BY = ("user", "all")
KEYS = ("item_id", "category_id", "top_category", "brand_id", "shop_id")
EVENTS = ("impression", "click", "purchase")
STATS = ("count", "rate", "share", "mean", "gap")
VALUES = ("log_price", "rating")
_DAY_BITS = 20  # an (item, day) pair as one Int64: item_id * 2**20 + the day's number (in [0, 2**20))
_ASOF = {"strategy": "backward", "allow_exact_matches": False, "check_sortedness": False}
_SEEDS = (11, 23)  # of the two hashes combined into one group key


def derived_column(name: str) -> str:
    """The derived column that holds affinity feature ``name`` before its transforms."""
    return f"affinity__{name}"


@dataclass(frozen=True)
class Counter:
    """One point-in-time count: events of one kind, grouped ``by`` and ``key``, over one window."""

    by: str
    key: str
    window_days: int

    @property
    def tag(self) -> str:
        """The prefix of this counter's columns."""
        return f"__{self.by}_{self.key or 'any'}_{self.window_days}d"

    def column(self, what: str) -> str:
        """The column of this counter's ``what`` (an event name, or ``v_<event>`` for a value sum)."""
        return f"{self.tag}_{what}"


def _as_int(key: str) -> pl.Expr:
    """The key as Int64 (strings hashed; equal values give equal codes within one process)."""
    col = pl.col(key)
    return col.hash(_SEEDS[0]).reinterpret(signed=True) if key == "top_category" else col.cast(pl.Int64)


def _group(counter: Counter) -> pl.Expr:
    """One Int64 per group: the user, the key, or a hash of both."""
    if counter.by == "all":
        return _as_int(counter.key) if counter.key else pl.lit(0, dtype=pl.Int64)
    if not counter.key:
        return pl.col("user_id").cast(pl.Int64)
    return (pl.col("user_id").hash(_SEEDS[0]) ^ _as_int(counter.key).hash(_SEEDS[1])).reinterpret(signed=True)


def counters(features: Sequence[Any]) -> dict[Counter, set[str]]:
    """The counters the features need, each with what it must count (events, and ``v_<event>`` sums).

    A rate needs its ``per`` events, and everybody's counts on the day for its prior; a share needs the
    user's events on any key and everybody's share of the key.
    """
    need: dict[Counter, set[str]] = {}

    def add(counter: Counter, *what: str) -> None:
        need.setdefault(counter, set()).update(what)

    for f in features:
        own = Counter(f.by, f.key, f.window_days)
        add(own, f.event)
        if f.stat == "rate":
            add(own, rate_per(f))
            add(Counter("all", "", f.window_days), f.event, rate_per(f))
        elif f.stat == "share":
            add(Counter("user", "", f.window_days), f.event)
            add(Counter("all", f.key, f.window_days), f.event)
            add(Counter("all", "", f.window_days), f.event)
        elif f.stat in ("mean", "gap"):
            add(own, f"v_{f.event}_{f.value}", f"n_{f.event}_{f.value}")
    return need


def _counted(need: dict[Counter, set[str]], by: str) -> set[str]:
    """Everything the ``by`` counters count (event names and value sums)."""
    return set().union(set(), *[w for c, w in need.items() if c.by == by])


def rate_per(f: Any) -> str:
    """A rate's denominator event."""
    return f.per or ("impression" if f.event == "click" else "click")


@dataclass(frozen=True)
class HistoryNeeds:
    """What the event log must hold for a set of affinity features.

    Attributes:
        every_impression: non-click impressions too (``by: all`` counters, and ``by: user`` counters of
            impressions); without them the click events suffice.
        purchases: the ``purchase`` column.
        every_user: the other users' events too (``by: all`` counters); without them a row needs only its
            own user's events.
    """

    every_impression: bool = False
    purchases: bool = False
    every_user: bool = False


def history_needs(features: Sequence[Any]) -> HistoryNeeds:
    """What the event log must hold for these affinity features (nothing beyond clicks for none)."""
    need = counters(features)
    every_user = any(c.by == "all" for c in need)
    return HistoryNeeds(
        every_impression="impression" in _counted(need, "user") or every_user,
        purchases=any("purchase" in what for whats in need.values() for what in whats),
        every_user=every_user,
    )


def _event_expr(what: str) -> pl.Expr:
    """Per event row: 1 when it is an event of this kind.

    For ``v_<event>_<value>``: the event's value (0 when null); for ``n_<event>_<value>``: 1 when the event
    has a value.
    """
    if what == "impression":
        return pl.lit(1, dtype=pl.Int64)
    if what in ("click", "purchase"):
        return pl.col(what).cast(pl.Int64)
    kind, event, value = what.split("_", 2)
    if kind == "n":
        return pl.col(event).cast(pl.Int64) * pl.col(value).is_not_null().cast(pl.Int64)
    return (pl.col(event).cast(pl.Float64) * pl.col(value).cast(pl.Float64)).fill_null(0.0)


def _cumulative(
    events: pl.DataFrame, counter: Counter, what: Sequence[str], on: str, weights: bool = False
) -> pl.DataFrame:
    """Per group and instant (``on``), the counts up to and including it; sorted by ``on``.

    ``weights``: the events are already sums (one row per item and day) rather than single events.

    The running sums restart at each group without a hash over the groups: the events are sorted by
    (group, instant), summed once, and each group's starting total is subtracted.
    """
    frame = events.select(
        _group(counter).alias("__g"),
        pl.col(on),
        *[(pl.col(w) if weights else _event_expr(w)).alias(w) for w in what],
    ).sort("__g", on)
    first = pl.col("__g") != pl.col("__g").shift(1)
    last = (pl.col("__g") != pl.col("__g").shift(-1)) | (pl.col(on) != pl.col(on).shift(-1))
    sums = [pl.col(w).cum_sum() for w in what]
    frame = frame.with_columns(sums).with_columns(
        (pl.col(w) - pl.when(first.fill_null(True)).then(pl.col(w).shift(1).fill_null(0)).forward_fill())
        for w in what
    )
    # Several events at one instant: the state after the last of them is what later rows see.
    return frame.filter(last.fill_null(True)).sort(on)


def add_affinities(
    rows: pl.LazyFrame, history: pl.LazyFrame | None, items: pl.LazyFrame, features: Sequence[Any]
) -> pl.LazyFrame:
    """Adds one ``affinity__<name>`` Float64 column per affinity feature (null where ``mean`` has no events).

    The rows are collected here: each counter is one point-in-time join against the rows' keys, and a lazy
    plan with one branch per counter would derive the rows again for each.

    Args:
        rows: derived rows sorted by ``ts``, with ``user_id``, ``ts`` and the items' columns.
        history: the event log (impressions with ``click``, and ``purchase`` when needed); None: the rows
            are their own log (training data).
        items: the items table (the events' keys and values).
        features: the affinity feature definitions.
    """
    if not features:
        return rows
    need = counters(features)
    purchases = history_needs(features).purchases
    user_impressions = "impression" in _counted(need, "user")
    values = sorted({f.value for f in features if f.value})
    keys = sorted({c.key for c in need if c.key})
    attrs = (
        items.select("item_id", *[k for k in keys if k != "item_id"], "price", "rating")
        .with_columns(pl.col("price").clip(lower_bound=0.0).log1p().alias("log_price"))
        .collect()
    )
    frame = rows.collect()
    event_columns = ["user_id", "ts", "item_id", "click", *(["purchase"] if purchases else [])]
    # Training rows are their own event log, already joined with the items.
    log = frame.lazy() if history is None else history.select(event_columns)
    by_user = [f for f in features if f.by == "user"]

    def everybody() -> dict[str, pl.Series]:
        """The ``by: all`` features and the priors of the ``by: user`` rates and shares, per row.

        Everybody's counts as of a day depend on the item and the day only, and so do these: they are
        computed once per (item, day) pair, each pair one Int64 (a join on one integer key is about twice
        as fast as on two), and joined back.
        """
        row_pairs = frame.select(_pair())
        day_events = _daily(log, attrs, need)
        if history is None:  # the rows' pairs are the log's pairs
            pairs = day_events.drop(sorted(_counted(need, "all")))
        else:
            pairs = _split_pairs(row_pairs.unique()).join(attrs, on="item_id", how="left")
        pairs = pairs.sort("__day")
        counts = _all_counts(pairs, day_events, need, "__day", weights=True)
        on_pairs = (
            pairs.select("__pair", *values)
            .with_columns(**counts)
            .select(
                "__pair",
                *[_feature_expr(f).alias(derived_column(f.name)) for f in features if f.by == "all"],
                *[_prior(f).alias(_prior_column(f)) for f in by_user if f.stat in ("rate", "share")],
            )
        )
        joined = row_pairs.join(on_pairs, on="__pair", how="left", maintain_order="left")
        return {name: joined[name] for name in on_pairs.columns if name != "__pair"}

    # The two kinds of counters run side by side: their joins leave a core idle much of the time.
    with ThreadPoolExecutor(1, thread_name_prefix="affinity") as pool:
        added_all = pool.submit(everybody) if any(c.by == "all" for c in need) else None
        if by_user:
            user_log = log if user_impressions else log.filter(pl.col("click") == 1)
            if history is None:
                extra = [k for k in (*keys, *values) if k not in event_columns]
                user_events = user_log.select(*event_columns, *extra).collect()
            else:
                user_events = user_log.join(
                    attrs.lazy(), on="item_id", how="left", maintain_order="left"
                ).collect()
            user_frame = frame.select("user_id", "ts", *keys, *values)
            user_counts = _all_counts(user_frame, user_events, need, "ts", by="user")
        added = added_all.result() if added_all is not None else {}
    if by_user:
        columns = (
            user_frame.select(values)
            .with_columns(**user_counts, **added)
            .select(
                _feature_expr(f, pl.col(_prior_column(f)) if f.stat in ("rate", "share") else None).alias(
                    derived_column(f.name)
                )
                for f in by_user
            )
        )
        added |= {name: columns[name] for name in columns.columns}
    return frame.hstack([added[derived_column(f.name)] for f in features]).lazy()


def run_starts(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.Series]:
    """The first row of each run of consecutive equal rows, and every row's run number.

    A value computed per first row reaches every row of its run by ``value.gather(runs)``.
    """
    runs = frame.select(pl.struct(frame.columns).rle_id()).to_series()
    return frame.filter(runs != runs.shift(1, fill_value=-1)), runs


def _all_counts(
    frame: pl.DataFrame,
    events: pl.DataFrame,
    need: dict[Counter, set[str]],
    on: str,
    *,
    by: str = "all",
    weights: bool = False,
) -> dict[str, pl.Series]:
    """Per row of ``frame``, every ``by`` counter's counts strictly before ``on``.

    Counters of one key share their running sums and the join that reads them as of ``on``; a window
    adds one join as of its start. ``weights``: see :func:`_cumulative`.
    """
    out: dict[str, pl.Series] = {}
    for key in dict.fromkeys(c.key for c in need if c.by == by):
        group = {c: sorted(w) for c, w in need.items() if c.by == by and c.key == key}
        what = sorted(set().union(*group.values()))
        state = _cumulative(events, Counter(by, key, 0), what, on, weights)
        left = frame.select(_group(Counter(by, key, 0)).alias("__g"), on)
        runs = None
        if not key:
            # Without a key, the rows of one page view (or pairs of one day) share group and instant:
            # join once per run of them and gather back.
            left, runs = run_starts(left)
        now = left.join_asof(state, on=on, by="__g", **_ASOF)
        for counter, counted in group.items():
            totals = {w: now[w].fill_null(0) for w in counted}
            if counter.window_days:
                # ``on`` is an instant (by: user) or a day's number (by: all).
                days = pl.duration(days=counter.window_days) if on == "ts" else counter.window_days
                start = left.select("__g", (pl.col(on) - days).alias(on))
                before = start.join_asof(state, on=on, by="__g", **_ASOF)
                totals = {w: totals[w] - before[w].fill_null(0) for w in counted}
            out |= {counter.column(w): t if runs is None else t.gather(runs) for w, t in totals.items()}
    return out


def _daily(log: pl.LazyFrame, attrs: pl.DataFrame, need: dict[Counter, set[str]]) -> pl.DataFrame:
    """Everybody's events per (item, UTC day) pair, with the items' columns: the ``by: all`` counters' input.

    Summing per pair first makes the per-key running sums sort a table of items x days instead of every
    event.
    """
    what = sorted(_counted(need, "all"))
    per_day = log.group_by(_pair()).agg(
        (pl.len() if w == "impression" else _event_expr(w).sum()).alias(w) for w in what
    )
    return _split_pairs(per_day.collect()).join(attrs, on="item_id", how="left")


def _pair() -> pl.Expr:
    """The (item, UTC day) pair of an event as one Int64: ``item_id * 2**20 + day number``."""
    return (pl.col("item_id").cast(pl.Int64) * (1 << _DAY_BITS) + _day_number()).alias("__pair")


def _split_pairs(frame: pl.DataFrame) -> pl.DataFrame:
    """Adds ``item_id`` and ``__day`` (the day's number) of each ``__pair``."""
    return frame.with_columns(
        (pl.col("__pair") // (1 << _DAY_BITS)).alias("item_id"),
        (pl.col("__pair") % (1 << _DAY_BITS)).alias("__day"),
    )


def _day_number() -> pl.Expr:
    """The UTC day of ``ts`` as a number: days since 1970-01-01 plus 2**19 (never negative before 535 AD)."""
    return pl.col("ts").dt.epoch("d") + (1 << (_DAY_BITS - 1))


def _ratio(events: pl.Expr, trials: pl.Expr) -> pl.Expr:
    """``events / trials`` as a float, 0 where there are no trials."""
    return pl.when(trials > 0).then(events.cast(pl.Float64) / trials).otherwise(0.0)


def _at_least_one(denominator: pl.Expr, m: float) -> pl.Expr:
    """A smoothed rate's denominator; without smoothing a count of 0 trials (and so of 0 events) gives 0."""
    return denominator if m > 0 else denominator.clip(lower_bound=1)


def _prior_column(f: Any) -> str:
    """The column of a ``by: user`` rate's or share's prior (computed per item and day)."""
    return f"__prior_{f.name}"


def _prior(f: Any) -> pl.Expr:
    """A rate's or share's prior: everybody's rate, or share of the key, before the impression's day."""
    world = Counter("all", "", f.window_days)
    if f.stat == "rate":
        return _ratio(pl.col(world.column(f.event)), pl.col(world.column(rate_per(f))))
    return _ratio(pl.col(Counter("all", f.key, f.window_days).column(f.event)), pl.col(world.column(f.event)))


def _feature_expr(f: Any, prior: pl.Expr | None = None) -> pl.Expr:
    """The feature's value from its counters' columns (and its prior's, for a rate or a share)."""
    own = Counter(f.by, f.key, f.window_days)
    events = pl.col(own.column(f.event)).cast(pl.Float64)
    m = float(f.smoothing)
    if f.stat == "count":
        return events
    if f.stat in ("rate", "share"):
        prior = _prior(f) if prior is None else prior
        if f.stat == "rate":
            trials = pl.col(own.column(rate_per(f)))
        else:
            trials = pl.col(Counter("user", "", f.window_days).column(f.event))
        return (events + m * prior) / _at_least_one(trials + m, m)
    valued = pl.col(own.column(f"n_{f.event}_{f.value}"))
    mean = pl.when(valued > 0).then(pl.col(own.column(f"v_{f.event}_{f.value}")) / valued).otherwise(None)
    return mean if f.stat == "mean" else pl.col(f.value).cast(pl.Float64) - mean
