"""Scoring precision side by side: AUC against fp32 on the same rows, package size, and rows/s end to end.

For each precision setting (embedding tables x dense layers: fp32/fp32 is today's scoring):

1. quality, with the demo's trained champion (``make demo``: DEMO/mlflow.db) on the demo's test split
   (DEMO/features/test, model-ready rows with labels): the AUC of each task, its difference from fp32 on the
   same rows, the largest change of a probability, the bare forward rows/s on these rows (this process, a
   torch thread per core), and the size of the package that carries the tables in that precision
   (:func:`recsys.package.quantize_package`); the same sizes for the benchmark model (benchmarks/measure.py:
   17 tables up to 200,000 rows, random weights);
2. speed end to end: ``run_scoring`` (read, features, model, rank, write through Ray Data, as
   ``python -m pipelines.score``) on --rows generated candidates with a random-weight model of the demo's
   shape (benchmarks/score_bench.py's data), the settings interleaved over --reps repetitions; rows in ==
   rows out checked on every run.

Run: .venv/bin/python -m benchmarks.score_precision --demo data/demo --rows 2000000 --reps 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks.measure import cpu_model
from benchmarks.score_bench import prepare
from recsys.config import ModelConfig, builtin_config
from recsys.data.batch import FeatureLayout
from recsys.metrics import auc
from recsys.model import build_model
from recsys.package import load_package, package_bytes, quantize_package, save_package, score_ready
from recsys.precision import bf16_supported
from recsys.scoring import ScoreConfig, run_scoring

SETTINGS = [
    ("fp32", "fp32"),
    ("fp32", "auto"),
    ("fp16", "auto"),
    ("int8", "fp32"),
    ("int8", "auto"),
    ("int4", "auto"),
]


def package_sizes(package_dir: Path) -> dict[str, int]:
    """Bytes of the package folder with its tables in each precision."""
    sizes = {"fp32": package_bytes(package_dir)}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("fp16", "int8", "int4"):
            sizes[dtype] = package_bytes(quantize_package(package_dir, Path(tmp) / dtype, dtype))
    return sizes


def champion_package(demo: Path, workdir: Path) -> Path:
    """The demo's champion package, downloaded from DEMO/mlflow.db."""
    from recsys.tracking import Tracker, download_package, resolve_model

    tracker = Tracker(f"sqlite:///{(demo / 'mlflow.db').resolve()}", None)
    return download_package(tracker, resolve_model(tracker, "models:/ecommerce-ranker@champion"), workdir)


def quality(demo: Path, workdir: Path) -> dict[str, object]:
    """Per setting: AUC per task on the demo test split, its change from fp32, bare rows/s, package bytes."""
    package_dir = champion_package(demo, workdir / "champion")
    table = pq.read_table(sorted((demo / "features" / "test").glob("*.parquet")))
    torch.set_num_threads(os.cpu_count() or 1)
    rows: dict[str, dict[str, object]] = {}
    reference: dict[str, np.ndarray] = {}
    for tables, dense in SETTINGS:
        package = load_package(package_dir, embedding_dtype=tables, compute_dtype=dense)
        score_ready(package, table.slice(0, 8192))  # warm-up
        started = time.perf_counter()
        scores = score_ready(package, table)
        seconds = time.perf_counter() - started
        reference = reference or scores
        aucs = {t: auc(table[t].to_numpy().astype(np.float64), s) for t, s in scores.items()}
        rows[f"{tables}/{dense}"] = {
            "auc": {t: round(a, 5) for t, a in aucs.items()},
            "max_abs_change": max(float(np.abs(s - reference[t]).max()) for t, s in scores.items()),
            "bare_rows_per_s": round(table.num_rows / seconds),
        }
    base = rows["fp32/fp32"]["auc"]
    for row in rows.values():
        row["auc_change"] = {t: round(a - base[t], 5) for t, a in row["auc"].items()}
    return {"rows": table.num_rows, "settings": rows, "package_bytes": package_sizes(package_dir)}


def benchmark_model_sizes(workdir: Path) -> dict[str, int]:
    """Package bytes of the benchmark model (random weights) in each table precision."""
    from benchmarks.measure import feature_config, make_table
    from features.pipeline import Tables, fit_spec

    config = ModelConfig.from_yaml(builtin_config("benchmark_mmoe"))
    spec = fit_spec(feature_config(), Tables(make_table(1_000_000, seed=0).lazy()))  # tables of full size
    torch.manual_seed(0)
    model = build_model(config, FeatureLayout.from_spec(spec, config.embedding))
    return package_sizes(save_package(workdir / "benchmark", model, config, spec))


def speed(data: Path, rows: int, reps: int) -> dict[str, object]:
    """Per setting, end-to-end rows/s of run_scoring over ``reps`` interleaved repetitions."""
    prepare(data, rows, seed=17)
    rates: dict[str, list[float]] = {f"{t}/{d}": [] for t, d in SETTINGS}
    for rep in range(reps):
        for tables, dense in SETTINGS:
            out = data / "out-precision"
            shutil.rmtree(out, ignore_errors=True)
            config = ScoreConfig(
                model=str(data / "model"),
                input=str(data / "impressions.parquet"),
                output=str(out),
                history=str(data / "history.parquet"),
                tracking_uri=f"sqlite:///{data / 'mlflow.db'}",
                embedding_dtype=tables,
                compute_dtype=dense,
                progress=False,
            )
            result = run_scoring(config)
            if not result.ok or result.rows_out != result.rows_in:
                raise SystemExit(f"{tables}/{dense}: rows in {result.rows_in}, out {result.rows_out}")
            rates[f"{tables}/{dense}"].append(result.rows_in / result.seconds)
            print(f"rep {rep + 1} {tables}/{dense}: {rates[f'{tables}/{dense}'][-1]:,.0f} rows/s", flush=True)
    base = statistics.median(rates["fp32/fp32"])
    return {
        name: {
            "median": round(statistics.median(r)),
            "min": round(min(r)),
            "max": round(max(r)),
            "vs_fp32": round(statistics.median(r) / base, 2),
        }
        for name, r in rates.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo", default="data/demo", help="the demo folder of `make demo` (data/demo)")
    parser.add_argument("--data", default="/tmp/score_bench", help="speed data (reused when it has --rows)")
    parser.add_argument("--rows", type=int, default=2_000_000, help="candidate rows of the speed runs")
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions of the speed runs")
    parser.add_argument("--out", default="artifacts/score_precision.json", help="the report (JSON)")
    args = parser.parse_args()
    report: dict[str, object] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "bf16_units": bf16_supported(torch.device("cpu")),
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        report["quality"] = quality(Path(args.demo), Path(tmp))
        report["benchmark_model_package_bytes"] = benchmark_model_sizes(Path(tmp))
    print(json.dumps(report, indent=1), flush=True)
    report["speed_end_to_end"] = speed(Path(args.data), args.rows, args.reps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["speed_end_to_end"], indent=1))


if __name__ == "__main__":
    main()
