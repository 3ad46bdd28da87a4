"""Traffic: the day's chunks, sessions and page views, and the items each page shows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import numpy as np

from synth.tables import Impressions, Items, Users
from synth.world import (
    DEVICE_PROBS,
    HOUR_PROBS,
    MEAN_GAP_S,
    MEAN_PAGEVIEWS,
    N_TOP,
    PAGE_PROBS,
    PREFERRED_SHARE,
    REQUEST_SIZE_PROBS,
    REQUEST_SIZES,
    START,
    US_PER_DAY,
    US_PER_S,
    USUAL_DEVICE_SHARE,
    WEEKEND_TRAFFIC,
    Guided,
    draw,
    normalized_cdf,
    timestamp_us,
)

# Piecewise-constant traffic density: knots of its CDF, for the inverse-CDF draw of times within a day.
_DAY_CDF = np.concatenate([[0.0], np.cumsum(HOUR_PROBS)])
_DAY_CDF[-1] = 1.0
_DAY_SECONDS = np.arange(25, dtype=np.float64) * 3600.0


@dataclass(frozen=True)
class Chunk:
    """One chunk to generate: a slice ``[u_lo, u_hi)`` of one day's traffic (in traffic quantiles)."""

    day: int
    u_lo: float
    u_hi: float
    n_rows: int


def plan_chunks(n_impressions: int, days: int, chunk_rows: int) -> list[Chunk]:
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
            chunks.append(Chunk(day, j / k, (j + 1) / k, n_day // k + (1 if j < n_day % k else 0)))
    return chunks


_SIZE_CDF = normalized_cdf(np.asarray(REQUEST_SIZE_PROBS))
_DEVICE_CDF = normalized_cdf(np.asarray(DEVICE_PROBS))
_PAGE_CDF = normalized_cdf(np.asarray(PAGE_PROBS))
_MEAN_SIZE = float(REQUEST_SIZES @ np.asarray(REQUEST_SIZE_PROBS))


def simulate_requests(rng: np.random.Generator, users: Users, items: Items, chunk: Chunk) -> Impressions:
    """Sessions, page views and the items shown for one chunk: exactly ``chunk.n_rows`` impressions."""
    day_us = timestamp_us(START) + chunk.day * US_PER_DAY
    lo_us = day_us + int(np.interp(chunk.u_lo, _DAY_CDF, _DAY_SECONDS) * US_PER_S)
    hi_us = day_us + int(np.interp(chunk.u_hi, _DAY_CDF, _DAY_SECONDS) * US_PER_S)
    parts: list[tuple[np.ndarray, ...]] = []
    total = 0
    while total < chunk.n_rows:  # almost always one pass; the margin makes a second one rare
        n_sessions = int((chunk.n_rows - total) / (_MEAN_SIZE * MEAN_PAGEVIEWS) * 1.2) + 8
        s_user = draw(rng, users.activity_cdf, n_sessions)
        s_device = np.where(
            rng.random(n_sessions) < USUAL_DEVICE_SHARE,
            users.device[s_user],
            draw(rng, _DEVICE_CDF, n_sessions),
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
            day_us + ((start_s[session] + offset_s) * US_PER_S).astype(np.int64), lo_us, hi_us - 1
        )
        size = REQUEST_SIZES[draw(rng, _SIZE_CDF, len(session))]
        page = draw(rng, _PAGE_CDF, len(session))
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
    return Impressions(
        request=request,
        ts_us=ts_us[request],
        user=imp_user,
        item=item,
        position=position,
        device=device[request],
        page=page[request],
        n_requests=keep,
    )


@dataclass(frozen=True)
class _Shelf:
    """Popularity samplers over the items listed before some time (unlisted items weigh 0)."""

    by_top: np.ndarray  # (I,) item indices sorted by top category
    global_cdf: Guided  # (I,) normalized cumulative popularity
    global_last: int  # last listed item, the upper clip of a global draw
    top_cdf: Guided  # (I,) over by_top: block c runs from c to c + 1, so ``c + uniform`` draws within c
    top_first: np.ndarray  # (20,) first listed position of each block in by_top
    top_last: np.ndarray  # (20,) last listed position of each block in by_top


def _shelf(items: Items, before_us: int) -> _Shelf:
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
        global_cdf=Guided.build(global_cdf, 1.0),
        global_last=int(np.flatnonzero(weight > 0)[-1]),
        top_cdf=Guided.build(top_cdf, float(N_TOP)),
        top_first=listed[np.searchsorted(sorted_top[listed], blocks, side="left")],
        top_last=listed[np.searchsorted(sorted_top[listed], blocks, side="right") - 1],
    )


def preferred_top(users: Users, user: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """(n,) top categories drawn from each row's user preference, given (n,) uniforms in [0, 1)."""
    return np.clip(users.pref_cdf.search(user + uniform) - user * N_TOP, 0, N_TOP - 1)


def _sample_items(rng: np.random.Generator, users: Users, shelf: _Shelf, user: np.ndarray) -> np.ndarray:
    """(N,) item indices: a preferred top category then popularity within it, else global popularity."""
    n = len(user)
    item = np.empty(n, dtype=np.int64)
    preferred = rng.random(n) < PREFERRED_SHARE
    pu = user[preferred]
    top = preferred_top(users, pu, rng.random(len(pu)))
    pos = shelf.top_cdf.search(top + rng.random(len(pu)))
    item[preferred] = shelf.by_top[np.clip(pos, shelf.top_first[top], shelf.top_last[top])]
    other = shelf.global_cdf.search(rng.random(n - len(pu)))
    item[~preferred] = np.minimum(other, shelf.global_last)
    return item


def _redraw_repeats(
    rng: np.random.Generator,
    users: Users,
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
