"""Performance benchmark: the machine's matmul roofline, and our training and prediction examples/s.

Examples::

    python -m pipelines.benchmark                       # 1M rows, 3 repetitions, 3 training epochs
    python -m pipelines.benchmark --rows 200000 --out /tmp/bench --workers 1 2

In one run, on the benchmark shape (benchmarks/measure.py: 16 categorical features of cardinality 8 to
200,000 plus one multi-hot bag, 8 numeric, embedding dim 16; MMoE 8 experts [256, 128], towers [64],
2 tasks; batch 2048; fp32) it

1. generates the benchmark data set (random rows whose labels depend on two features) and builds its
   features with the flat feature path (reused when OUT holds the same number of rows);
2. measures the fp32 matmul GFLOP/s on the experts' shapes, counts the model's FLOPs per example and
   derives the roofline examples/s (all FLOPs at the measured matmul rate) for prediction and training;
3. measures the model alone on a synthetic batch: forward (eval, no grad), and the training step exactly
   as a Ray Train worker runs it (recsys.train.sharding.shard_model: DMP over a one-process group, fused
   row-wise Adagrad on the tables in backward, fused Adam) in a plain loop, without Ray or data loading;
4. measures prediction on the data set's model-ready rows (recsys.package.score_ready: Arrow to tensors
   and the forward), a trained model's weights;
5. trains end to end through recsys.train.driver.run_training (Ray Train, TorchRec DMP with fused row-wise
   Adagrad; each worker reading its share of the Parquet files, or Ray Data streaming with --ingest
   ray_data; the cores shared out among the workers, as torch threads) for --epochs
   epochs: every epoch is one repetition of examples/s (the
   median of its windows of up to 10 steps; the first window, with start-up, left out); reports the
   test AUCs;

and prints a table of medians with min-max over the repetitions and the fraction of the roofline, and
writes it to OUT/benchmark.json.

With --use-gpu it measures the model alone on the first CUDA device instead (no data set, no Ray): the
fp32 matmul rate on the experts' shapes, then for each of --batch-sizes the forward and, for each of
--shardings, the training step of 3. (DMP over a one-process NCCL group, fused row-wise Adagrad on the
tables) with the GPU's utilization (NVML) and its peak memory; for the first sharding also the host's
batch construction from model-ready Arrow rows and the step fed by it, one batch after the other and
from a read-ahead thread that pins the batches.

The end-to-end scoring benchmark (read, features, model, write) of the e-commerce model is
benchmarks/score_bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from features import console
from pipelines.cli import add_console_flags, quiet_console


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; errors name the option and the value."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the data set (1,000,000)")
    parser.add_argument("--out", default="artifacts/benchmark", help="folder (artifacts/benchmark)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (>= 3)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs, one repetition each (>= 1)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="Ray Train worker counts ([1])")
    parser.add_argument(
        "--ingest",
        nargs="+",
        default=["parquet"],
        choices=["parquet", "ray_data"],
        help="how training reads its data (training.ingest), each one run per worker count ([parquet])",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (all cores)")
    parser.add_argument("--skip-training", action="store_true", help="no end-to-end training")
    gpu = parser.add_argument_group("GPU (--use-gpu)")
    gpu.add_argument("--use-gpu", action="store_true", help="measure the model on the first CUDA device")
    gpu.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[2048, 16384, 65536],
        help="batch sizes of the GPU measurements (2048 16384 65536)",
    )
    gpu.add_argument(
        "--shardings",
        nargs="+",
        default=["table_wise", "row_wise"],
        choices=["table_wise", "column_wise", "table_column_wise", "row_wise", "auto"],
        help="training.sharding of the tables in the GPU training step (table_wise row_wise)",
    )
    gpu.add_argument(
        "--tf32",
        action="store_true",
        help="let fp32 matmuls use TensorFloat-32 (torch.backends.cuda.matmul.allow_tf32); off by default",
    )
    add_console_flags(parser, "OUT/benchmark.log")
    args = parser.parse_args(argv)
    if args.tf32 and not args.use_gpu:
        parser.error("--tf32: only with --use-gpu")
    bad = [b for b in args.batch_sizes if b < 1]
    if bad:
        parser.error(f"--batch-sizes: expected positive sizes, got {bad[0]}")
    if args.reps < 3:
        parser.error(f"--reps: expected at least 3, got {args.reps}")
    if args.rows < 10_000:
        parser.error(f"--rows: expected at least 10,000, got {args.rows}")
    if args.epochs < 1:
        parser.error(f"--epochs: expected at least 1, got {args.epochs}")
    return args


CHUNK_ROWS = 1_000_000


def prepare(out: Path, rows: int) -> Path:
    """The data set's features folder, built unless OUT already holds one of ``rows`` rows."""
    from benchmarks.measure import feature_config, make_table
    from features.pipeline import Tables, build, scan_table

    features = out / "features"
    marker = out / "rows.json"
    if marker.exists() and json.loads(marker.read_text()).get("rows") == rows and features.exists():
        console.story(f"reusing the {rows:,}-row data set in {out}")
        return features
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    # Chunks of at most 1M rows (chunk i from seed i), so that 20M rows never sit in memory at once;
    # up to 1M rows it is one chunk, the same rows as before.
    tables = out / "table"
    shutil.rmtree(tables, ignore_errors=True)
    tables.mkdir()
    for i, start in enumerate(range(0, rows, CHUNK_ROWS)):
        make_table(min(CHUNK_ROWS, rows - start), seed=i).write_parquet(tables / f"part-{i:04d}.parquet")
    build(feature_config(), Tables(scan_table(tables)), features, progress=True, overwrite=True)
    marker.write_text(json.dumps({"rows": rows}))
    console.story(
        f"generated {rows:,} rows and built their features in {time.perf_counter() - started:.0f} s"
    )
    return features


