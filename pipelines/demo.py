"""The main job end to end on embedded defaults: generate a synthetic e-commerce log, build its features.

    python -m pipelines.demo --out data/demo [--impressions 200000] [--seed 7]

Writes ``OUT/raw`` (the contract tables and ``truth.parquet``) and ``OUT/features`` (model-ready Parquet
and the fitted spec), then prints where they are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from features.config import FeatureConfig, builtin_config
from features.generate import generate
from features.pipeline import build, load_tables


def run_demo(out: Path, impressions: int, seed: int) -> dict[str, Path]:
    """Generates data into ``out/raw`` and builds features into ``out/features``; returns the paths."""
    raw, feats = out / "raw", out / "features"
    gen = generate(raw, impressions, seed)
    print(
        f"generated {impressions:,} impressions into {raw} "
        f"(click rate {gen.click_rate:.3f}, purchase rate {gen.purchase_rate:.4f})"
    )
    config = FeatureConfig.from_yaml(builtin_config("ecommerce"))
    spec, result = build(config, load_tables(raw), feats, overwrite=True)
    print(f"features: {result.rows} rows in {result.seconds:.1f} s, spec {spec.content_hash[:12]}")
    return {"raw": raw, "features": feats, "spec": feats / "spec.json"}


def main(argv: list[str] | None = None) -> int:
    """Parses arguments and runs the demo."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--impressions", type=int, default=200_000, help="impressions to generate")
    parser.add_argument("--seed", type=int, default=7, help="generator seed")
    args = parser.parse_args(argv)
    paths = run_demo(Path(args.out), args.impressions, args.seed)
    print("\ndone. Data and features are here:")
    for name, path in paths.items():
        print(f"  {name:9s} {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
