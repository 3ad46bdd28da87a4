"""The driver's record of a run when things go wrong: real MLflow (a SQLite store), real Ray, no mocks.

The fast tests need no Ray cluster; the slow ones start an embedded one and a one-worker Ray Train run
whose loop reports hand-written records.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import mlflow
import pytest

from features.config import FeatureConfig, builtin_config
from features.pipeline import build, load_tables
from recsys.tracking import TrackingError
from recsys.train.config import TrainConfig
from recsys.train.driver import run_training
from recsys.train.recorder import RecorderChannel, RunRecorder
from recsys.train.reports import StartReport, StepReport, TrainWindow
from synth.generate import generate

MAIN = "valid/click/auc"


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    root = tmp_path_factory.mktemp("recorder")
    generate(root / "raw", 2000, seed=5, n_users=50, n_items=80, progress=False)
    build(FeatureConfig.from_yaml(builtin_config("ecommerce")), load_tables(root / "raw"), root / "features")
    return root / "features"


def make_config(features: Path, storage: Path, name: str, **training) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "features": str(features),
            "model": {"tasks": [{"name": "click"}], "embedding": {"dim": 4}},
            "training": {"epochs": 1, "batch_size": 64, **training},
            "run": {"experiment": "test", "num_workers": 1, "storage_path": str(storage), "name": name},
        }
    )


def recorder_of(features: Path, tmp_path: Path, name: str = "run") -> tuple[RunRecorder, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "ray" / name
    run_dir.mkdir(parents=True)
    return RunRecorder(make_config(features, tmp_path / "ray", name), run_dir, uri, require=True), uri


def window(step: int, loss: float) -> TrainWindow:
    return TrainWindow(step, {"loss": loss}, 1e3)


def test_restarted_workers_replace_the_replayed_windows_of_the_loss_history(features, tmp_path):
    recorder, _ = recorder_of(features, tmp_path)
    with recorder:
        recorder.record(StartReport(1, "plan", "t:[0]"), None)
        recorder.record(StepReport(0, 10, (window(5, 0.5), window(10, 0.4))), None)
        recorder.record(StepReport(0, 20, (window(15, 0.3), window(20, 0.2))), None)
        # A worker failed after step 20; the group restarts from the checkpoint of step 10 and trains again.
        recorder.record(StartReport(1, "plan", "t:[0]", step=10, resumed_from=0), None)
        recorder.record(StepReport(0, 20, (window(15, 0.35), window(20, 0.25))), None)
    assert recorder.steps == [5, 10, 15, 20]
    assert recorder.losses == {"loss": [0.5, 0.4, 0.35, 0.25]}


@pytest.mark.parametrize(("error", "status"), [(ValueError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_the_recorders_block_ends_the_run_on_an_error(features, tmp_path, error, status):
    recorder, uri = recorder_of(features, tmp_path)
    with pytest.raises(error), recorder:
        assert mlflow.MlflowClient(uri).get_run(recorder.run_id).info.status == "RUNNING"
        raise error()
    assert mlflow.MlflowClient(uri).get_run(recorder.run_id).info.status == status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_start_leaves_no_run_folder_for_resume_to_pick(features, tmp_path):
    config = make_config(features, tmp_path / "ray", "refused")
    with pytest.raises(FileNotFoundError, match=r"start_from: checkpoint .*: no rank0\.pt"):
        run_training(config, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", start_from=tmp_path)
    with pytest.raises(TrackingError):
        run_training(config, tracking_uri=f"http://127.0.0.1:{free_port()}", require_tracking=True)
    assert not (tmp_path / "ray").exists()
    with pytest.raises(ValueError, match="no earlier run"):
        run_training(config.replace(run={"name": ""}), resume=True)


@pytest.fixture(scope="module")
def cluster():
    import ray

    from recsys.runtime import init_ray

    init_ray("training", num_cpus=4)
    yield
    ray.shutdown()


def failing_loop(config: dict) -> None:
    """Rank 0 starts, then reports an epoch whose checkpoint lacks the validation predictions."""
    import tempfile

    import ray.train

    from recsys.train.reports import EpochReport, StartReport, StepReport, report_metrics

    ray.train.report(report_metrics(StartReport(1, "plan", "t:[0]")))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(report_metrics(EpochReport(0, 10, {MAIN: 0.6}, 0.6), MAIN), checkpoint=checkpoint)
    for step in range(11, 300):  # about 30 s, unless the run is stopped
        time.sleep(0.1)
        ray.train.report(report_metrics(StepReport(0, step), MAIN))
    Path(config["done"]).touch()


@pytest.mark.slow
def test_a_failing_recorder_stops_training_and_ends_the_run_failed(features, tmp_path, cluster):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    recorder, uri = recorder_of(features, tmp_path, "fails")
    done = tmp_path / "done"
    with pytest.raises(OSError, match="valid_predictions"), recorder, RecorderChannel(recorder) as channel:
        TorchTrainer(
            failing_loop,
            train_loop_config={"done": str(done)},
            scaling_config=ScalingConfig(num_workers=1),
            run_config=RunConfig(
                name="fails",
                storage_path=str(tmp_path / "ray"),
                failure_config=FailureConfig(max_failures=0),
                callbacks=channel.callbacks([]),
            ),
        ).fit()
    assert not done.exists()  # the workers were stopped, not left to run to their end
    assert mlflow.MlflowClient(uri).get_run(recorder.run_id).info.status == "FAILED"
    assert recorder.summary is None


@pytest.mark.slow
def test_a_lost_queue_is_raised_and_ends_the_run_failed(features, tmp_path, cluster):
    import ray

    recorder, uri = recorder_of(features, tmp_path)
    with pytest.raises(ray.exceptions.RayActorError), recorder, RecorderChannel(recorder) as channel:
        ray.kill(channel.queue.actor)
        channel.thread.join(timeout=30)
    assert mlflow.MlflowClient(uri).get_run(recorder.run_id).info.status == "FAILED"


@pytest.mark.slow
def test_an_error_once_the_run_is_open_ends_it_failed(features, tmp_path, cluster):
    config = make_config(features, tmp_path / "ray", "bad-callback")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A Ray Tune callback of the old API: refused by Ray Train's RunConfig, once the run has opened.
    with pytest.raises(ValueError, match="must be instances of `ray.train.UserCallback`"):
        run_training(config, tracking_uri=uri, callbacks=[object()])
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert (tmp_path / "ray" / "bad-callback" / "tracking.json").exists()