def model_alone(reps: int) -> dict[str, Any]:
    """Matmul GFLOP/s, FLOPs per example, and the model's forward and training step on a synthetic batch."""
    import torch

    from benchmarks.measure import (
        BATCH,
        benchmark_layout,
        flops_per_example,
        matmul_gflops,
        roofline,
        sharded_training_step,
        spread,
        synthetic_batch,
        timed,
    )
    from recsys.config import ModelConfig, builtin_config
    from recsys.model import build_model

    torch.manual_seed(0)
    config = ModelConfig.from_yaml(builtin_config("benchmark_mmoe"))
    layout = benchmark_layout()
    batch = synthetic_batch(layout, BATCH, torch.Generator().manual_seed(0))
    model = build_model(config, layout)
    in_dim = len(layout.sparse) * config.embedding.dim + len(layout.dense)
    flops = flops_per_example(config, layout, batch.sparse.values().numel() / BATCH)
    gflops, per_shape = matmul_gflops(config, in_dim, reps)

    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(batch.dense, batch.sparse)

    forward_rates = [BATCH / s for s in timed(forward, 5, reps)]
    # The training step as a Ray Train worker runs it (DMP, fused row-wise Adagrad in backward, fused
    # Adam), in a plain loop over one batch: the ceiling of end-to-end training with the same threads.
    with sharded_training_step() as step:
        step_rates = [BATCH / s for s in timed(step, 5, reps)]
    return {
        **roofline(gflops, per_shape, flops),
        "model_forward": spread(forward_rates),
        "model_training_step": spread(step_rates),
    }


