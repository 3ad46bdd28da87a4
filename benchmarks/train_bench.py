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

from features.pipeline import Tables, build, scan_table
from recsys.benchmark import feature_config, make_table
from recsys.train import run_training
from recsys.train_config import TrainConfig


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
