"""The peers benchmark: torch-rechub, DeepCTR-Torch, a plain PyTorch loop and ours, side by side, in one run.

Examples::

    python -m benchmarks.peers.run                          # 1M rows, 3 repetitions
    python -m benchmarks.peers.run --rows 200000 --reps 1 --out /tmp/peers

One command (run with the project's python) that

1. generates the benchmark data (benchmarks/measure.py's shape: 16 categorical features of cardinality 8 to
   200,000, a multi-hot bag of ~20 ids sharing the largest table, 8 numeric; labels from two features):
   OUT/data/train.parquet (--rows) and OUT/data/test.parquet (--test-rows, another seed), each row with an
   ``impression_id`` and a ``request_id`` (groups of 20); reused when OUT holds the same sizes;
2. makes the peers' own virtual environment (benchmarks/peers/.venv: torch-rechub, DeepCTR-Torch and their
   dependencies, never in ours) and runs each peer script with it: its own loader and trainer, one epoch of
   MMoE (8 experts [256, 128], softmax gates, towers [64], embedding dimension 16, Adam 1e-3, batch 2048),
   then its prediction of the test rows;
3. runs ours end to end as a user would: ``python -m pipelines.features build`` on the train table, then
   ``python -m pipelines.train`` (Ray Train workers, TorchRec-sharded tables, MLflow tracking, the model
   registered), then ``python -m pipelines.score`` of the test table with the registered version, once in
   fp32 and once with int8 tables and ``--compute-dtype auto``; each command's wall time, its process tree's
   peak memory, and the AUC of its scores on the test rows;
4. interleaves the systems within each of --reps repetitions and prints one table: training examples/s end
   to end (train rows over wall time, data preparation included), prediction rows/s end to end, test AUC per
   task, peak memory: medians with min-max, the machine and the date. OUT/peers.json and OUT/peers.md hold it.

The peers' numbers are each script's own timings (benchmarks/peers/peer_common.py: from reading the
Parquet to the trained model; from reading the test Parquet to the predictions).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import yaml

from benchmarks.measure import TreeMemory, cpu_model, make_table
from benchmarks.peers.peer_venv import DEFAULT_VENV, ensure_venv

HERE = Path(__file__).parent
PEERS = {
    "plain-pytorch": "plain_mmoe.py",
    "torch-rechub": "rechub_mmoe.py",
    "deepctr-torch": "deepctr_mmoe.py",
}
TASKS = ("click", "purchase")
REQUEST_SIZE = 20
MODEL_NAME = "benchmark-ranker"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="training rows (1,000,000)")
    parser.add_argument("--test-rows", type=int, default=100_000, help="test rows (100,000)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (3)")
    parser.add_argument("--out", default="artifacts/peers", help="output folder (artifacts/peers)")
    parser.add_argument("--workers", type=int, default=2, help="our Ray Train workers (2)")
    parser.add_argument(
        "--precision", default="auto", choices=["fp32", "bf16", "auto"], help="our training.precision"
    )
    parser.add_argument("--venv", default=str(DEFAULT_VENV), help="the peers' virtual environment")
    parser.add_argument("--only", nargs="*", help="systems to run (default: all)")
    args = parser.parse_args(argv)
    for name in ("rows", "test_rows", "reps", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected at least 1, got {getattr(args, name)}")
    return args


def make_data(folder: Path, rows: int, test_rows: int) -> tuple[Path, Path]:
    """train.parquet and test.parquet of the benchmark shape, with impression and request ids."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "rows.json"
    train, test = folder / "train.parquet", folder / "test.parquet"
    if marker.exists() and json.loads(marker.read_text()) == {"rows": rows, "test_rows": test_rows}:
        return train, test
    for path, n, seed, first in ((train, rows, 0, 0), (test, test_rows, 1, rows)):
        ids = np.arange(first, first + n, dtype=np.int64)
        make_table(n, seed=seed).with_columns(
            pl.Series("impression_id", ids), pl.Series("request_id", ids // REQUEST_SIZE)
        ).write_parquet(path, row_group_size=100_000)
    marker.write_text(json.dumps({"rows": rows, "test_rows": test_rows}))
    return train, test


def write_configs(out: Path, workers: int, precision: str) -> tuple[Path, Path]:
    """Our feature config (the flat benchmark table) and training config, as a user writes them."""
    from benchmarks.measure import feature_config_dict

    features = feature_config_dict()
    features["split"] = {"method": "hash", "validation_fraction": 0.02, "test_fraction": 0.01, "seed": 0}
    feature_yaml = out / "features.yaml"
    feature_yaml.write_text(yaml.safe_dump(features, sort_keys=False))
    train = {
        "features": str(out / "features"),
        "model": "benchmark_mmoe",
        "group_column": "",
        "training": {
            "epochs": 1,
            "batch_size": 2048,
            "main_metric": "click/auc",
            "precision": precision,
            "early_stopping_patience": 0,
        },
        "run": {
            "experiment": "peers-benchmark",
            "model_name": MODEL_NAME,
            "num_workers": workers,
            "cpus_per_worker": max(1, (os.cpu_count() or 1) // workers),
            "storage_path": str(out / "ray"),
            "max_failures": 0,
        },
    }
    train_yaml = out / "train.yaml"
    train_yaml.write_text(yaml.safe_dump(train, sort_keys=False))
    return feature_yaml, train_yaml


def timed_command(command: list[str], log: Path) -> tuple[float, float, str]:
    """Runs ``command`` (output to ``log``); its wall seconds, its process tree's peak RSS in MiB, its output.

    Raises:
        RuntimeError: it exits non-zero (the message names the log).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "wb") as fh, TreeMemory(interval_s=0.5) as memory:
        code = subprocess.call(command, stdout=fh, stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"{' '.join(command[:3])} exited {code}; see {log}")
    return time.perf_counter() - started, memory.peak_rss / 2**20, log.read_text(errors="replace")


def rate_in(text: str, unit: str) -> float:
    """The number before ``unit`` at its last mention (``12.3k examples/s``, ``4,567 rows/s``), else NaN."""
    matches = re.findall(rf"([\d,.]+)(k?) {re.escape(unit)}", text)
    if not matches:
        return float("nan")
    number, kilo = matches[-1]
    return float(number.replace(",", "")) * (1000 if kilo else 1)


def test_aucs(scores: Path, test: Path) -> dict[str, float]:
    """AUC per task of a scoring output on the labelled test rows."""
    from recsys.metrics import auc

    labels = pl.read_parquet(test, columns=["impression_id", *TASKS])
    out = pl.read_parquet(sorted(scores.glob("part-*.parquet"))).join(labels, on="impression_id")
    if out.height != labels.height:
        raise RuntimeError(f"{scores}: {out.height} scored rows for {labels.height} test rows")
    return {t: auc(out[t].to_numpy().astype(np.float64), out[f"p_{t}"].to_numpy()) for t in TASKS}


def latest_version(uri: str) -> str:
    """The newest registered version of the benchmark model."""
    from mlflow import MlflowClient

    versions = MlflowClient(uri).search_model_versions(f"name='{MODEL_NAME}'")
    return str(max(int(v.version) for v in versions))


def run_ours(
    out: Path, train: Path, test: Path, configs: tuple[Path, Path], rep: int
) -> list[dict[str, Any]]:
    """Features, training and scoring through our command lines; one row per scoring precision."""
    py, logs = sys.executable, out / "logs"
    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    build = [py, "-m", "pipelines.features", "build", "--config", str(configs[0]), "--table", str(train)]
    build += ["--out", str(out / "features"), "--overwrite"]
    feat_s, feat_mem, _ = timed_command(build, logs / f"features-{rep}.log")
    fit = [py, "-m", "pipelines.train", "--config", str(configs[1]), "--tracking-uri", uri]
    train_s, train_mem, train_text = timed_command(fit, logs / f"train-{rep}.log")
    train_rows = (
        pl.scan_parquet(str(out / "features" / "train" / "*.parquet")).select(pl.len()).collect().item()
    )
    test_rows = pl.scan_parquet(test).select(pl.len()).collect().item()
    model = f"models:/{MODEL_NAME}/{latest_version(uri)}"
    rows = []
    for label, flags in (
        ("fp32", []),
        ("int8+auto", ["--embedding-dtype", "int8", "--compute-dtype", "auto"]),
    ):
        scores = out / f"scores-{rep}-{label}"
        score = [py, "-m", "pipelines.score", "--model", model, "--input", str(test), "--output", str(scores)]
        score += ["--tracking-uri", uri, "--no-progress", "--overwrite", *flags]
        score_s, score_mem, score_text = timed_command(score, logs / f"score-{label}-{rep}.log")
        rows.append(
            {
                "system": f"ours (scoring {label})",
                "train_examples_per_s": train_rows / (feat_s + train_s),
                "train_seconds": feat_s + train_s,
                "features_seconds": feat_s,
                "train_steady_examples_per_s": rate_in(train_text, "examples/s"),
                "predict_rows_per_s": rate_in(score_text, "rows/s"),
                "predict_command_rows_per_s": test_rows / score_s,
                "auc": test_aucs(scores, test),
                "peak_rss_mib": max(feat_mem, train_mem, score_mem),
            }
        )
    return rows


def run_peer(out: Path, python: Path, name: str, train: Path, test: Path, rep: int) -> dict[str, Any]:
    """One peer script's run; its own timings."""
    result = out / f"{name}-{rep}.json"
    command = [str(python), str(HERE / PEERS[name]), "--train", str(train), "--test", str(test)]
    command += [
        "--batch-size",
        "2048",
        "--epochs",
        "1",
        "--threads",
        str(os.cpu_count() or 1),
        "--out",
        str(result),
    ]
    timed_command(command, out / "logs" / f"{name}-{rep}.log")
    data = json.loads(result.read_text())
    keys = ("train_examples_per_s", "train_seconds", "predict_rows_per_s", "auc", "peak_rss_mib")
    return {"system": name, **{k: data[k] for k in keys}, "versions": data.get("versions")}


def spread(values: list[float]) -> str:
    """``median (min-max)``; ``-`` when there are none."""
    values = [v for v in values if v == v]  # NaN: not measured
    if not values:
        return "-"
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


COLUMNS = (
    ("training examples/s end to end", "train_examples_per_s"),
    ("training examples/s, steady", "train_steady_examples_per_s"),
    ("prediction rows/s", "predict_rows_per_s"),
    ("prediction rows/s, whole command", "predict_command_rows_per_s"),
)


def table(runs: list[dict[str, Any]]) -> str:
    """The markdown table of medians with min-max per system."""
    systems = list(dict.fromkeys(r["system"] for r in runs))
    head = [name for name, _ in COLUMNS] + ["AUC click", "AUC purchase", "peak memory MiB"]
    lines = ["| system | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for system in systems:
        rs = [r for r in runs if r["system"] == system]
        cells = [spread([r.get(key, float("nan")) for r in rs]) for _, key in COLUMNS]
        cells += [f"{statistics.median(r['auc'][t] for r in rs):.4f}" for t in TASKS]
        cells.append(f"{statistics.median(r['peak_rss_mib'] for r in rs):,.0f}")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """The CPU, whether it has bf16 units, the cores and the date."""
    import torch

    from recsys.precision import bf16_supported

    return {
        "cpu": cpu_model(),
        "bf16_units": bf16_supported(torch.device("cpu")),
        "cores": os.cpu_count(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; prints the table."""
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, test = make_data(out / "data", args.rows, args.test_rows)
    python = ensure_venv(Path(args.venv))
    configs = write_configs(out, args.workers, args.precision)
    systems = args.only or [*PEERS, "ours"]
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        for system in systems:
            started = time.perf_counter()
            if system == "ours":
                runs += run_ours(out, train, test, configs, rep)
            else:
                runs.append(run_peer(out, python, system, train, test, rep))
            print(f"rep {rep + 1}/{args.reps} {system}: {time.perf_counter() - started:.0f} s", flush=True)
    report = {
        "machine": machine(),
        "rows": args.rows,
        "test_rows": args.test_rows,
        "reps": args.reps,
        "runs": runs,
    }
    (out / "peers.json").write_text(json.dumps(report, indent=1))
    info = report["machine"]
    header = (
        f"{info['date']}, {info['cpu']} ({info['cores']} cores, bf16 units: {info['bf16_units']}), "
        f"torch {info['torch']}; {args.rows:,} training rows, {args.test_rows:,} test rows, "
        f"{args.reps} repetitions; "
        f"ours: {args.workers} Ray Train workers, training.precision {args.precision}"
    )
    text = f"{header}\n\n{table(runs)}\n"
    (out / "peers.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