def train_end_to_end(features: Path, out: Path, workers: int, epochs: int, ingest: str) -> dict[str, Any]:
    """Trains the benchmark model through run_training; examples/s per epoch and the test AUCs."""
    import pyarrow.parquet as pq

    from benchmarks.measure import BATCH, TreeMemory, spread
    from recsys.tracking import metric_history
    from recsys.train.config import TrainConfig
    from recsys.train.driver import run_training

    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    train_rows = sum(pq.read_metadata(f).num_rows for f in (features / "train").glob("*.parquet"))
    steps_per_epoch = train_rows // (BATCH * workers)
    window = min(10, max(1, steps_per_epoch // 4))  # a few windows per epoch even on small data
    config = TrainConfig.from_dict(
        {
            "features": str(features),
            "model": "benchmark_mmoe",
            "group_column": "",
            "training": {
                "epochs": epochs,
                "batch_size": BATCH,
                "log_every_steps": window,
                "main_metric": "click/auc",
                "shuffle_rows": 0,
                "ingest": ingest,
                "early_stopping_patience": 0,
            },
            "run": {
                "experiment": "benchmark",
                "model_name": "benchmark",
                "num_workers": workers,
                # Every core in use: one worker gets both cores' threads, two workers one each.
                "cpus_per_worker": max(1, (os.cpu_count() or 1) // workers),
                "storage_path": str((out / "ray").resolve()),
                "name": f"workers{workers}-{ingest}-{time.strftime('%Y%m%d-%H%M%S')}",
                "max_failures": 0,
            },
        }
    )
    started = time.perf_counter()
    with TreeMemory(interval_s=1.0) as memory:  # the driver, the embedded Ray and its workers
        result = run_training(config, tracking_uri=uri)
    wall = time.perf_counter() - started
    history = metric_history(uri, result.summary.mlflow_run_id, "train/examples_per_s")
    per_epoch: dict[int, list[float]] = {}
    for step, value in history[1:]:  # the first window holds the start-up
        per_epoch.setdefault((step - 1) // max(1, steps_per_epoch), []).append(value)
    epoch_rates = [statistics.median(v) for _, v in sorted(per_epoch.items()) if v]
    test = {k: v for k, v in result.summary.test.items() if k.endswith("/auc")}
    return {
        "workers": workers,
        "ingest": ingest,
        "examples_per_s": spread(epoch_rates) if epoch_rates else (float("nan"),) * 3,
        "epochs": len(epoch_rates),
        "wall_s": wall,
        "peak_rss_gib": memory.peak_rss / 2**30,
        "peak_pss_gib": memory.peak_pss / 2**30,
        "train_rows": train_rows,
        "test_auc": test,
        "run_dir": str(result.storage),
    }


def prediction(features: Path, out: Path, reps: int, threads: int) -> tuple[float, float, float]:
    """score_ready on the data set's validation and test rows with the last training run's weights."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from benchmarks.measure import BATCH, spread
    from recsys.package import load_package, score_ready

    packages = sorted((out / "ray").glob("*/model/package.json"), key=lambda p: p.stat().st_mtime)
    if not packages:
        raise SystemExit("prediction: no trained model under OUT/ray (run without --skip-training once)")
    package = load_package(packages[-1].parent)
    files = sorted((features / "valid").glob("*.parquet")) + sorted((features / "test").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    torch.set_num_threads(threads)
    score_ready(package, table.slice(0, BATCH), BATCH)  # warm-up
    rates = []
    for _ in range(reps):
        started = time.perf_counter()
        score_ready(package, table, BATCH)
        rates.append(table.num_rows / (time.perf_counter() - started))
    return spread(rates)


def fmt(values: tuple[float, float, float]) -> str:
    """``median  (min-max)``."""
    median, low, high = values
    return f"{median:>9,.0f}  ({low:,.0f}-{high:,.0f})"


def print_roofline(report: dict[str, Any], where: str, decimals: int) -> None:
    """The head of both tables: the matmul rate (``where``: at which batch), FLOPs and roofline."""
    console.story(
        f"\nmatmul fp32 on the experts' shapes{where}: {report['matmul_gflops']:,.{decimals}f} GFLOP/s"
    )
    for name, value in report["matmul_per_shape"].items():
        console.story(f"  {name}: {value:,.{decimals}f} GFLOP/s")
    console.story(
        f"FLOPs per example: forward {report['flops_forward'] / 1e6:.2f} MFLOP, training (3x) "
        f"{report['flops_training'] / 1e6:.2f} MFLOP"
    )
    roof_p, roof_t = report["roofline_prediction"], report["roofline_training"]
    console.story(f"roofline: prediction {roof_p:,.0f} examples/s, training {roof_t:,.0f} examples/s\n")


def print_device_table(report: dict[str, Any]) -> None:
    """Prints :func:`benchmarks.measure.device_measurements`' report as a table."""
    roof_p, roof_t = report["roofline_prediction"], report["roofline_training"]
    largest = max(r["batch_size"] for r in report["batches"])
    print_roofline(report, f", batch {largest:,}", decimals=0)
    console.story(f"{'measurement':48s} {'examples/s median (min-max)':>38s}  roofline  GPU util  peak mem")
    printed: set[int] = set()
    for row in report["batches"]:
        size = row["batch_size"]
        if size not in printed:
            printed.add(size)
            forward = row["forward"]
            console.story(f"{f'forward, batch {size:,}':48s} {fmt(forward):>38s}  {forward[0] / roof_p:7.0%}")
        name = f"training step, batch {size:,}, {row['sharding']}"
        if "error" in row:
            console.story(f"{name:48s} failed: {row['error'][:300]}")
            continue
        util = row["gpu_utilization"]
        util_text = f"{util:7.0f}%" if util is not None else "     n/a"
        memory = row["peak_memory_gib"]
        memory_text = f"{memory:6.2f} GiB" if memory is not None else "       n/a"
        step = row["training_step"]
        console.story(f"{name:48s} {fmt(step):>38s}  {step[0] / roof_t:7.0%}  {util_text}  {memory_text}")
        if "training_from_arrow" in row:
            build, fed = row["batch_from_arrow"], row["training_from_arrow"]
            console.story(f"{f'  batch from Arrow rows on the host, batch {size:,}':48s} {fmt(build):>38s}")
            name = f"  training step fed by it, batch {size:,}"
            console.story(f"{name:48s} {fmt(fed):>38s}  {fed[0] / roof_t:7.0%}")
            ahead = row["training_read_ahead"]
            name = f"  fed by a read-ahead thread, batch {size:,}"
            console.story(f"{name:48s} {fmt(ahead):>38s}  {ahead[0] / roof_t:7.0%}")
        if row["gpu_utilization_error"]:
            console.story(f"  GPU utilization not read: {row['gpu_utilization_error']}")


def gpu_main(args: argparse.Namespace) -> int:
    """``--use-gpu``: the model alone on the first CUDA device, at each batch size and sharding."""
    import torch

    from benchmarks.measure import cpu_model, device_measurements

    if not torch.cuda.is_available():
        raise SystemExit(
            f"--use-gpu: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
        )
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console.story(
        f"{torch.cuda.get_device_name(device)}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"{cpu_model()} host, fp32, TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    report = device_measurements(device, args.batch_sizes, args.shardings, args.reps)
    report.update({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cuda": torch.version.cuda})
    report["tf32"] = args.tf32
    print_device_table(report)
    name = "benchmark_gpu_tf32.json" if args.tf32 else "benchmark_gpu.json"
    (out / name).write_text(json.dumps(report, indent=1, default=str))
    console.story(f"\nwritten: {out / name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs every measurement and prints the table."""
    args = parse_args(argv)
    with quiet_console(args, Path(args.out) / "benchmark.log"):
        return gpu_main(args) if args.use_gpu else cpu_main(args)


def cpu_main(args: argparse.Namespace) -> int:
    """The CPU measurements and their table."""
    import torch

    from benchmarks.measure import cpu_model

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    features = prepare(out, args.rows)
    console.story(
        f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores, "
        f"torch {torch.__version__}, "
        f"{args.threads} threads, fp32, batch 2048, {time.strftime('%Y-%m-%d')}"
    )
    report: dict[str, Any] = {
        "rows": args.rows,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    report.update(model_alone(args.reps))
    trainings = []
    if not args.skip_training:
        for ingest in args.ingest:
            for workers in args.workers:
                trainings.append(train_end_to_end(features, out, workers, args.epochs, ingest))
                torch.set_num_threads(args.threads)  # Ray may have changed it in this process
    report["training"] = trainings
    report["prediction"] = prediction(features, out, args.reps, args.threads)

    roof_p, roof_t = report["roofline_prediction"], report["roofline_training"]
    print_roofline(report, "", decimals=1)
    console.story(f"{'measurement':58s} {'examples/s median (min-max)':>30s}  of roofline")
    rows = [
        (f"model forward, synthetic batch ({args.reps} reps)", report["model_forward"], roof_p),
        (
            f"prediction on model-ready rows, score_ready ({args.reps} reps)",
            report["prediction"],
            roof_p,
        ),
        (f"training step, plain loop, no Ray ({args.reps} reps)", report["model_training_step"], roof_t),
    ]
    for t in trainings:
        rows.append(
            (
                f"training end to end, {t['workers']} worker(s), {t['ingest']} ({t['epochs']} epochs)",
                t["examples_per_s"],
                roof_t,
            )
        )
    for name, values, roof in rows:
        console.story(f"{name:58s} {fmt(values):>30s}  {values[0] / roof:6.0%}")
    for t in trainings:
        aucs = ", ".join(f"{k} {v:.4f}" for k, v in sorted(t["test_auc"].items()))
        ray_share = t["examples_per_s"][0] / report["model_training_step"][0]
        console.story(
            f"  {t['workers']} worker(s), {t['ingest']}: wall {t['wall_s']:.0f} s for {t['train_rows']:,} "
            f"rows/epoch; peak memory of the process tree RSS {t['peak_rss_gib']:.2f} GiB, "
            f"PSS {t['peak_pss_gib']:.2f} GiB; "
            f"{aucs}; end to end / plain loop {ray_share:.0%}"
        )
    (out / "benchmark.json").write_text(json.dumps(report, indent=1, default=str))
    console.story(f"\nwritten: {out / 'benchmark.json'}")
    return 0


if __name__ == "__main__":
    from recsys.runtime import reexec_with_model_env

    reexec_with_model_env()  # the same allocator settings as the Ray workers
    sys.exit(main())
