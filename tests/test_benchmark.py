"""The performance benchmark command: its options, and a tiny run end to end (real Ray Train, TorchRec DMP,
MLflow in a local SQLite store)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.measure import benchmark_layout, cardinalities, flops_per_example, make_table
from pipelines import benchmark
from recsys.config import ModelConfig, builtin_config

REPO = Path(__file__).resolve().parents[1]


def test_help_and_bad_options_name_the_option(capsys):
    with pytest.raises(SystemExit) as done:
        benchmark.parse_args(["--help"])
    assert done.value.code == 0 and "roofline" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--reps", "2"])
    assert "--reps: expected at least 3, got 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--tf32"])
    assert "--tf32: only with --use-gpu" in capsys.readouterr().err


def test_model_ready_rows_make_a_batch_of_the_layout():
    import torch

    from benchmarks.measure import model_ready_table
    from recsys.data.batch import batch_from_arrow

    layout = benchmark_layout()
    batch = batch_from_arrow(model_ready_table(layout, 500, seed=1), layout)
    assert batch.dense.shape == (500, 8) and batch.sparse.keys() == layout.keys
    lengths = batch.sparse.length_per_key()
    assert lengths[:16] == [500] * 16 and 10 * 500 <= lengths[16] <= 30 * 500
    assert set(batch.labels) == {"click", "purchase"} and batch.labels["click"].dtype == torch.float32


def test_benchmark_shape_and_flops():
    sizes = cardinalities()
    assert len(sizes) == 16 and sizes[0] == 8 and sizes[-1] == 200_000
    table = make_table(1000, seed=0)
    assert table.height == 1000 and 10 < table["bag"].list.len().mean() < 30
    config = ModelConfig.from_yaml(builtin_config("benchmark_mmoe"))
    flops = flops_per_example(config, benchmark_layout(), ids_per_example=36)
    # experts: 8 x (2*280*256 + 2*256*128); the figure is 1.72 MFLOP forward.
    assert flops["experts"] == 8 * (2 * 280 * 256 + 2 * 256 * 128)
    assert 1.6e6 < flops["forward"] < 1.8e6 and flops["forward_backward"] == 3 * flops["forward"]


@pytest.mark.slow
def test_a_tiny_benchmark_runs_end_to_end(tmp_path, capsys):
    assert benchmark.main(["--rows", "20000", "--epochs", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["matmul_gflops"] > 0 and report["roofline_training"] < report["roofline_prediction"]
    (train,) = report["training"]
    assert train["epochs"] == 1 and train["examples_per_s"][0] > 0
    assert set(train["test_auc"]) == {"test/click/auc", "test/purchase/auc"}
    assert all(0 <= v <= 1 and not math.isnan(v) for v in train["test_auc"].values())
    median, low, high = report["prediction"]
    assert 0 < low <= median <= high
    assert "training end to end, 1 worker(s)" in capsys.readouterr().out


def test_device_measurements_report_every_batch_size_and_a_failing_sharding(capsys):
    """The --use-gpu measurements, on the CPU: row-wise sharding needs CUDA, so its row holds the error."""
    import torch

    from benchmarks.measure import device_measurements

    report = device_measurements(torch.device("cpu"), [64, 128], ["table_wise", "row_wise"], 3, 0.05)
    assert report["matmul_gflops"] > 0 and report["roofline_training"] < report["roofline_prediction"]
    rows = {(r["batch_size"], r["sharding"]): r for r in report["batches"]}
    assert set(rows) == {(64, "table_wise"), (64, "row_wise"), (128, "table_wise"), (128, "row_wise")}
    for size in (64, 128):
        median, low, high = rows[size, "table_wise"]["training_step"]
        assert 0 < low <= median <= high and rows[size, "table_wise"]["steps_per_rep"] >= 3
        assert "error" not in rows[size, "table_wise"]
        row = rows[size, "table_wise"]
        build, fed, ahead = row["batch_from_arrow"], row["training_from_arrow"], row["training_read_ahead"]
        assert 0 < build[1] <= build[0] <= build[2] and 0 < fed[1] <= fed[0] <= fed[2]
        assert 0 < ahead[1] <= ahead[0] <= ahead[2]
        assert "training_step" not in rows[size, "row_wise"] and rows[size, "row_wise"]["error"]
    benchmark.print_device_table(report)
    out = capsys.readouterr().out
    assert out.count("forward, batch 64 ") == 1 and "training step, batch 128, table_wise" in out
    assert "training step, batch 64, row_wise" in out and "failed:" in out
    assert out.count("batch from Arrow rows on the host") == 2
    assert out.count("fed by a read-ahead thread") == 2


def test_use_gpu_without_a_gpu_says_so(tmp_path):
    """The command line with every CUDA device hidden, so it asserts the same with or without a GPU."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.benchmark", "--use-gpu", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert "--use-gpu:" in done.stderr and "sees no CUDA device" in done.stderr
    assert not (tmp_path / "benchmark_gpu.json").exists()


def test_the_peers_benchmark_data_and_table(tmp_path):
    import polars as pl

    from benchmarks.peers import run as peers

    train, test = peers.make_data(tmp_path, 300, 60)
    rows = pl.read_parquet(train)
    assert rows.height == 300 and rows["impression_id"].n_unique() == 300
    assert (rows["request_id"] == rows["impression_id"] // peers.REQUEST_SIZE).all()
    held_out = pl.read_parquet(test)["impression_id"]
    assert held_out.min() == 300 and held_out.len() == 60  # ids continue: no key shared with train
    assert peers.make_data(tmp_path, 300, 60) == (train, test)  # reused
    assert peers.rate_in("epoch 1/1  12.5k examples/s\nepoch 2/2  13.0k examples/s", "examples/s") == 13000
    assert peers.rate_in("1 partitions, 16.4 s, 6,682 rows/s", "rows/s") == 6682
    assert math.isnan(peers.rate_in("nothing", "rows/s"))
    runs = [
        {
            "system": "a",
            "train_examples_per_s": x,
            "predict_rows_per_s": 2 * x,
            "auc": {"click": 0.7, "purchase": 0.6},
            "peak_rss_mib": 100.0,
        }
        for x in (10.0, 30.0, 20.0)
    ]
    lines = peers.table(runs).splitlines()
    assert len(lines) == 3 and lines[2].startswith(
        "| a | 20 (10-30) | - | 40 (20-60) | - | 0.7000 | 0.6000 | 100 |"
    )
    with pytest.raises(SystemExit):
        peers.parse_args(["--rows", "0"])
