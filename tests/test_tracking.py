"""MLflow tracking against real stores: a SQLite file, an unreachable URI, and a real `mlflow server`."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.models import Model

from features.config import FeatureConfig, builtin_config
from features.pipeline import Tables, build
from recsys.package import predict_frame, save_package
from recsys.tracking import (
    CHALLENGER,
    CHAMPION,
    Tracker,
    TrackingError,
    child_runs,
    default_tracking_uri,
    expert_load_history,
    flatten_params,
    latest_run,
    log_model,
    metric_history,
    register_model,
    resolve_model,
    run_metric_history,
    sqlite_tracking_uri,
)
from recsys.tracking.models import LOADER_MODULE
from recsys.tracking.settings import mlflow_settings
from tests.servers import mlflow_server  # noqa: F401  (a fixture)
from tests.test_package import TINY_MODEL, in_memory_package, joined


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tracking_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("recsys.tracking") and r.levelno >= logging.WARNING
    ]


@pytest.fixture
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def package(impressions, users, items, tmp_path):
    """A saved package (random weights) and raw joined rows to score with it."""
    config = FeatureConfig.from_yaml(builtin_config("ecommerce"))
    spec, _ = build(
        config, Tables(impressions.lazy(), users.lazy(), items.lazy()), tmp_path / "data", progress=False
    )
    pkg = in_memory_package(spec, TINY_MODEL)
    path = save_package(tmp_path / "package", pkg.model, pkg.model_config, spec, {"val_auc": 0.5})
    return path, pkg, joined(impressions, users, items)


def test_default_tracking_uri_is_a_sqlite_file_here_unless_the_environment_says(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert default_tracking_uri() == "http://mlflow.example:5000"


def test_sqlite_tracking_uri_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sqlite_tracking_uri("out") == f"sqlite:///{tmp_path.resolve()}/out/mlflow.db"


MLFLOW_ENV = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
)


def test_mlflow_settings_apply_to_http_stores_only_and_restore_the_environment(monkeypatch):
    for name in MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    with mlflow_settings("sqlite:///x.db", max_retries=0, timeout_s=5):
        assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") is None
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
    with mlflow_settings("http://127.0.0.1:1", max_retries=0, timeout_s=5, progress_bar=False):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"
        assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
    assert all(os.environ.get(n) is None for n in MLFLOW_ENV if n != "MLFLOW_HTTP_REQUEST_TIMEOUT")


def test_a_tracker_leaves_the_environment_as_it_was(store, package):
    before = {name: os.environ.get(name) for name in MLFLOW_ENV}
    tracker = Tracker(store, "exp", require=True)
    with tracker.run("env"):
        tracker.log_metrics({"loss": 1.0})
        log_model(tracker, package[0])
    assert {name: os.environ.get(name) for name in MLFLOW_ENV} == before


def test_runs_are_read_back_without_creating_anything(store):
    tracker = Tracker(store, "exp", require=True)
    with tracker.run("read-me") as run_id:
        tracker.log_params({"features": "data/features"})
        tracker.log_metrics(
            {"valid/moe/click/load/expert0": 0.75, "valid/moe/click/load/expert1": 0.25}, step=4
        )
        tracker.log_metrics(
            {"valid/moe/click/load/expert0": 0.5, "valid/moe/click/load/expert1": 0.5}, step=2
        )
        tracker.log_metrics({"loss": 0.5}, step=2)
    assert metric_history(store, run_id, "loss") == [(2, 0.5)]
    history = run_metric_history(store, run_id)
    assert history["valid/moe/click/load/expert0"] == [(2, 0.5), (4, 0.75)]
    loads = expert_load_history(history, "valid")
    np.testing.assert_allclose(loads["moe/click"], [[0.5, 0.5], [0.75, 0.25]])  # (evaluations, experts)
    assert expert_load_history(history, "test") == {}
    latest = latest_run(store, "exp")
    assert latest["run_id"] == run_id and latest["params"] == {"features": "data/features"}
    with pytest.raises(ValueError, match="experiment 'nope' at .*: no finished training run"):
        latest_run(store, "nope")
    assert MlflowClient(store).get_experiment_by_name("nope") is None  # reading created nothing


def test_child_runs_are_found_with_their_status_and_tags(store):
    tracker = Tracker(store, "exp", require=True)
    parent = tracker.start_run("parent")
    tracker.end_run()
    for trial, status in (("a", "FINISHED"), ("b", "KILLED")):
        child = Tracker(store, "exp", require=True)
        child.start_run(f"trial-{trial}", tags={"mlflow.parentRunId": parent, "tune.trial_id": trial})
        child.end_run(status)
    Tracker(store, "exp", require=True).start_run("unrelated")
    children = {r.tags["tune.trial_id"]: r.status for r in child_runs(store, parent)}
    assert children == {"a": "FINISHED", "b": "KILLED"}


def test_a_registry_reader_touches_no_experiment_and_starts_no_run(store, package):
    path, _, _ = package
    writer = Tracker(store, "exp", require=True)
    with writer.run("train"):
        uri = log_model(writer, path)
    register_model(writer, uri, "ranker", "val/auc", 0.7)
    before = [e.name for e in MlflowClient(store).search_experiments(view_type=ViewType.ALL)]
    reader = Tracker(store, None, require=True)
    assert reader.enabled and reader.experiment_id is None
    assert resolve_model(reader, f"models:/ranker@{CHAMPION}").version == "1"
    with pytest.raises(ValueError, match="reads the registry only"):
        reader.start_run("scoring")
    assert [e.name for e in MlflowClient(store).search_experiments(view_type=ViewType.ALL)] == before


def test_flatten_params():
    assert flatten_params({"model": {"arch": {"type": "mmoe", "hidden": (8, 4)}}, "lr": 1e-3, "x": None}) == {
        "model.arch.type": "mmoe",
        "model.arch.hidden": "[8, 4]",
        "lr": "0.001",
        "x": "None",
    }


def test_params_metrics_and_artifacts_reach_the_store(store, tmp_path):
    tracker = Tracker(store, "exp", require=True)
    run_id = tracker.start_run("first", tags={"arch": "mmoe"})
    assert run_id and tracker.run_id == run_id and run_id in tracker.describe()
    params = {"model": {"arch": {"num_experts": 8, "expert_hidden": [64, 32]}}, "long": "x" * 7000}
    params["many"] = {f"p{i:03d}": i for i in range(250)}  # three batches of at most 100
    tracker.log_params(params)
    tracker.log_metrics({"loss": 0.5, "val/auc": np.float32(0.75), "broken": float("nan")}, step=1)
    tracker.log_metrics({"loss": 0.25}, step=2)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.json").write_text("{}")
    tracker.log_artifact(tmp_path / "notes.txt")
    tracker.log_artifact(tmp_path / "folder", artifact_path="folder")
    tracker.log_dict({"rows": 3}, "meta/summary.json")
    tracker.log_text("text", "meta/readme.txt")
    figure = Figure()
    figure.add_subplot().plot([0, 1], [1, 0])
    tracker.log_figure(figure, "plots/line.png")
    with pytest.raises(ValueError, match=r"metrics\['bad'\]: expected a number, got 'x'"):
        tracker.log_metrics({"bad": "x"})
    tracker.end_run()
    assert tracker.run_id is None

    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert run.data.tags["arch"] == "mmoe" and "mlflow.user" in run.data.tags
    assert run.data.params["model.arch.num_experts"] == "8"
    assert run.data.params["model.arch.expert_hidden"] == "[64, 32]"
    assert run.data.params["many.p249"] == "249" and len(run.data.params) == 253
    assert len(run.data.params["long"]) == 6000 and run.data.params["long"].endswith("...")
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.5), (2, 0.25)]
    assert run.data.metrics["val/auc"] == pytest.approx(0.75) and math.isnan(run.data.metrics["broken"])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert artifacts == {"notes.txt", "folder", "meta", "plots"}
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/line.png"]
    assert client.download_artifacts(run_id, "meta/summary.json", str(tmp_path)).endswith("summary.json")
    # Artifacts live beside the database, not in the current directory.
    assert client.get_experiment_by_name("exp").artifact_location == (tmp_path / "mlruns").as_uri()
    assert (tmp_path / "mlruns").is_dir()


def test_a_restarted_job_reopens_its_run(store, caplog):
    tracker = Tracker(store, "exp", require=True)
    run_id = tracker.start_run("attempt", tags={"attempt": 1})
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.end_run("FAILED")
    again = Tracker(store, "exp", require=True)
    assert again.start_run("ignored", tags={"attempt": 2}, run_id=run_id) == run_id
    again.log_metrics({"loss": 0.5}, step=1)
    again.end_run()
    run = MlflowClient(store).get_run(run_id)
    assert (
        run.info.status == "FINISHED" and run.info.run_name == "attempt" and run.data.tags["attempt"] == "2"
    )
    assert [m.value for m in MlflowClient(store).get_metric_history(run_id, "loss")] == [1.0, 0.5]
    with caplog.at_level(logging.WARNING, logger="recsys.tracking"):
        fresh = again.start_run("new", run_id="0" * 32)
    assert fresh != "0" * 32 and "not found" in caplog.text


def test_run_block_ends_the_run_as_failed_on_an_error(store):
    tracker = Tracker(store, "exp", require=True)
    with pytest.raises(KeyError), tracker.run("crashes") as run_id:
        raise KeyError("boom")
    assert MlflowClient(store).get_run(run_id).info.status == "FAILED"
    with pytest.raises(RuntimeError, match="no active run; call start_run first"):
        tracker.log_metrics({"loss": 1.0})
    with pytest.raises(ValueError, match="status: expected 'FINISHED', 'FAILED' or 'KILLED', got 'DONE'"):
        tracker.end_run("DONE")


def test_unreachable_store_warns_once_and_every_call_is_a_no_op(caplog, package):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="recsys.tracking"):
        tracker = Tracker(uri, "exp")
        assert tracker.start_run("r") is None
        tracker.log_params({"a": 1})
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_text("x", "x.txt")
        assert log_model(tracker, package[0]) is None
        assert register_model(tracker, "models:/m-1", "name", "auc", 0.5) is None
        tracker.end_run()
    assert time.monotonic() - started < 20  # no multi-minute retries with backoff
    assert not tracker.enabled and "off" in tracker.describe()
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert f"MLflow tracking at {uri} is unreachable" in warnings[0]
    assert "the job goes on without tracking" in warnings[0]


def test_unreachable_store_raises_when_required():
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError, match=f"MLflow tracking at {uri} is unreachable"):
        Tracker(uri, "exp", require=True)
    assert time.monotonic() - started < 20


def test_a_failing_call_warns_once_and_training_goes_on(store, caplog):
    tracker = Tracker(store, "exp", max_consecutive_failures=3)
    run_id = tracker.start_run()
    with caplog.at_level(logging.WARNING, logger="recsys.tracking"):
        tracker.log_params({"lr": 0.1})
        tracker.log_params({"lr": 0.2})  # MLflow refuses to change a logged parameter
        tracker.log_params({"lr": 0.3})
        tracker.log_metrics({"loss": 1.0}, step=0)  # a success resets the count of failures in a row
    assert tracker.enabled and tracker.failed_calls == 2
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 1 and "MLflow log_params" in warnings[0] and "training goes on" in warnings[0]
    assert MlflowClient(store).get_run(run_id).data.metrics == {"loss": 1.0}
    for value in (0.4, 0.5, 0.6):
        tracker.log_params({"lr": value})
    assert not tracker.enabled  # three failures in a row: tracking is off
    tracker.log_metrics({"loss": 2.0}, step=1)
    assert MlflowClient(store).get_run(run_id).data.metrics == {"loss": 1.0}

    strict = Tracker(store, "exp", require=True)
    strict.start_run()
    strict.log_params({"lr": 0.1})
    with pytest.raises(TrackingError, match="MLflow log_params at .* failed"):
        strict.log_params({"lr": 0.2})


def test_logged_model_loads_with_pyfunc_and_predicts_as_predict_frame(store, package, monkeypatch, tmp_path):
    path, pkg, rows = package
    tracker = Tracker(store, "exp", require=True)
    with tracker.run("train"):
        uri = log_model(tracker, path, input_example=rows.head(3).to_pandas())
    assert uri is not None and uri.startswith("models:/m-")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # the fluent loader resolves models:/ URIs with it
    model = mlflow.pyfunc.load_model(uri)
    frame = rows.to_pandas()
    got = model.predict(frame)
    expected = predict_frame(pkg, rows).to_pandas()
    assert list(got.columns) == list(expected.columns) and len(got) == len(frame)
    np.testing.assert_allclose(got[["p_click", "p_purchase"]], expected[["p_click", "p_purchase"]], atol=1e-6)
    assert got["impression_id"].tolist() == frame["impression_id"].tolist()
    # Unlabelled rows (no history) and a small batch size go through the signature as well.
    unlabelled = rows.drop("click", "purchase")
    np.testing.assert_allclose(
        model.predict(unlabelled.to_pandas(), params={"batch_size": 4})["p_click"],
        predict_frame(pkg, unlabelled)["p_click"].to_numpy(),
        atol=1e-6,
    )
    inputs = model.metadata.get_input_schema().input_names()
    assert "impression_id" in inputs and "price" in inputs and "click" in inputs
    # Data only: the package and the MLmodel file naming the installed loader; no code, no pickle.
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "MLmodel" in files and any(f.endswith("/weights.pt") for f in files)
    assert not [f for f in files if f.endswith((".py", ".pkl", ".pickle", ".cloudpickle"))], files
    assert Model.load(str(local / "MLmodel")).flavors["python_function"]["loader_module"] == LOADER_MODULE
    # So it loads with MLflow's pickle deserialisation off, and scores the same.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    safe = mlflow.pyfunc.load_model(uri).predict(frame)
    np.testing.assert_allclose(safe[["p_click", "p_purchase"]], got[["p_click", "p_purchase"]], atol=0)


def test_registry_champion_moves_only_to_a_better_version(store, package, monkeypatch):
    path, _, rows = package
    tracker = Tracker(store, "exp", require=True)
    with tracker.run("train"):
        uri = log_model(tracker, path)
    name = "ranker"
    v1 = register_model(tracker, uri, name, "val/auc", 0.70)
    v2 = register_model(tracker, uri, name, "val/auc", 0.65)
    v3 = register_model(tracker, uri, name, "val/auc", 0.75)
    assert (v1.version, v1.alias, v1.previous_champion_metric) == ("1", CHAMPION, None)
    assert (v2.version, v2.alias, v2.previous_champion_metric) == ("2", CHALLENGER, 0.70)
    assert (v3.version, v3.alias, v3.previous_champion_metric) == ("3", CHAMPION, 0.70)
    client = MlflowClient(store)
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "3"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "2"
    assert client.get_model_version(name, "2").tags["validation.val/auc"] == "0.65"
    # A loss: lower is better; a tie does not move the champion.
    assert register_model(tracker, uri, "by_loss", "val/loss", 0.5, higher_is_better=False).alias == CHAMPION
    assert (
        register_model(tracker, uri, "by_loss", "val/loss", 0.5, higher_is_better=False).alias == CHALLENGER
    )
    assert register_model(tracker, uri, "by_loss", "val/loss", 0.4, higher_is_better=False).alias == CHAMPION
    with pytest.raises(ValueError, match=r"metric_value: expected a finite number, got nan"):
        register_model(tracker, uri, name, "val/auc", float("nan"))

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    champion = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    assert len(champion.predict(rows.head(4).to_pandas())) == 4


@pytest.mark.slow
def test_tracking_over_http_with_a_real_mlflow_server(mlflow_server, package, monkeypatch, caplog):  # noqa: F811
    uri, stop_server = mlflow_server.uri, mlflow_server.stop
    path, pkg, rows = package
    tracker = Tracker(uri, "http-exp", require=True)
    with tracker.run("over-http") as run_id:
        assert tracker.run_url == f"{uri}/#/experiments/{tracker.experiment_id}/runs/{run_id}"
        tracker.log_params({"model": {"dim": 4}})
        tracker.log_metrics({"loss": 0.5, "nan": float("nan")}, step=3)
        model_uri = log_model(tracker, path)
    assert register_model(tracker, model_uri, "http-ranker", "val/auc", 0.6).alias == CHAMPION

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"model.dim": "4"}
    assert run.data.metrics["loss"] == 0.5 and math.isnan(run.data.metrics["nan"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    got = mlflow.pyfunc.load_model("models:/http-ranker@champion").predict(rows.to_pandas())
    np.testing.assert_allclose(got["p_click"], predict_frame(pkg, rows)["p_click"].to_numpy(), atol=1e-6)

    # The server goes away in the middle of a run: one warning, and training goes on at once.
    optional = Tracker(uri, "http-exp", max_consecutive_failures=3)
    optional.start_run("server-dies")
    stop_server()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="recsys.tracking"):
        for step in range(5):
            optional.log_metrics({"loss": 1.0}, step=step)
        optional.end_run()
    assert time.monotonic() - started < 30
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 2 and "training goes on" in warnings[0] and "tracking is off" in warnings[1]
    assert not optional.enabled
