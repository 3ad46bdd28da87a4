"""The numbers behind ``docs/features.md`` "Worlds": each world's raw term moments and exposure per user/item.

    python -m benchmarks.worlds_table [--sizes 2000000 20000000] [--moments-rows 500000]

* Moments: mean and standard deviation of each term's raw value over the last 20 days of a
  ``--moments-rows`` world of seed 0 (the traffic only: no labels, no click history), the numbers the
  worlds' frozen ``center`` and ``scale`` were set from.
* Exposure: for each world at each size, its default users and items and the expected impressions per
  user and per item, computed from the samplers' probabilities (a user's activity share; an item's share of
  global popularity draws plus preferred-category draws) without drawing impressions, so 20M costs seconds.
  ``typical`` is the impression-weighted median: half the impressions go to users (items) with fewer.
"""

from __future__ import annotations

import argparse

import numpy as np

from synth.generate import DEFAULT_CHUNK_ROWS
from synth.tables import Items, Users, make_items, make_users
from synth.traffic import plan_chunks, simulate_requests
from synth.truth import RAW_TERMS, Rows
from synth.world import N_TOP, PREFERRED_SHARE
from synth.worlds import WORLDS, World


def _population(world: World, n_impressions: int, seed: int, days: int) -> tuple[Users, Items]:
    """The world's users and items at its default sizes, as ``generate`` draws them."""
    items_seq, users_seq, _, _ = np.random.SeedSequence(seed).spawn(4)
    items, _ = make_items(np.random.default_rng(items_seq), world.default_items(n_impressions), days)
    users, _ = make_users(
        np.random.default_rng(users_seq), world.default_users(n_impressions), world.pref_concentration
    )
    return users, items


def raw_moments(world: World, n_impressions: int, seed: int = 0, days: int = 30) -> dict[str, tuple]:
    """``{term: (mean, sd)}`` of the raw values over the impressions of days 10..29."""
    users, items = _population(world, n_impressions, seed, days)
    chunks = [c for c in plan_chunks(n_impressions, days, DEFAULT_CHUNK_ROWS) if c.day >= 10]
    rng = np.random.default_rng(seed)
    no_history = np.full(len(users.propensity), -1)
    values: dict[str, list[np.ndarray]] = {t.name: [] for t in world.terms}
    for chunk in chunks:
        rows = Rows(simulate_requests(rng, users, items, chunk), users, items, no_history)
        for name, parts in values.items():
            parts.append(RAW_TERMS[name](rows))
    joined = {name: np.concatenate(parts) for name, parts in values.items()}
    return {name: (float(x.mean()), float(x.std())) for name, x in joined.items()}


def _typical(counts: np.ndarray) -> float:
    """Impression-weighted median of ``counts``."""
    order = np.sort(counts)
    cum = np.cumsum(order)
    return float(order[np.searchsorted(cum, 0.5 * cum[-1])])


def exposure(world: World, n_impressions: int, seed: int = 0, days: int = 30) -> dict[str, float]:
    """Default users and items and the expected impressions per user and per item (mean, median, typical)."""
    users, items = _population(world, n_impressions, seed, days)
    n_users = len(users.propensity)
    activity = np.diff(users.activity_cdf, prepend=0.0)  # (U,) share of sessions
    per_user = n_impressions * activity
    pref = np.diff(users.pref_cdf.values.reshape(n_users, N_TOP), axis=1, prepend=0.0)
    pref[:, 0] -= np.arange(n_users)  # the CDF rows are offset by the user index
    top_share = activity @ pref  # (20,) share of preferred draws per top category
    pop = items.popularity
    top_pop = np.bincount(items.top, weights=pop, minlength=N_TOP)
    preferred = top_share[items.top] * pop / top_pop[items.top]
    per_item = n_impressions * ((1 - PREFERRED_SHARE) * pop / pop.sum() + PREFERRED_SHARE * preferred)
    return {
        "users": n_users,
        "items": len(pop),
        "user_mean": float(per_user.mean()),
        "user_median": float(np.median(per_user)),
        "user_typical": _typical(per_user),
        "item_mean": float(per_item.mean()),
        "item_median": float(np.median(per_item)),
        "item_typical": _typical(per_item),
    }


def main(argv: list[str] | None = None) -> None:
    """Prints the moments and the exposure table as markdown."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worlds_table", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000_000, 20_000_000])
    parser.add_argument("--moments-rows", type=int, default=500_000)
    args = parser.parse_args(argv)
    for world in WORLDS.values():
        moments = raw_moments(world, args.moments_rows)
        print(f"{world.name}: " + ", ".join(f"{k} {m:.3f}/{s:.3f}" for k, (m, s) in moments.items()))
    print("\n| world | impressions | users | items | per user: mean / median / typical ", end="")
    print("| per item: mean / median / typical |")
    print("|---|---:|---:|---:|---:|---:|")
    for world in WORLDS.values():
        for n in args.sizes:
            e = exposure(world, n)
            print(
                f"| {world.name} | {n / 1e6:g}M | {e['users']:,} | {e['items']:,} | "
                f"{e['user_mean']:.0f} / {e['user_median']:.0f} / {e['user_typical']:.0f} | "
                f"{e['item_mean']:.0f} / {e['item_median']:.0f} / {e['item_typical']:.0f} |"
            )


if __name__ == "__main__":
    main()
