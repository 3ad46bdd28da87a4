r"""Hyperparameter search with Ray Tune (ASHA early stopping), every trial an MLflow run.

Examples::

    # embedded local Ray; features from `python -m pipelines.demo` (data/demo/features):
    python -m pipelines.tune --config recsys/configs/tune_mmoe.yaml --search search_mmoe
    # 16 trials, against an MLflow server:
    python -m pipelines.tune --config tune_mmoe --search search_mmoe --num-samples 16 \
        --tracking-uri http://127.0.0.1:5000
    # on a cluster (out/ and the features on storage every node sees):
    RAY_ADDRESS=ray://head:10001 python -m pipelines.tune --config ... --search ... --out /shared/tune

Writes OUT/best.yaml (the best trial's train config: `python -m pipelines.train --config OUT/best.yaml`)
and OUT/trials.csv, also logged to the search's MLflow parent run. Library output goes to OUT/tune.log
(--verbose: on screen too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from features import console
from pipelines.cli import add_console_flags, fail, quiet_console


def main(argv: list[str] | None = None) -> int:
    """Parses arguments and runs the search; bad input exits with status 2 and a one-line reason."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="base train config: a YAML path or a shipped name")
    parser.add_argument("--search", required=True, help="search spec: a YAML path or a shipped name")
    parser.add_argument("--num-samples", type=int, help="trials (overrides the search spec's num_samples)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db)")
    parser.add_argument("--out", help="output folder (default: artifacts/tune/<search name>)")
    parser.add_argument("--features", help="override the config's features folder")
    add_console_flags(parser, "OUT/tune.log")
    args = parser.parse_args(argv)

    from features.checks import config_path
    from recsys.experiments.search import run_search
    from recsys.experiments.search_spec import load_search
    from recsys.train.config import CONFIG_DIR, TrainConfig

    try:
        config = TrainConfig.from_yaml(config_path(args.config, CONFIG_DIR, "train config"))
        if args.features:
            config = config.replace(features=args.features)
        search = load_search(args.search)
    except (ValueError, FileNotFoundError) as exc:
        return fail(exc)
    out = Path(args.out or f"artifacts/tune/{search.name}")
    with quiet_console(args, out / "tune.log"):
        try:
            result = run_search(
                config, search, out, tracking_uri=args.tracking_uri, num_samples=args.num_samples
            )
        except (ValueError, FileNotFoundError) as exc:
            return fail(exc)
        minutes, stopped = result.seconds / 60, result.stopped_early
        console.story(f"\n{len(result.trials)} trials in {minutes:.1f} min, {stopped} stopped early by ASHA")
        for t in sorted(result.trials, key=lambda t: -t.best if t.best == t.best else 0):
            console.story(f"  {t.trial_id}  {t.status:13s} epochs {t.epochs}  best {t.best:.4f}  {t.params}")
        console.story(f"best: trial {result.best_trial}, {result.best_metric:.4f} -> {result.best_path}")
        console.story(f"MLflow parent run {result.parent_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
