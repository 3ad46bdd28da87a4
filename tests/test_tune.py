"""Hyperparameter search: spec validation, and a tiny ASHA search end to end (real Ray Tune on the embedded
Ray, real Ray Train and TorchRec in every trial, real MLflow in a local SQLite store)."""

from __future__ import annotations

import time

import mlflow
import pytest

from features.config import FeatureConfig, builtin_config
from features.pipeline import build, load_tables
from recsys.experiments.search import run_search
from recsys.experiments.search_spec import Distribution, SearchSpec, apply_params, load_search
from recsys.train.config import TrainConfig, builtin_train_config
from synth.generate import generate


def test_shipped_search_loads_and_its_paths_are_fields_of_the_base_config():
    search = load_search("search_mmoe")
    assert search.num_samples == 8 and search.space["model.arch.num_experts"] == Distribution(
        "choice", (4, 8)
    )
    base = TrainConfig.from_yaml(builtin_train_config("tune_mmoe")).to_dict()
    params = {"training.dense_lr": 0.01, "model.arch.expert_hidden": [64, 32]}
    apply_params(base, dict.fromkeys(search.space))  # every path names a field of the base config
    config = TrainConfig.from_dict(apply_params(base, params))
    assert config.training.dense_lr == 0.01 and config.model.arch.expert_hidden == (64, 32)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"space": {"training.dense_lr": {"loguniform": [0, 1]}}}, "0 < low < high for loguniform"),
        ({"space": {"training.dense_lr": {"normal": [0, 1]}}}, "search.space.kind: expected one of"),
        ({"space": {"run.num_workers": [1, 2]}}, "expected paths under 'model.' or 'training.'"),
        (
            {"space": {"training.dense_lr": [0.1]}, "num_samples": 0},
            "search.num_samples: expected an integer >= 1",
        ),
        ({"space": {}}, "search.space: expected at least one dimension"),
    ],
)
def test_search_errors_name_the_field_and_value(data, message):
    with pytest.raises(ValueError, match=None) as error:
        SearchSpec.from_dict(data)
    assert message in str(error.value)


def test_a_path_that_is_no_field_is_refused():
    with pytest.raises(ValueError, match="training.dense_rate"):
        apply_params({"training": {"dense_lr": 0.1}}, {"training.dense_rate": 0.2})


@pytest.mark.slow
def test_asha_search_runs_trials_as_nested_mlflow_runs_and_writes_the_best_config(tmp_path):
    generate(tmp_path / "raw", 4_000, seed=5, n_users=100, n_items=200, progress=False)
    build(
        FeatureConfig.from_yaml(builtin_config("ecommerce")),
        load_tables(tmp_path / "raw"),
        tmp_path / "features",
        progress=False,
    )
    config = TrainConfig.from_dict(
        {
            "features": str(tmp_path / "features"),
            "truth": str(tmp_path / "raw" / "truth.parquet"),
            "model": {
                "tasks": [{"name": "click"}, {"name": "purchase", "given": "click"}],
                "embedding": {"dim": 4},
                "arch": {"type": "mmoe", "num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]},
            },
            "training": {"epochs": 2, "batch_size": 256, "log_every_steps": 2, "max_steps_per_epoch": 4},
            "run": {
                "experiment": "tune-test",
                "model_name": "tune-test",
                "num_workers": 1,
                "max_failures": 0,
            },
        }
    )
    search = SearchSpec.from_dict(
        {
            "name": "tiny",
            "space": {"training.dense_lr": {"loguniform": [1e-4, 1e-2]}, "model.arch.num_experts": [2, 3]},
            "num_samples": 2,  # a trial starts Ray Train (~20 s on CI); a leak shows in the CPU check below
            "max_concurrent_trials": 2,  # side by side: the suite's time
            "grace_period": 1,
            "reduction_factor": 2,
        }
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_search(config, search, tmp_path / "out", tracking_uri=uri)
    assert len(result.trials) == 2
    assert all(t.status in ("completed", "stopped early") for t in result.trials)
    # ASHA saw one report per epoch: a trial ran 1 epoch (stopped at the first rung) or both.
    assert all(t.epochs in (1, 2) and (t.status == "completed") == (t.epochs == 2) for t in result.trials)
    assert result.best_metric == max(t.best for t in result.trials)

    best = TrainConfig.from_yaml(result.best_path)
    chosen = next(t for t in result.trials if t.trial_id == result.best_trial).params
    assert best.training.dense_lr == pytest.approx(chosen["training.dense_lr"])
    assert best.model.arch.num_experts == chosen["model.arch.num_experts"]
    assert best.run.name == "" and best.run.parent_run_id == ""

    client = mlflow.MlflowClient(uri)
    children = client.search_runs(
        [client.get_experiment_by_name("tune-test").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
    )
    assert {c.info.run_id for c in children} == {t.mlflow_run_id for t in result.trials}
    status = {c.info.run_id: c.info.status for c in children}
    for t in result.trials:
        assert status[t.mlflow_run_id] == ("FINISHED" if t.status == "completed" else "KILLED")
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials"] == 2
    assert "search/best.yaml" in [a.path for a in client.list_artifacts(result.parent_run_id, "search")]
    # Every trial gave its CPUs back, stopped ones included: a leaked placement group per stopped trial
    # once starved the next trials' Ray Data reads (the cleaner needs the dashboard's State API).
    import ray

    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, f"CPUs still held: {ray.available_resources()}"
        time.sleep(1)


def test_the_command_line_refuses_an_unknown_search_with_status_2(capsys):
    from pipelines.tune import main

    assert main(["--config", "tune_mmoe", "--search", "nope"]) == 2
    assert "error: search: no shipped config 'nope'; shipped configs are" in capsys.readouterr().err
