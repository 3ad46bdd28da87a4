"""The main job end to end on embedded defaults: generate data, build features, train, register, score.

    python -m pipelines.demo --out data/demo [--impressions 200000] [--seed 7] [--num-workers 2]

Writes ``OUT/raw`` (the contract tables and ``truth.parquet``), ``OUT/features`` (model-ready Parquet and
the fitted spec), trains the demo model (``recsys/configs/train_demo.yaml``) with Ray Train workers on an
embedded local Ray, tracked in a local MLflow store (``OUT/mlflow.db``), registers it, scores a fresh
generated candidate set (``OUT/candidates``) with the champion into ``OUT/scores``, and prints the MLflow
run, the registered model version, the test metrics, the scoring row counts and the top items of one
request. Library output goes to ``OUT/demo.log`` (``--verbose``: on screen too).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from features import console
from features.config import FeatureConfig, builtin_config
from features.pipeline import build, load_tables
from pipelines.cli import add_console_flags, quiet_console
from recsys.scoring import ScoreConfig, ScoreResult, run_scoring, top_of_request
from recsys.train.config import TrainConfig, builtin_train_config
from recsys.train.driver import run_training
from recsys.train.summary import TrainingSummary
from synth.candidates import generate_candidates
from synth.generate import generate
from synth.worlds import WORLDS


@dataclass(frozen=True)
class DemoResult:
    """What the demo made: its folders, the MLflow store, the training summary and the scoring result."""

    raw: Path
    features: Path
    tracking_uri: str
    run: Path
    training: TrainingSummary
    scored: ScoreResult


def run_demo(
    out: Path,
    impressions: int,
    seed: int,
    num_workers: int = 2,
    candidates: int = 50_000,
    world: str = "default",
) -> DemoResult:
    """Generates data, builds features, trains, registers and scores the demo model; returns what it made."""
    out = out.resolve()
    raw, feats = out / "raw", out / "features"
    gen = generate(raw, impressions, seed, world=world)
    console.story(
        f"generated {impressions:,} impressions into {raw} "
        f"(click rate {gen.click_rate:.3f}, purchase rate {gen.purchase_rate:.4f})"
    )
    config = FeatureConfig.from_yaml(builtin_config("ecommerce"))
    spec, result = build(config, load_tables(raw), feats, overwrite=True)
    rows = ", ".join(f"{split} {n:,}" for split, n in result.rows.items())
    console.story(f"features: {rows} rows in {result.seconds:.1f} s (spec {spec.content_hash[:12]})")
    train = TrainConfig.from_yaml(builtin_train_config("train_demo")).replace(
        features=str(feats),
        truth=str(raw / "truth.parquet"),
        run={"storage_path": str(out / "ray"), "num_workers": num_workers},
    )
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    trained = run_training(train, tracking_uri=tracking_uri)
    # A fresh candidate set (another seed: new requests; its click log is the history), scored by alias.
    cands = generate_candidates(out / "candidates", candidates, seed + 1, world=world, progress=False)
    scored = run_scoring(
        ScoreConfig(
            model=f"models:/{train.run.model_name}@champion",
            input=str(cands.impressions),
            history=str(cands.history),
            output=str(out / "scores"),
            tracking_uri=tracking_uri,
            overwrite=True,
            progress=False,
        )
    )
    if not scored.ok:
        raise RuntimeError(f"scoring: counts differ: {scored.problems}")
    return DemoResult(raw, feats, tracking_uri, trained.storage, trained.summary, scored)


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
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--candidates", type=int, default=50_000, help="candidate rows to score")
    parser.add_argument(
        "--world",
        choices=tuple(WORLDS),
        default="default",
        help="the generator's truth model (default: %(default)s)",
    )
    add_console_flags(parser, "OUT/demo.log")
    args = parser.parse_args(argv)
    with quiet_console(args, Path(args.out) / "demo.log"):
        made = run_demo(
            Path(args.out), args.impressions, args.seed, args.num_workers, args.candidates, args.world
        )
        _print_summary(made)
    return 0


def _print_summary(made: DemoResult) -> None:
    """The end of the demo's story: where everything is, the test metrics and the top of one request."""
    import polars as pl

    summary, scored = made.training, made.scored
    say = console.story
    say("done.")
    say(f"  data        {made.raw}  ->  {made.features}")
    run_id, uri = summary.mlflow_run_id, made.tracking_uri
    say(f"  mlflow      run {run_id}: mlflow ui --backend-store-uri {uri}")
    test = summary.test
    for task in sorted({k.split("/")[1] for k in test if k.count("/") == 2}):
        shown = [m for m in ("auc", "gauc", "calibration", "oracle_auc") if f"test/{task}/{m}" in test]
        say(f"  test {task:10s}" + "  ".join(f"{m} {test[f'test/{task}/{m}']:.4f}" for m in shown))
    say(f"  scores      {scored.rows_in:,} rows in, {scored.rows_out:,} out, into {scored.output}")
    top = top_of_request(scored.output, k=5)
    columns = ["request_id", "item_id", *[c for c in top.columns if c.startswith("p_")], "score", "rank"]
    with pl.Config(tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, tbl_formatting="MARKDOWN"):
        say(f"  top 5 of request {top['request_id'][0]}:\n{top.select(columns)}")


if __name__ == "__main__":
    sys.exit(main())
