"""Beyond one machine (issue 21): a Ray cluster of several nodes on this machine, one of them lost mid-run.

``ray.cluster_utils.Cluster`` starts a head (no CPUs: the driver, Ray Train's controller and the recorder's
queue live there) and worker nodes of one CPU each, each its own raylet and object store, as separate
machines would run them. Training asks for ``[1, 2]`` workers (one per node), loses a node within its
second epoch, and goes on with one worker from the last checkpoint, resharded; the run is the two-worker
end-to-end check of training (real TorchRec DMP over gloo, real MLflow). Scoring then runs its actors on two
nodes, loses one, and still writes every row once.
"""

from __future__ import annotations

import threading
import time

import mlflow
import numpy as np
import polars as pl
import pytest

from recsys.package import load_package
from recsys.scoring import ScoreConfig, run_scoring
from recsys.train.driver import run_training
from tests.test_train import make_config, split_rows
from tests.worlds import generated_features

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head with no CPUs and two worker nodes of one CPU; the driver connects through ``RAY_ADDRESS``."""
    import ray
    from ray.cluster_utils import Cluster

    from tests.test_train import free_port

    ray.shutdown()  # an embedded Ray of an earlier module: this module's runs connect to the cluster
    patch = pytest.MonkeyPatch()
    # A lost node is seen by Ray Train's capacity count only at its next refresh (every 20 s): a restart
    # that still counts it waits this long for the workers it cannot place, then decides again.
    patch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "6")
    head = {"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1"}
    # A node that misses 3 health checks a second apart is dead (Ray's default: 5, 3 s apart): the lost
    # node's actors are given up on, and its work placed elsewhere, sooner.
    head["_system_config"] = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={**head, "dashboard_port": free_port()})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    patch.setenv("RAY_ADDRESS", cluster.address)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()
    patch.undo()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    generated_features(root, 12_000, seed=5, n_users=150, n_items=300)
    return root


def remove_when(cluster, node, ready, timeout: float = 300) -> threading.Event:
    """Removes ``node`` (its raylet and every process of it, killed) once ``ready()`` holds, on a thread.

    Returns the event that calls it off (set it once the run is over; the node then stays).
    """
    stop = threading.Event()

    def watch() -> None:
        end = time.monotonic() + timeout
        while not stop.is_set() and time.monotonic() < end:
            if ready():
                cluster.remove_node(node, allow_graceful=False)
                return
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    return stop


@pytest.fixture(scope="module")
def trained(data, cluster):
    """A ``[1, 2]``-worker run that loses a node (and its worker) after a checkpoint of its second epoch."""
    uri = f"sqlite:///{data / 'mlflow.db'}"
    training = {"checkpoint_every_steps": 4, "max_steps_per_epoch": 14, "log_every_steps": 2}
    config = make_config(data, "two-nodes", **training).replace(
        run={"num_workers": [1, 2], "max_failures": 1, "checkpoints_to_keep": 2}
    )
    # 14 steps an epoch on two workers: step 16's checkpoint is within the second epoch. Ray Train's
    # controller takes the workers' reports every 2 s: the node goes once it has registered that one.
    snapshot = data / "ray" / "two-nodes" / "checkpoint_manager_snapshot.json"

    def within_second_epoch() -> bool:
        return snapshot.exists() and "checkpoint_step00000016" in snapshot.read_text()

    head, nodes = cluster
    stop = remove_when(head, nodes[1], within_second_epoch)
    result = run_training(config, tracking_uri=uri)
    stop.set()
    return result, uri


def test_training_loses_a_node_goes_on_with_one_worker_and_registers_a_model_that_agrees(
    data, trained, monkeypatch
):
    result, uri = trained
    summary = result.summary
    assert summary.alias == "champion" and summary.version == "1"
    client = mlflow.MlflowClient(uri)
    run = client.get_run(summary.mlflow_run_id)
    # Tables really split across the workers of the first start: some on rank 0, some on rank 1.
    ranks = run.data.params["sharding_plan_ranks"]
    assert ":[0]" in ranks and ":[1]" in ranks
    # The worker count over time: two, then one after the node was lost (and the checkpoint resharded).
    workers = sorted(client.get_metric_history(run.info.run_id, "workers"), key=lambda m: m.step)
    assert [m.value for m in workers] == [2.0, 1.0] and workers[1].step > 0
    # The one worker went on with the two workers' global batches (2 x 256 rows a step): the run took
    # the steps of an uninterrupted one, 14 an epoch (the cap; each half of the rows holds 15).
    assert split_rows(data, "train") // 2 // 256 >= 14 and summary.steps == 2 * 14
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(losses) >= 4 and np.mean(losses[-2:]) < np.mean(losses[:2])
    aucs = client.get_metric_history(run.info.run_id, "valid/click/auc")
    assert len(aucs) == 2 and all(0.5 < m.value <= 1 for m in aucs)
    # The model kept (tested, packaged, registered) is the best epoch's.
    by_step = [m.value for m in sorted(aucs, key=lambda m: m.step)]
    assert summary.final_epoch == int(np.argmax(by_step))
    assert summary.final_valid_main_metric == pytest.approx(max(by_step))
    # Every evaluation row is counted once: nothing dropped by the uneven split, no padding row.
    assert run.data.metrics["valid/click/count"] == split_rows(data, "valid")
    assert run.data.metrics["test/click/count"] == split_rows(data, "test")
    assert 0 < run.data.metrics["test/click/oracle_auc"] - run.data.metrics["test/click/auc"] < 0.3
    # The test metrics are those of the calibrated package, with those before calibration beside them.
    for task in ("click", "purchase"):
        for name in ("calibration", "log_loss"):
            assert np.isfinite(run.data.metrics[f"test/{task}/{name}_raw"])
        assert run.data.metrics[f"test/{task}/auc"] > 0.5
    calibration = load_package(summary.model_package).calibration
    assert sorted(calibration) == ["click", "purchase"] and all(c.a > 0 for c in calibration.values())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/calibration_test.png", "report/expert_load.png", "report/loss.png"} <= artifacts
    # Old checkpoints pruned to the two latest; the best epoch's shards kept apart; the records logged.
    assert len([p for p in result.storage.glob("checkpoint_*") if p.is_dir()]) == 2
    assert [p.name for p in (result.storage / "best").iterdir()] == [f"epoch{summary.final_epoch:03d}"]
    assert not (result.storage / "records").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # not mlflow.set_tracking_uri: it outlives the test
    registered_model_agrees(data, result)


def registered_model_agrees(data, result) -> None:
    """The registered champion, loaded through MLflow from raw contract rows, scores the test rows as the
    sharded model did during training (in the precision it was trained in: bf16 where the CPU has it)."""
    model = mlflow.pyfunc.load_model("models:/tiny-ranker@champion", model_config={"compute_dtype": "auto"})
    raw = data / "raw"
    rows = (
        pl.read_parquet(raw / "impressions.parquet")
        .join(pl.read_parquet(raw / "users.parquet"), on="user_id", how="left")
        .join(pl.read_parquet(raw / "items.parquet"), on="item_id", how="left")
    )
    scored = pl.from_pandas(model.predict(rows.to_pandas()))
    during = pl.read_parquet(result.storage / "test_predictions.parquet")
    joined = during.join(scored, on="impression_id", suffix="_registered")
    assert joined.height == during.height == split_rows(data, "test")
    for task in ("click", "purchase"):
        np.testing.assert_allclose(joined[f"p_{task}_registered"], joined[f"p_{task}"], rtol=1e-4, atol=1e-6)


def test_scoring_on_two_nodes_loses_one_and_writes_every_row_once(data, trained, cluster):
    from ray.util.state import list_actors

    head, nodes = cluster
    nodes.append(head.add_node(num_cpus=1))  # a second worker node again (the first was lost in training)
    head.wait_for_nodes()
    out, raw = data / "scores", data / "raw"
    candidates = data / "candidates.parquet"  # the first 6,000 impressions
    pl.read_parquet(raw / "impressions.parquet").head(6000).write_parquet(candidates)
    config = ScoreConfig(
        model="models:/tiny-ranker@champion",
        input=str(candidates),
        users=str(raw / "users.parquet"),
        items=str(raw / "items.parquet"),
        output=str(out),
        tracking_uri=trained[1],
        rows_per_partition=100,  # 60 partitions: the second node's actor starts before they are done
        concurrency=2,
        threads_per_actor=1,
    )
    actors: list = []

    def both_nodes_scoring() -> bool:  # a part written, and an actor alive on each worker node
        if not any(out.glob("part-*.parquet")):
            return False
        alive = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
        actors[:] = [a for a in alive if "ScoreStage" in a.class_name]
        return len({a.node_id for a in actors}) == 2

    stop = remove_when(head, nodes[-1], both_nodes_scoring)
    result = run_scoring(config)
    stop.set()
    assert result.ok, result.problems
    scores = pl.read_parquet(sorted(out.glob("part-*.parquet")))
    rows = 6000
    assert result.rows_in == result.rows_out == scores.height == rows
    assert scores["impression_id"].n_unique() == rows
    # Scoring ran on both worker nodes when one was lost.
    assert len({a.node_id for a in actors}) == 2, actors
