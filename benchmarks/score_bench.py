"""End-to-end batch scoring throughput and memory, next to the bare model forward of the same model.

Generates (or reuses) N candidate rows with their users, items and click history, builds a model of the
demo's shape (recsys/configs/ecommerce_mmoe.yaml: MMoE, 8 experts [256, 128], dim 16) with random weights
on a spec fitted to that data (or takes --model URI --tracking-uri), then:

* scores them with recsys.scoring.job.run_scoring (read, features, model, rank, write; Ray Data), sampling
  the memory of this process and all its descendants (the local Ray and its workers) every 0.5 s;
* checks rows in == rows out, and that every impression_id is in the output exactly once;
* measures the bare model forward (recsys.package.score_ready, no_grad, eval mode) on model-ready rows
  of the same data, computed beforehand and not timed, in two layouts: one process with a torch thread
  per core, and one single-threaded process per core running at once (rows of all / wall time). The
  better of the two is the bare forward; the script prints end to end over it (target >= 60%) and the
  peak memory (target < 8 GiB).

Run: .venv/bin/python -m benchmarks.score_bench --rows 1000000 [--data /tmp/score_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import torch

from benchmarks.measure import TreeMemory
from features.config import FeatureConfig, builtin_config
from features.pipeline import Tables, fit_spec
from recsys.config import ModelConfig
from recsys.config import builtin_config as builtin_model_config
from recsys.data.batch import FeatureLayout
from recsys.model import build_model
from recsys.package import load_package, model_ready, save_package, score_ready
from recsys.scoring import ScoreConfig, run_scoring
from synth.candidates import generate_candidates

GIB = 1024**3


def prepare(data: Path, rows: int, seed: int) -> None:
    """Candidates, users, items and history (generate_candidates) and a random-weight package."""
    if (data / "impressions.parquet").exists() and pq.read_metadata(
        data / "impressions.parquet"
    ).num_rows == rows:
        print(f"reusing {rows:,} candidates in {data}")
    else:
        started = time.perf_counter()
        shutil.rmtree(data, ignore_errors=True)
        generate_candidates(data, rows, seed, progress=False)
        print(f"generated {rows:,} candidates in {data} in {time.perf_counter() - started:.0f} s")
    if (data / "model" / "package.json").exists():
        return
    # The spec is fitted on ~500k history rows spread over the whole time range (every k-th row): enough
    # for the vocabularies and statistics, and the time split's training window is never empty.
    every = max(1, rows // 500_000)
    history = pl.scan_parquet(data / "history.parquet").gather_every(every)
    tables = Tables(history, pl.scan_parquet(data / "users.parquet"), pl.scan_parquet(data / "items.parquet"))
    spec = fit_spec(FeatureConfig.from_yaml(builtin_config("ecommerce")), tables)
    config = ModelConfig.from_yaml(builtin_model_config("ecommerce_mmoe"))
    torch.manual_seed(0)
    model = build_model(config, FeatureLayout.from_spec(spec, config.embedding))
    save_package(data / "model", model, config, spec, overwrite=True)


def _ready_rows(package_dir: Path, data: Path, sample_rows: int, offset: int = 0):
    package = load_package(package_dir)
    tables = Tables(
        pl.scan_parquet(data / "impressions.parquet").slice(offset, sample_rows),
        pl.scan_parquet(data / "users.parquet"),
        pl.scan_parquet(data / "items.parquet"),
        pl.scan_parquet(data / "history.parquet").filter(pl.col("click") == 1),
    )
    return package, model_ready(package.spec, tables).to_arrow()


def bare_forward(package_dir: Path, data: Path, batch_size: int, sample_rows: int, threads: int) -> float:
    """Rows/s of the model alone in this process with ``threads`` torch threads; best of 3 passes."""
    package, ready = _ready_rows(package_dir, data, sample_rows)
    torch.set_num_threads(threads)
    score_ready(package, ready.slice(0, batch_size), batch_size)  # warm-up
    times = []
    for _ in range(3):
        started = time.perf_counter()
        score_ready(package, ready, batch_size)
        times.append(time.perf_counter() - started)
    return ready.num_rows / min(times)


def _worker(args: tuple) -> tuple[int, float, float]:
    package_dir, data, batch_size, sample_rows, offset, barrier = args
    torch.set_num_threads(1)
    package, ready = _ready_rows(package_dir, data, sample_rows, offset)
    score_ready(package, ready.slice(0, batch_size), batch_size)  # warm-up
    barrier.wait()
    started = time.perf_counter()
    for _ in range(2):
        score_ready(package, ready, batch_size)
    return 2 * ready.num_rows, started, time.perf_counter()


def bare_forward_processes(
    package_dir: Path, data: Path, batch_size: int, sample_rows: int, procs: int
) -> float:
    """Rows/s of ``procs`` single-threaded processes scoring at once: all their rows over the wall time."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(procs)
        jobs = [(package_dir, data, batch_size, sample_rows, i * sample_rows, barrier) for i in range(procs)]
        with ctx.Pool(procs) as pool:
            results = pool.map(_worker, jobs)
    rows = sum(r[0] for r in results)
    return rows / (max(r[2] for r in results) - min(r[1] for r in results))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000_000, help="candidate rows (default 10M)")
    parser.add_argument("--data", default="/tmp/score_bench", help="data folder (reused when it has --rows)")
    parser.add_argument("--out", help="output folder (default DATA/out, replaced)")
    parser.add_argument("--model", help="a model URI or package folder (default: DATA/model, random weights)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///DATA/mlflow.db)")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--batch-size", type=int, default=ScoreConfig("-", "-", "-").batch_size)
    parser.add_argument("--concurrency", type=int, default=ScoreConfig("-", "-", "-").concurrency)
    parser.add_argument("--threads-per-actor", type=int, default=ScoreConfig("-", "-", "-").threads_per_actor)
    parser.add_argument(
        "--rows-per-partition", type=int, default=ScoreConfig("-", "-", "-").rows_per_partition
    )
    parser.add_argument("--bare-rows", type=int, default=200_000, help="rows of the bare forward measurement")
    args = parser.parse_args()

    data = Path(args.data)
    prepare(data, args.rows, args.seed)
    out = Path(args.out) if args.out else data / "out"
    shutil.rmtree(out, ignore_errors=True)
    tracking_uri = args.tracking_uri or f"sqlite:///{data / 'mlflow.db'}"
    config = ScoreConfig(
        model=args.model or str(data / "model"),
        input=str(data / "impressions.parquet"),
        output=str(out),
        history=str(data / "history.parquet"),
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        threads_per_actor=args.threads_per_actor,
        rows_per_partition=args.rows_per_partition,
        tracking_uri=tracking_uri,
    )
    with TreeMemory() as memory:
        result = run_scoring(config)
    check = pl.scan_parquet(str(out / "part-*.parquet")).select(
        pl.len().alias("rows"), pl.col("impression_id").n_unique().alias("unique")
    )
    rows_out, unique = check.collect().row(0)

    package_dir = Path(config.model) if Path(config.model).is_dir() else None
    if package_dir is None:
        raise SystemExit("--model URI: give its package folder as --model for the bare forward measurement")
    cores = os.cpu_count() or 1
    bare_threads = bare_forward(package_dir, data, args.batch_size, args.bare_rows, cores)
    bare_procs = bare_forward_processes(package_dir, data, args.batch_size, args.bare_rows // cores, cores)
    bare = max(bare_threads, bare_procs)

    end_to_end = result.rows_in / result.seconds
    report = {
        "rows_in": result.rows_in,
        "rows_out": rows_out,
        "rows_in_equal_out": result.rows_in == rows_out == unique,
        "result_ok": result.ok,
        "partitions": result.partitions,
        "seconds_total": round(result.seconds, 1),
        "end_to_end_rows_per_s_total": round(end_to_end),
        "end_to_end_rows_per_s_scoring_phase": round(result.rows_per_s),
        "bare_forward_rows_per_s": round(bare),
        f"bare_forward_1_process_{cores}_threads": round(bare_threads),
        f"bare_forward_{cores}_processes_1_thread": round(bare_procs),
        "ratio_total": round(end_to_end / bare, 3),
        "ratio_scoring_phase": round(result.rows_per_s / bare, 3),
        "peak_rss_tree_gib": round(memory.peak_rss / GIB, 2),
        "peak_pss_tree_gib": round(memory.peak_pss / GIB, 2),
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "threads_per_actor": args.threads_per_actor,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
