"""Experiment grids: spec validation, parameter matching, the statistics, and one tiny grid end to end
(real Ray, real TorchRec, real MLflow in a local SQLite store)."""

from __future__ import annotations

import math
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from features.config import FeatureConfig, builtin_config
from features.pipeline import build, load_tables
from features.spec import FeatureSpec
from recsys.config import ModelConfig
from recsys.experiments.grid import Cell, RunRecord
from recsys.experiments.matching import ParameterCount, count_parameters, deep_merge, match_parameters
from recsys.experiments.report import (
    Report,
    largest_fall,
    metrics_figure,
    results_csv,
    results_markdown,
    write_report,
)
from recsys.experiments.runner import run_experiment
from recsys.experiments.spec import ExperimentSpec, load_spec
from recsys.experiments.stats import Advantage, CellSummary, advantages, findings, load_entropy, summarize
from recsys.train.config import TrainConfig
from synth.generate import generate

MODEL = {
    "tasks": [{"name": "click"}, {"name": "purchase", "given": "click"}],
    "embedding": {"dim": 4},
    "arch": {"type": "mmoe", "num_experts": 4, "expert_hidden": [16], "tower_hidden": [4]},
}


def spec_dict(**changes):
    data = {
        "name": "t",
        "base": {"model": MODEL, "run": {"num_workers": 1}},
        "datasets": [{"name": "d", "generate": {"impressions": 100, "task_correlation": 0.5}, "x": 0.5}],
        "models": [
            {"name": "mmoe"},
            {"name": "sb", "match_params": True, "train": {"model": {"arch": {"type": "shared_bottom"}}}},
        ],
        "seeds": [0, 1],
        "reference": "mmoe",
        "baseline": "sb",
    }
    data.update(changes)
    return data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny generated data set with its features (seconds)."""
    root = tmp_path_factory.mktemp("experiment")
    generate(root / "raw", 4_000, seed=3, task_correlation=0.5, n_users=100, n_items=200, progress=False)
    build(
        FeatureConfig.from_yaml(builtin_config("ecommerce")),
        load_tables(root / "raw"),
        root / "features",
        progress=False,
    )
    return root


def test_shipped_specs_load_with_their_grid_sizes():
    sizes = {}
    for name in ("task_relatedness", "gating", "census"):
        spec = load_spec(name)
        sizes[name] = len(spec.datasets) * len(spec.models) * len(spec.settings) * len(spec.seeds)
        quick = spec.for_quick()
        assert quick.seeds == spec.quick.seeds
        assert all(
            d.generate is None or d.generate.impressions == spec.quick.impressions for d in quick.datasets
        )
        assert quick.base["training"]["epochs"] == 1
    assert sizes == {"task_relatedness": 36, "gating": 18, "census": 24}
    worlds = load_spec("worlds")  # every world with and without the affinity features, mean and attention
    assert len(worlds.datasets) * len(worlds.models) * len(worlds.seeds) == 36
    assert {d.features for d in worlds.datasets} == {"ecommerce", "ecommerce_affinity"}
    assert {d.generate.world for d in worlds.datasets} == {"default", "interest", "daypart"}
    relatedness = load_spec("task_relatedness")
    assert [d.generate.task_correlation for d in relatedness.datasets] == [1.0, 0.9, 0.5, 0.0]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"baseline": "dlrm"}, "experiment.baseline: expected one of the models ['mmoe', 'sb'], got 'dlrm'"),
        ({"reference": ""}, "experiment.reference: a model has match_params: name the reference"),
        ({"seeds": [0, 0]}, "experiment.seeds: expected distinct seeds, got [0, 0]"),
        ({"datasets": [{"name": "d", "generate": {"impressions": 0}}]}, "dataset.generate.impressions"),
        ({"datasets": [{"name": "d", "table": "x.csv", "generate": {}}]}, "expected exactly one of"),
        ({"models": [{"name": "mmoe", "layers": 2}]}, "models[0]: unknown field(s) ['layers']"),
        ({"datasets": [{"name": "a b", "table": "x.csv"}]}, "datasets.name: expected a name"),
    ],
)
def test_spec_errors_name_the_field_and_value(changes, message):
    with pytest.raises(ValueError) as error:
        ExperimentSpec.from_dict(spec_dict(**changes))
    assert message in str(error.value)


def test_deep_merge_merges_mappings_and_replaces_lists():
    base = {"model": {"arch": {"type": "mmoe", "expert_hidden": [64, 32]}, "tasks": [1]}}
    merged = deep_merge(base, {"model": {"arch": {"expert_hidden": [8]}}})
    assert merged == {"model": {"arch": {"type": "mmoe", "expert_hidden": [8]}, "tasks": [1]}}
    assert base["model"]["arch"]["expert_hidden"] == [64, 32]  # not modified


def test_load_entropy_golden_values():
    assert load_entropy([0.25, 0.25, 0.25, 0.25]) == pytest.approx(1.0)
    assert load_entropy([1.0, 0.0, 0.0, 0.0]) == 0.0
    # two of four experts, evenly: log 2 / log 4
    assert load_entropy([0.5, 0.5, 0.0, 0.0]) == pytest.approx(0.5)
    assert math.isnan(load_entropy([1.0]))


def test_parameter_matching_sizes_the_shared_bottom_to_the_mmoe(tiny):
    spec = FeatureSpec.load(tiny / "features" / "spec.json")
    mmoe = ModelConfig.from_dict(MODEL)
    target = count_parameters(mmoe, spec)
    assert target.embedding > 0 and target.dense > 0
    bottom = ModelConfig.from_dict(
        deep_merge(MODEL, {"arch": {"type": "shared_bottom", "expert_hidden": [16]}})
    )
    assert count_parameters(bottom, spec).dense < 0.5 * target.dense  # one MLP vs four experts: smaller
    matched = match_parameters(bottom, spec, target.dense)
    got = count_parameters(matched, spec)
    assert abs(got.dense - target.dense) / target.dense < 0.02
    assert got.embedding == target.embedding  # only the dense part was resized
    assert matched.arch.expert_hidden[0] > 16


def record(model, seed, click, purchase, load=None):
    return RunRecord(
        cell=Cell("d", model, "default"),
        seed=seed,
        run_name=f"{model}-{seed}",
        mlflow_run_id=None,
        seconds=10.0,
        params=ParameterCount(1000, 50),
        metrics={"test/click/auc": click, "test/purchase/auc": purchase},
        expert_load=load or {},
        tasks=["click", "purchase"],
    )


def test_summaries_advantages_and_findings_golden_values():
    spec = ExperimentSpec.from_dict(spec_dict())
    records = [
        record("mmoe", 0, 0.70, 0.80, {"moe/click": [0.5, 0.5, 0.0, 0.0]}),
        record("mmoe", 1, 0.72, 0.84, {"moe/click": [0.25, 0.25, 0.25, 0.25]}),
        record("sb", 0, 0.69, 0.78),
        record("sb", 1, 0.70, 0.80),
    ]
    summaries = summarize(records, spec)
    mmoe = next(s for s in summaries if s.cell.model == "mmoe")
    assert mmoe.n == 2
    assert mmoe.mean["click/auc"] == pytest.approx(0.71)
    assert mmoe.std["click/auc"] == pytest.approx(0.0141421, abs=1e-6)  # ddof 1
    assert mmoe.mean["load_entropy"] == pytest.approx(0.75)  # mean of 0.5 and 1.0
    advs = advantages(records, spec)
    assert len(advs) == 1 and advs[0].cell.model == "mmoe" and advs[0].n == 2
    # paired differences 0.01 and 0.02 (click), 0.02 and 0.04 (purchase)
    assert advs[0].mean["click/auc"] == pytest.approx(0.015)
    assert advs[0].mean["purchase/auc"] == pytest.approx(0.03)
    facts = findings(spec, summaries, advs)
    assert facts == []  # no trend without several x values, no routing comparison with one gated model
    markdown = results_markdown(spec, summaries, advs, facts, "header")
    assert "| mmoe | 1,000 | 0.7100 ± 0.0141 | 0.8200 ± 0.0283 |" in markdown
    assert "| d | mmoe | +0.0150 ± 0.0071 | +0.0300 ± 0.0141 |" in markdown
    csv = results_csv(summaries)
    assert csv.splitlines()[1].startswith("d,mmoe,default,1000,50,click/auc,0.710000,0.014142,2,")
    metrics_figure(spec, summaries)  # draws without error


def test_the_report_shows_each_cells_validation_curve_and_its_largest_fall(tmp_path):
    spec = ExperimentSpec.from_dict(spec_dict())
    records = [record("mmoe", 0, 0.70, 0.80), record("mmoe", 1, 0.72, 0.84), record("sb", 0, 0.69, 0.78)]
    records[0].valid_curve = [0.70, 0.71, 0.703, 0.704]
    records[1].valid_curve = [0.72, 0.715, 0.716, 0.717]
    records[2].valid_curve = [0.69, 0.68, 0.67]
    assert largest_fall(np.array([0.70, 0.71, 0.703])) == pytest.approx(0.007)
    assert largest_fall(np.array([0.7, 0.8])) == 0.0
    report = Report(records, summarize(records, spec), [], [])
    files = write_report(spec, tmp_path, report, "header")
    assert files["validation.png"].stat().st_size > 0
    # mmoe: mean of the two seeds per epoch; its largest fall is seed 0's 0.007 (worse than seed 1's 0.005)
    assert "| d | mmoe | 0.7100 | 0.7125 | 0.7095 | 0.7105 | 0.0070 |" in report.markdown
    assert "| d | sb | 0.6900 | 0.6800 | 0.6700 |  | 0.0100 |" in report.markdown
    assert "![validation.png](validation.png)" in report.markdown


@pytest.mark.slow
def test_a_tiny_grid_runs_nested_in_one_mlflow_parent_and_is_reused(tmp_path):
    spec = ExperimentSpec.from_dict(
        spec_dict(
            datasets=[
                {
                    "name": "rho0.5",
                    "generate": {"impressions": 4000, "seed": 3, "n_users": 100, "n_items": 200},
                }
            ],
            base={
                "model": MODEL,
                "training": {"epochs": 1, "batch_size": 256, "log_every_steps": 2, "max_steps_per_epoch": 6},
                "run": {
                    "experiment": "exp-test",
                    "model_name": "exp-test",
                    "num_workers": 1,
                    "max_failures": 0,
                },
            },
            seeds=[0],
        )
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_experiment(spec, tmp_path / "out", tracking_uri=uri)
    assert len(result.records) == 2 and not any(r.reused for r in result.records)
    for name in (
        "results.md",
        "results.csv",
        "records.json",
        "metrics.png",
        "advantage.png",
        "expert_load.png",
    ):
        assert result.files[name].exists() and result.files[name].stat().st_size > 0
    # matched parameter counts, reported
    params = {r.cell.model: r.params.dense for r in result.records}
    assert abs(params["sb"] - params["mmoe"]) / params["mmoe"] < 0.02
    assert f"{params['sb']:,}" in result.markdown

    client = mlflow.MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    assert sorted(c.data.tags["experiment.model"] for c in children) == ["mmoe", "sb"]
    assert {c.info.run_id for c in children} == {r.mlflow_run_id for r in result.records}
    artifacts = [a.path for a in client.list_artifacts(result.parent_run_id, "results")]
    assert "results/results.md" in artifacts and "results/metrics.png" in artifacts
    mmoe = next(r for r in result.records if r.cell.model == "mmoe")
    assert 0 < mmoe.metrics["test/click/auc"] < 1 and set(mmoe.expert_load) == {"moe/click", "moe/purchase"}
    assert len(mmoe.valid_curve) == 1 and 0 < mmoe.valid_curve[0] < 1  # one epoch: one point, no plot

    again = run_experiment(spec, tmp_path / "out", tracking_uri=uri)  # nothing left to train
    assert all(r.reused for r in again.records)
    assert again.summaries[0].mean == result.summaries[0].mean


def test_shipped_base_configs_build_train_configs():
    for name in ("task_relatedness", "gating", "census"):
        spec = load_spec(name)
        for dataset in spec.datasets:
            for model in spec.models:
                data = deep_merge(deep_merge(spec.base, dataset.train), model.train)
                TrainConfig.from_dict({**data, "features": "unused"})


def test_a_data_set_filter_must_name_data_sets_of_the_spec(tmp_path):
    spec = ExperimentSpec.from_dict(spec_dict())
    with pytest.raises(
        ValueError, match=r"--datasets: expected names of the spec's data sets \['d'\], got \['x'\]"
    ):
        run_experiment(spec, tmp_path, datasets=["x"])


def test_the_command_line_refuses_an_unknown_spec_with_status_2(capsys):
    from pipelines.experiment import main

    assert main(["--spec", "nope"]) == 2
    assert "error: spec: no shipped config 'nope'; shipped configs are" in capsys.readouterr().err


def test_importing_the_report_leaves_matplotlib_alone_and_figures_need_no_backend():
    code = (
        "import sys, matplotlib, numpy as np, recsys.report as r\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "assert matplotlib.rcParams._get_backend_or_none() is None, 'backend set'\n"
        "fig = r.expert_load_figure([{'epoch': 0, 'valid/moe/click/load/expert1': 0.4}], 't')\n"
        "assert type(fig).__name__ == 'Figure' and len(fig.axes) == 2  # the heat map and its colour bar\n"
        "print(fig.axes[0].get_title())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "moe/click"


def test_findings_state_the_trend_over_x_and_the_routing_golden_values():
    datasets = [
        {"name": f"r{x}", "generate": {"impressions": 100, "task_correlation": x}, "x": x}
        for x in (1.0, 0.5, 0.0)
    ]
    spec = ExperimentSpec.from_dict(spec_dict(datasets=datasets, x_label="rho"))
    advs = [
        Advantage(Cell(f"r{x}", "mmoe", "default"), Cell(f"r{x}", "sb", "default"), {"click/auc": a}, {}, 2)
        for x, a in ((1.0, 0.001), (0.5, 0.004), (0.0, 0.009))
    ]
    summaries = [
        CellSummary(
            Cell("r0.0", m, "default"),
            ParameterCount(1, 1),
            2,
            {"load_entropy": e, "load_entropy_min": e / 2},
            {},
            1.0,
        )
        for m, e in (("mmoe", 0.9), ("top2", 0.4))
    ]
    facts = findings(spec, summaries, advs)
    assert facts[0] == (
        "mmoe − sb, click/auc by rho (1: +0.0010, 0.5: +0.0040, 0: +0.0090): the advantage grows as x falls "
        "(Spearman -1.00 between rho and the advantage)."
    )
    assert facts[1].startswith("r0.0 top2: normalised expert-load entropy 0.400 (mean over gates), 0.200")
    assert facts[3].startswith(
        "least balanced routing: r0.0 top2 (lowest gate's normalised load entropy 0.200)"
    )
    assert len(facts) == 4
