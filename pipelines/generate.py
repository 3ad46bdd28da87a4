"""Generate a synthetic e-commerce impression log with known click and purchase probabilities.

Writes impressions.parquet, users.parquet, items.parquet (the data contract) and truth.parquet
(impression_id, p_click, p_purchase_given_click, p_purchase) into --out. The same --seed gives
byte-identical files. --world picks the truth model: default (described in synth/world.py), interest
or daypart (described in synth/worlds.py); all write the same tables.

Examples::

    python -m pipelines.generate --out data/synth --impressions 1000000 --seed 7
    python -m pipelines.generate --out data/synth_interest --impressions 2000000 --seed 7 --world interest
    python -m pipelines.generate --out data/synth_rho0 --impressions 20000000 --seed 7 --task-correlation 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from features import console
from pipelines.cli import add_console_flags, fail, quiet_console
from synth.generate import WORLDS, generate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.add_argument("--impressions", type=int, required=True, help="number of impression rows")
    parser.add_argument("--seed", type=int, required=True, help="random seed (>= 0)")
    parser.add_argument(
        "--task-correlation",
        type=float,
        default=0.5,
        help="cosine in [-1, 1] between the click and purchase weight vectors (default: %(default)s)",
    )
    parser.add_argument(
        "--world", choices=tuple(WORLDS), default="default", help="the truth model (default: %(default)s)"
    )
    parser.add_argument(
        "--users",
        type=int,
        default=None,
        help="users (default: the world's; max(100, impressions/100) in default)",
    )
    parser.add_argument(
        "--items",
        type=int,
        default=None,
        help="items (default: the world's; max(200, impressions/50) in default)",
    )
    parser.add_argument("--days", type=int, default=30, help="days in the window (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_console_flags(parser, "OUT.log, beside the output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generates the tables and prints a summary; returns the exit status."""
    args = parse_args(argv)
    with quiet_console(args, args.out.parent / f"{args.out.name}.log"):
        try:
            result = generate(
                args.out,
                args.impressions,
                args.seed,
                task_correlation=args.task_correlation,
                n_users=args.users,
                n_items=args.items,
                days=args.days,
                world=args.world,
                progress=not args.no_progress,
            )
        except ValueError as err:
            return fail(err)
        console.story(
            f"wrote {result.n_impressions:,} impressions ({result.n_requests:,} requests), "
            f"{result.n_users:,} users, {result.n_items:,} items ({result.world} world) into {args.out}\n"
            f"click rate {result.click_rate:.4f} (mean p_click {result.mean_p_click:.4f}), "
            f"purchase rate {result.purchase_rate:.5f} (mean p_purchase {result.mean_p_purchase:.5f}), "
            f"purchase given click {result.purchase_given_click_rate:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
