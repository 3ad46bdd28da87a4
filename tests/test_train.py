"""Distributed training end to end: real Ray (embedded), real TorchRec DMP (gloo), real MLflow.

The two-worker run with every check of its record and registered model is in tests/test_multinode.py,
where it runs on two Ray nodes and loses one.
"""

from __future__ import annotations

import json
import socket

import mlflow
import numpy as np
import polars as pl
import pytest

from features.config import FeatureConfig
from features.pipeline import build
from recsys.package import load_package
from recsys.tracking import TrackingError
from recsys.train.config import TrainConfig
from recsys.train.driver import _checked_start, run_training
from tests.worlds import generated_features

pytestmark = pytest.mark.slow

TINY_MODEL = {
    "tasks": [{"name": "click"}, {"name": "purchase", "given": "click"}],
    "embedding": {"dim": 8},
    "arch": {"type": "mmoe", "num_experts": 4, "expert_hidden": [32], "tower_hidden": [8]},
    "gate": {"type": "softmax", "load_balance_weight": 0.01},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    generated_features(root, 12_000, seed=5, n_users=150, n_items=300)
    yield root
    import ray

    ray.shutdown()


def make_config(root, name, **training):
    return TrainConfig.from_dict(
        {
            "features": str(root / "features"),
            "truth": str(root / "raw" / "truth.parquet"),
            "model": TINY_MODEL,
            "training": {"epochs": 2, "batch_size": 256, "log_every_steps": 5, "dense_lr": 0.003, **training},
            "run": {
                "experiment": "test",
                "model_name": "tiny-ranker",
                "num_workers": 2,
                "storage_path": str(root / "ray"),
                "name": name,
                "max_failures": 0,
            },
        }
    )


def split_rows(root, split):
    return pl.scan_parquet(root / "features" / split / "*.parquet").select(pl.len()).collect().item()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STEPS = 20  # per epoch


def steps_config(root, name, **training):
    """One worker, 20 steps an epoch, a checkpoint every 10 (all kept), shuffled rows, tables drawn anew
    every epoch."""
    config = make_config(
        root,
        name,
        checkpoint_every_steps=10,
        max_steps_per_epoch=STEPS,
        shuffle_rows=3000,
        embedding_reinit=True,
        **training,
    )
    return config.replace(run={"num_workers": 1, "checkpoints_to_keep": 0})


@pytest.fixture(scope="module")
def whole(data):
    """The uninterrupted run the interrupted ones must end as."""
    uri = f"sqlite:///{data / 'mlflow-steps.db'}"
    result = run_training(steps_config(data, "whole"), tracking_uri=uri)
    predictions = pl.read_parquet(result.storage / "test_predictions.parquet").sort("impression_id")
    return result, uri, predictions


def assert_same_predictions(result, expected) -> None:
    got = pl.read_parquet(result.storage / "test_predictions.parquet").sort("impression_id")
    for task in ("click", "purchase"):
        np.testing.assert_allclose(got[f"p_{task}"], expected[f"p_{task}"], rtol=1e-4, atol=1e-6)


def test_resume_gives_the_same_model_as_an_uninterrupted_run(data, whole):
    _, uri, expected = whole
    # Ray Train prunes the first part's checkpoints to the two latest; the run resumes from the last.
    first = steps_config(data, "stopped", epochs=1).replace(run={"checkpoints_to_keep": 2})
    stopped = run_training(first, tracking_uri=uri)
    assert len([p for p in stopped.storage.glob("checkpoint_*") if p.is_dir()]) == 2
    resumed = run_training(first.replace(training={"epochs": 2}), tracking_uri=uri, resume=True)
    assert_same_predictions(resumed, expected)
    # The resumed run records to the MLflow run the first part opened (its id kept in tracking.json).
    run_id = json.loads((resumed.storage / "tracking.json").read_text())["run_id"]
    assert resumed.summary.mlflow_run_id == stopped.summary.mlflow_run_id == run_id
    assert not (resumed.storage / "result.json").exists()  # the summary comes back from the driver


def test_a_run_started_from_a_checkpoint_within_an_epoch_skips_the_batches_it_trained_on(data, whole):
    """Starting from step 30 (within the second epoch) gives the model of the run that wrote the checkpoint.

    The new run trains on epoch 1's batches after its 10th (the shuffled order depends only on the seed and
    the epoch); training on epoch 1 from its start again would give another model. With
    ``embedding_reinit``, epoch 1 starts with tables drawn anew from the seed; a run started within epoch 1
    must not draw them again (its rows trained since would be lost).
    """
    result, uri, expected = whole
    within_second = result.storage / f"checkpoint_step{STEPS + 10:08d}"
    assert (within_second / "rank0.pt").exists()
    started = run_training(steps_config(data, "within-second"), tracking_uri=uri, start_from=within_second)
    assert_same_predictions(started, expected)
    run = mlflow.MlflowClient(uri).get_run(started.summary.mlflow_run_id)
    assert run.data.metrics["restarts/from_epoch"] == 1
    # The checkpoint of one worker may start a run of two (resharded; tests/test_reshard.py checks that
    # the state comes back exactly).
    config = steps_config(data, "two").replace(run={"num_workers": 2})
    assert _checked_start(config, within_second, resume=False) == within_second.resolve()


def test_ray_data_ingest_feeds_the_same_batches_as_reading_parquet_directly(data):
    """In file order (no shuffle) both ingest paths give one worker the same batches: the same model.

    The ``parquet`` run also trains without its MLflow store (unreachable, ``register=False``): it goes on
    untracked, unless tracking is required.
    """
    unreachable, store = f"http://127.0.0.1:{free_port()}", f"sqlite:///{data / 'mlflow-ingest.db'}"
    uris = {"parquet": unreachable, "ray_data": store}
    configs = {
        ingest: make_config(
            data, f"ingest-{ingest}", epochs=1, shuffle_rows=0, ingest=ingest, max_steps_per_epoch=12
        ).replace(run={"num_workers": 1})
        for ingest in uris
    }
    with pytest.raises(TrackingError, match=uris["parquet"]):
        run_training(configs["parquet"], tracking_uri=uris["parquet"], require_tracking=True, register=False)
    runs = {
        ingest: run_training(configs[ingest], tracking_uri=uris[ingest], register=ingest == "ray_data")
        for ingest in uris
    }
    untracked = runs["parquet"]
    assert untracked.summary.mlflow_run_id is None and untracked.summary.version is None
    assert (untracked.storage / "model" / "weights.pt").exists()
    a, b = (
        pl.read_parquet(r.storage / "test_predictions.parquet").sort("impression_id") for r in runs.values()
    )
    for task in ("click", "purchase"):
        np.testing.assert_allclose(b[f"p_{task}"], a[f"p_{task}"], rtol=1e-4, atol=1e-6)
    steps = {k: r.summary.steps for k, r in runs.items()}
    assert steps["parquet"] == steps["ray_data"] == 12


def test_a_dense_only_regression_model_trains_on_two_workers_with_pcgrad_and_logs_its_balancing(data):
    """The MMoE paper's kind of model (no tables, two regression tasks) through the sharded loop."""
    from features.pipeline import Tables, scan_table
    from synth.paper import PaperData

    x, y = PaperData(rows=4000, dim=6).generate(0.0, seed=3)
    table = data / "paper.parquet"
    pl.DataFrame({**{f"x{i}": x[:, i] for i in range(6)}, "y1": y[:, 0], "y2": y[:, 1]}).write_parquet(table)
    features = FeatureConfig.from_dict(
        {
            "name": "paper",
            "source": "flat",
            "split": {"method": "hash", "validation_fraction": 0.2, "test_fraction": 0.2, "seed": 0},
            "labels": [{"name": "y1", "kind": "regression"}, {"name": "y2", "kind": "regression"}],
            "features": [{"name": f"x{i}", "kind": "numeric"} for i in range(6)],
        }
    )
    build(features, Tables(impressions=scan_table(table)), data / "paper_features", progress=False)
    model = {
        "tasks": [{"name": "y1", "kind": "regression"}, {"name": "y2", "kind": "regression"}],
        "arch": {"type": "mmoe", "num_experts": 4, "expert_hidden": [16], "tower_hidden": [8]},
    }
    config = make_config(data, "paper-pcgrad").replace(
        features=str(data / "paper_features"),
        truth="",
        group_column="",
        model=model,
        training={
            "main_metric": "y1/neg_mse",
            "calibration": "none",
            "task_balancing": "pcgrad",
            "batch_size": 64,
            "dense_lr": 0.01,
        },
        run={"model_name": "paper-regression"},
    )
    uri = f"sqlite:///{data / 'mlflow.db'}"
    summary = run_training(config, tracking_uri=uri).summary
    client = mlflow.MlflowClient(uri)
    metrics = client.get_run(summary.mlflow_run_id).data.metrics
    test = pl.read_parquet(data / "paper_features" / "test")
    for task in ("y1", "y2"):  # better than the best constant after two epochs
        assert (
            0 < metrics[f"test/{task}/mse"] < test[task].var()
            and metrics[f"test/{task}/count"] == test.height
        )
    assert metrics["test/y1/neg_mse"] == -metrics["test/y1/mse"]
    for name in (
        "balance/y1/weight",
        "balance/y1/pcgrad_scale",
        "balance/grad_cosine",
        "balance/y2/grad_norm",
    ):
        history = client.get_metric_history(summary.mlflow_run_id, f"train/{name}")
        assert history and all(np.isfinite(m.value) for m in history), name
    scales = [
        m.value for m in client.get_metric_history(summary.mlflow_run_id, "train/balance/y2/pcgrad_scale")
    ]
    # Two tasks: c_1 = 1 - g1.g2 / |g1|^2, at least 1 (more where the gradients conflicted).
    assert all(s >= 1 - 1e-6 for s in scales)
    package = load_package(summary.model_package)
    assert package.calibration == {}
