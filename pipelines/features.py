r"""Feature pipeline command line: fit a spec, apply it, or both in one pass.

Examples::

    python -m pipelines.features build --config ecommerce --data data/demo/raw --out data/demo/features
    python -m pipelines.features fit --config ecommerce --data data/demo/raw --spec spec.json
    python -m pipelines.features transform --spec spec.json --data data/demo/raw --out features/
    python -m pipelines.features transform --spec spec.json --impressions candidates.parquet \
        --users users.parquet --items items.parquet --history events.parquet --out scoring_features/
    python -m pipelines.features build --config census_group1 \
        --table ../shared/data/census-income/census-income.dev.csv.gz --out data/census
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from features import console
from features.checks import config_path
from features.config import CONFIG_DIR, FeatureConfig
from features.contract import ContractError
from features.files import check_replaceable, refuse_overlap
from features.inputs import refuse_input_file
from features.pipeline import FEATURES, Tables, build, fit_spec, load_tables, scan_table, transform
from features.spec import FeatureSpec
from pipelines.cli import add_console_flags, fail, quiet_console

BAD_INPUT = (ContractError, ValueError, FileNotFoundError, FileExistsError)
INPUT_FLAGS = ("data", "impressions", "users", "items", "history", "table")
OVERWRITE_HELP = "replace an existing output folder (only a features output written by this tool)"


def _config(value: str) -> FeatureConfig:
    return FeatureConfig.from_yaml(config_path(value, CONFIG_DIR, "feature config"))


def _tables(args: argparse.Namespace, source: str) -> Tables:
    if source == "flat":
        if not args.table:
            raise ValueError("--table: a flat config needs the table's path (Parquet or CSV)")
        return Tables(impressions=scan_table(args.table))
    return load_tables(
        args.data, impressions=args.impressions, users=args.users, items=args.items, history=args.history
    )


def _add_inputs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inputs (ecommerce: --data, or the three table paths; flat: --table)")
    g.add_argument("--data", help="folder with impressions.parquet, users.parquet, items.parquet")
    g.add_argument("--impressions", help="impressions (or scoring candidates): Parquet file, folder or glob")
    g.add_argument("--users", help="users table (overrides --data)")
    g.add_argument("--items", help="items table (overrides --data)")
    g.add_argument("--history", help="click log for history features (scoring); default: the impressions")
    g.add_argument("--table", help="flat table (Parquet or CSV, gzip allowed) for a flat config")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.features",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit a spec (vocabularies, statistics) on the training window")
    p.add_argument("--config", required=True, help="YAML path, or a shipped config name (e.g. ecommerce)")
    p.add_argument("--spec", required=True, help="where to write the spec JSON")
    _add_inputs(p)

    p = sub.add_parser("transform", help="apply a spec to training or scoring data")
    p.add_argument("--spec", required=True, help="a spec JSON written by fit or build")
    p.add_argument("--out", required=True, help="output folder (model-ready Parquet)")
    p.add_argument("--no-split", action="store_true", help="write one 'all' folder even when labelled")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _add_inputs(p)

    p = sub.add_parser("build", help="fit on the training window and transform every split, in one pass")
    p.add_argument("--config", required=True, help="YAML path, or a shipped config name (e.g. ecommerce)")
    p.add_argument("--out", required=True, help="output folder (model-ready Parquet and spec.json)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _add_inputs(p)

    for p in sub.choices.values():
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        add_console_flags(p, "beside the output: OUT.log, or SPEC.log for fit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand; bad input exits with status 2 and a one-line reason."""
    args = parse_args(argv)
    target = Path(args.spec if args.command == "fit" else args.out)
    try:
        _check_output(args)  # before the log file is opened beside the output: nothing is written yet
    except BAD_INPUT as exc:
        return fail(exc)
    with quiet_console(args, target.parent / f"{target.name}.log"):
        try:
            return _run(args)
        except BAD_INPUT as exc:
            return fail(exc)


def _check_output(args: argparse.Namespace) -> None:
    """Refuses an output that is, holds or lies in an input, or a folder that is not our features output."""
    inputs = {f"--{flag}": getattr(args, flag) for flag in INPUT_FLAGS if getattr(args, flag)}
    if args.command == "fit":
        inputs["--config"] = config_path(args.config, CONFIG_DIR, "feature config")
        refuse_input_file(args.spec, inputs, "--spec")
    else:
        refuse_overlap(args.out, inputs)
        check_replaceable(args.out, FEATURES, args.overwrite)


def _run(args: argparse.Namespace) -> int:
    if args.command == "fit":
        config = _config(args.config)
        spec = fit_spec(config, _tables(args, config.source))
        path = spec.save(args.spec)
        console.story(f"spec: {path} (content hash {spec.content_hash[:12]})")
        return 0
    if args.command == "transform":
        spec = FeatureSpec.load(args.spec)
        result = transform(
            spec,
            _tables(args, spec.feature_config.source),
            args.out,
            split=False if args.no_split else None,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    else:
        config = _config(args.config)
        spec, result = build(
            config,
            _tables(args, config.source),
            args.out,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    total = sum(result.rows.values())
    console.story(
        f"features: {result.out_dir} ({total:,} rows in {result.seconds:.1f} s; "
        + ", ".join(f"{k}={v:,}" for k, v in result.rows.items())
        + ")"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
