"""Benchmark: distributed training throughput of the benchmark model with 1 and 2 Ray Train workers.

    python benchmarks/train_bench.py [--rows 400000] [--workers 1 2] [--batch-size 2048]

Makes a flat table of random rows in the benchmark shape of the model issue (16 categorical features of
cardinality 8 to 200,000 log-spaced, one multi-hot bag of ~20 ids on the largest vocabulary, 8 numeric
features, 2 labels), builds its features with the flat feature path, then trains
``recsys/configs/benchmark_mmoe.yaml`` (MMoE, 8 experts [256, 128], towers [64], embedding dim 16) for
one epoch through ``recsys.train.run_training`` (real Ray Train, DistributedModelParallel, fused
row-wise Adagrad, Ray Data streaming), once per worker count. Reports the median of the run's
``train/examples_per_s`` windows (all workers' rows per second, data loading included; the first
window, with start-up, left out) and the whole run's wall time (Ray start-up, planning, evaluation and
model registration included). Tracking goes to a throwaway SQLite store.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import polars as pl

from features.config import FeatureConfig
from features.pipeline import Tables, build, scan_table
from recsys.train import run_training
from recsys.train_config import TrainConfig

NUM_CATEGORICAL, NUM_DENSE, BAG_MEAN = 16, 8, 20


def make_table(rows: int, seed: int) -> pl.DataFrame:
    """Random rows in the benchmark shape; labels depend weakly on two features so training is real."""
    rng = np.random.default_rng(seed)
    sizes = np.geomspace(8, 200_000, NUM_CATEGORICAL).round().astype(int)
    columns: dict[str, object] = {f"c{i}": rng.integers(0, n, rows) for i, n in enumerate(sizes)}
    lengths = rng.poisson(BAG_MEAN, rows)
    flat = rng.integers(0, sizes[-1], int(lengths.sum()))
    columns["bag"] = pl.Series(np.split(flat, np.cumsum(lengths)[:-1])).cast(pl.List(pl.Int64))
    for j in range(NUM_DENSE):
        columns[f"x{j}"] = rng.normal(size=rows)
    logit = -2.5 + 0.8 * columns["x0"] + 0.5 * (columns["c3"] % 2)
    click = rng.random(rows) < 1 / (1 + np.exp(-logit))
    columns["click"] = click.astype(np.int8)
    columns["purchase"] = (click & (rng.random(rows) < 0.2)).astype(np.int8)
    return pl.DataFrame(columns)


def feature_config() -> FeatureConfig:
    features = [{"name": f"c{i}", "kind": "categorical"} for i in range(NUM_CATEGORICAL)]
    features.append({"name": "bag", "kind": "multi_hot", "vocab_of": f"c{NUM_CATEGORICAL - 1}"})
    features += [
        {"name": f"x{j}", "kind": "numeric", "transforms": ["standardize"]} for j in range(NUM_DENSE)
    ]
    return FeatureConfig.from_dict(
        {
            "name": "benchmark",
            "source": "flat",
            "rows_per_file": 100_000,
            "split": {"method": "hash", "validation_fraction": 0.02, "test_fraction": 0.02},
            "labels": [{"name": "click"}, {"name": "purchase"}],
            "features": features,
        }
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=2048)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="recsys-train-bench-"))
    make_table(args.rows, seed=0).write_parquet(root / "table.parquet")
    build(feature_config(), Tables(scan_table(root / "table.parquet")), root / "features", progress=False)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    print(
        f"benchmark model, {args.rows:,} random rows (train split {int(args.rows * 0.96):,}), batch "
        f"{args.batch_size} per worker, 1 epoch, fused row-wise Adagrad + Adam, CPU, gloo"
    )
    for workers in args.workers:
        config = TrainConfig.from_dict(
            {
                "features": str(root / "features"),
                "model": "benchmark_mmoe",
                "group_column": "",
                "training": {
                    "epochs": 1,
                    "batch_size": args.batch_size,
                    "log_every_steps": 10,
                    "main_metric": "click/auc",
                    "shuffle_rows": 0,
                },
                "run": {
                    "experiment": "train-bench",
                    "model_name": "bench",
                    "num_workers": workers,
                    "storage_path": str(root / "ray"),
                    "name": f"workers{workers}",
                    "max_failures": 0,
                },
            }
        )
        started = time.perf_counter()
        result = run_training(config, tracking_uri=uri)
        wall = time.perf_counter() - started
        client = mlflow.MlflowClient(uri)
        rates = [
            m.value
            for m in client.get_metric_history(result.summary["mlflow_run_id"], "train/examples_per_s")
        ]
        steady = rates[1:] or rates
        print(
            f"  {workers} worker(s): {statistics.median(steady):8,.0f} examples/s "
            f"(median of {len(steady)} windows of 10 steps, min {min(steady):,.0f}, max {max(steady):,.0f}); "
            f"run wall time {wall:.0f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
