"""The fault matrix of training and registration: bad data, diverging losses, MLflow outages, races.

Each case asserts the error (or exit status), that the message names the step, task, file or model, and
what is left behind (the MLflow run's status, the registry's aliases, the run folders). Real Ray, real
TorchRec, real MLflow (SQLite stores and a real ``mlflow server``); no mocks.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import threading
from pathlib import Path

import mlflow
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml
from ray.train import UserCallback

from pipelines.train import main as train_main
from recsys.tracking import CHALLENGER, CHAMPION, Tracker, TrackingError, register_model
from recsys.train.config import TrainConfig
from recsys.train.driver import run_training
from tests.servers import free_port, mlflow_server  # noqa: F401  (a fixture)
from tests.worlds import generated_features

MODEL = {
    "tasks": [{"name": "click"}, {"name": "purchase", "given": "click"}],
    "embedding": {"dim": 4},
    "arch": {"type": "mmoe", "num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]},
}


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    yield generated_features(tmp_path_factory.mktemp("faults-train"), 3000, seed=11, n_users=60, n_items=90)
    import ray

    ray.shutdown()


def config_of(features: Path, storage: Path, name: str, workers: int = 1, **training) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "features": str(features),
            "model": MODEL,
            "training": {"epochs": 1, "batch_size": 128, "log_every_steps": 2, **training},
            "run": {
                "experiment": "faults",
                "model_name": "faulty",
                "num_workers": workers,
                "storage_path": str(storage),
                "name": name,
                "max_failures": 2,  # a deterministic failure must not be retried even so
            },
        }
    )


def poisoned(features: Path, target: Path, split: str, column: str, value) -> Path:
    """A copy of the features whose ``column`` is ``value`` in every row of ``split``."""
    shutil.copytree(features, target)
    for part in sorted((target / split).glob("*.parquet")):
        frame = pl.read_parquet(part)
        frame.with_columns(pl.lit(value, dtype=frame.schema[column]).alias(column)).write_parquet(part)
    return target


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_at_once_naming_the_step_and_the_task(features, tmp_path, capsys):
    """NaN features: the first step's loss is NaN on both workers; one attempt, exit 1, run FAILED."""
    bad = poisoned(features, tmp_path / "features", "train", "log_price_z", float("nan"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = config_of(bad, tmp_path / "ray", "diverges", workers=2, epochs=3)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    status = train_main(["--config", str(path), "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert status == 1
    assert "the click loss is nan at step 1 (epoch 1" in err and "no model was logged" in err
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert client.search_registered_models() == []
    assert not list((tmp_path / "ray" / "diverges").glob("checkpoint_epoch*"))  # stopped within epoch 1


def test_a_validation_split_without_clicks_is_named_before_anything_starts(features, tmp_path):
    bad = poisoned(features, tmp_path / "features", "valid", "click", 0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ValueError, match=r"valid/click/auc is undefined: the label 'click' in .*valid"):
        run_training(config_of(bad, tmp_path / "ray", "no-clicks"), tracking_uri=uri)
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_crafted_checkpoint_is_refused_in_the_driver_and_runs_nothing(features, tmp_path):
    """``--from-checkpoint`` loads with weights_only: a pickle payload is named, never run."""
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "checkpoint_epoch000"
    folder.mkdir()
    (folder / "rank0.pt").write_bytes(pickle.dumps({"model": Payload()}))
    config = config_of(features, tmp_path / "ray", "crafted")
    with pytest.raises(ValueError, match=r"rank0\.pt: not a checkpoint of this version"):
        run_training(config, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", start_from=folder)
    assert not marker.exists() and not (tmp_path / "ray").exists()


def register_concurrently(uri: str, name: str, values: list[float]) -> list[str]:
    """Registers one version per value at the same moment, each from its own thread and tracker."""
    barrier = threading.Barrier(len(values))
    aliases: list[str] = [""] * len(values)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        tracker = Tracker(uri, "race", require=True)
        barrier.wait()
        try:
            version = register_model(tracker, f"file:///models/{name}/{i}", name, "valid/auc", values[i])
        except BaseException as error:
            errors.append(error)
            raise
        aliases[i] = version.alias

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(values))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return aliases


def test_concurrent_registrations_always_leave_the_better_version_champion(tmp_path):
    uri = f"sqlite:///{tmp_path / 'race.db'}"
    Tracker(uri, "race", require=True)  # creates the store before the race
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    for trial in range(10):
        name = f"race-{trial}"
        values = [0.70, 0.71] if trial % 2 else [0.71, 0.70]
        aliases = register_concurrently(uri, name, values)
        better = values.index(max(values))
        versions = {
            str(v.version): float(v.tags["validation.valid/auc"])
            for v in client.search_model_versions(f"name = '{name}'")
        }
        champion = client.get_registered_model(name).aliases[CHAMPION]
        assert versions[str(champion)] == 0.71, (trial, versions, champion)
        assert aliases[better] == CHAMPION
        assert aliases[1 - better] in (CHAMPION, CHALLENGER)  # champion only until the better one landed
    # A later, worse registration leaves the champion where it is and is told so.
    tracker = Tracker(uri, "race", require=True)
    assert register_model(tracker, "file:///models/late", "race-0", "valid/auc", 0.5).alias == CHALLENGER


def test_an_unreachable_store_fails_at_the_start_unless_training_does_not_register(features, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    config = config_of(features, tmp_path / "ray", "no-store", max_steps_per_epoch=2)
    with pytest.raises(TrackingError, match=r"unreachable.*--no-register"):
        run_training(config, tracking_uri=uri)
    assert not (tmp_path / "ray").exists()


class KillServer(UserCallback):
    """Kills the MLflow server's process group at the first epoch's report (in Ray Train's controller)."""

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics and metrics[0].get("epoch") == 0:
            os.killpg(self.pgid, signal.SIGKILL)


@pytest.mark.slow
def test_mlflow_killed_mid_run_fails_the_training_and_names_the_unregistered_model(
    features,
    tmp_path,
    mlflow_server,  # noqa: F811
    monkeypatch,
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # each call to the dead server fails at once
    # Killed at the epoch's report, before the final one.
    config = config_of(features, tmp_path / "ray", "outage", epochs=1, max_steps_per_epoch=6)
    with pytest.raises(TrackingError, match=r"model not registered: faulty .*package is in .*outage/model"):
        run_training(config, tracking_uri=mlflow_server.uri, callbacks=[KillServer(mlflow_server.pgid)])
    assert (tmp_path / "ray" / "outage" / "model" / "weights.pt").exists()  # the trained model is kept


def test_a_corrupted_page_of_a_feature_part_fails_the_reader_naming_the_part(features, tmp_path):
    """Page checksums: a flipped byte inside a data page (footer intact) is an error, not wrong ids."""
    from recsys.data.shard import ParquetShard

    copy = tmp_path / "features"
    shutil.copytree(features, copy)
    part = sorted((copy / "train").glob("*.parquet"))[0]
    chunk = pq.read_metadata(part).row_group(0).column(0)
    last = (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size - 1
    data = bytearray(part.read_bytes())
    data[last] ^= 0xFF
    part.write_bytes(bytes(data))
    shard = ParquetShard(copy / "train", rank=0, world=1)
    with pytest.raises(OSError, match=rf"features part {part}, row group 0: .*CRC checksum"):
        list(shard.iter_rows(64, True, 0, 0))


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    """Two trainings started in the same second shared a run folder (and its checkpoints)."""
    import datetime as dt

    from recsys.train import driver

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 7, 12, 0, 0)

    monkeypatch.setattr(driver.dt, "datetime", Frozen)
    names = set()
    for _ in range(20):  # each run's folder is made (by Ray) before the next run is named
        name = driver._new_run_name(tmp_path, "ranker")
        (tmp_path / name).mkdir()  # fails if the name was given before
        names.add(name)
    assert len(names) == 20 and all(n.startswith("ranker-20261207-120000-") for n in names)
