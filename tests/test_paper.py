"""The MMoE paper's synthetic experiment: its data, the stacked trainer, and the spec end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch

from recsys.config import ModelConfig
from recsys.data.batch import FeatureLayout
from recsys.experiments.paper import load_paper_spec
from recsys.experiments.paper_report import spread_ratio
from recsys.experiments.spec import spec_path
from recsys.losses import MultiTaskLoss
from recsys.model import build_model
from recsys.train.stacked import StackedRuns
from synth.paper import PaperData, label_correlation


@pytest.mark.parametrize("p", [1.0, 0.9, 0.5, 0.0, -0.5])
def test_task_weights_have_the_correlation_as_cosine_and_the_scale_as_norm(p):
    data = PaperData(scale=2.0)
    w = data.weights(p, seed=3)
    assert np.linalg.norm(w, axis=1) == pytest.approx([2.0, 2.0])
    assert w[0] @ w[1] / 4.0 == pytest.approx(p, abs=1e-12)


def test_labels_follow_the_papers_formula_and_runs_share_inputs_across_correlations():
    data = PaperData(rows=2000, dim=10, noise_std=0.0, frequency_step=1.0)
    x, y = data.generate(0.5, seed=1)
    w = data.weights(0.5, seed=1)
    z = x.astype(np.float64) @ w.T
    by_hand = z + sum(np.sin((i + 1) * z + (i + 1) ** 2) for i in range(10))
    np.testing.assert_allclose(y, by_hand, rtol=1e-5, atol=1e-4)
    x0, _ = data.generate(0.0, seed=1)
    np.testing.assert_array_equal(x, x0)  # the same seed: the same inputs at every correlation
    head, _ = data.generate(0.5, seed=1, rows=100)
    np.testing.assert_array_equal(head, x[:100])
    # Lower cosine, lower label correlation (the sines lower it further than the cosine).
    noisy = PaperData(rows=20000, dim=10)
    corr = [label_correlation(noisy.generate(p, seed=2)[1]) for p in (1.0, 0.5, 0.0)]
    assert corr[0] > 0.99 and corr[0] > corr[1] > corr[2] and abs(corr[2]) < 0.05
    with pytest.raises(ValueError, match=r"data\.correlation: expected a number in \[-1, 1\], got 1\.5"):
        data.weights(1.5, seed=0)


def test_stacked_runs_train_each_model_exactly_as_alone():
    config = ModelConfig.from_dict(
        {
            "tasks": [{"name": "y1", "kind": "regression"}, {"name": "y2", "kind": "regression"}],
            "arch": {"type": "mmoe", "num_experts": 3, "expert_hidden": [6], "tower_hidden": [4]},
        }
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64, 5)).astype(np.float32)
    y = rng.standard_normal((2, 64, 2)).astype(np.float32)
    lrs = [1e-2, 3e-3]
    stacked = StackedRuns(config, in_dim=5, seeds=[4, 9], lrs=lrs)
    stacked.fit(x, y, x, y, batch_size=16, epochs=2, shuffle_seed=5)
    layout = FeatureLayout(sparse=(), dense=tuple(f"x{i}" for i in range(5)), labels=())
    loss = MultiTaskLoss(config.tasks)
    for k, seed in enumerate([4, 9]):
        torch.manual_seed(seed)
        alone = build_model(config, layout)
        optimizer = torch.optim.Adam(alone.parameters(), lr=lrs[k])
        for epoch in range(2):
            order = np.random.default_rng([5, k, epoch]).permutation(64)
            for b in range(4):
                rows = order[b * 16 : (b + 1) * 16]
                logits, stats = alone.heads(torch.from_numpy(x[k, rows]))
                labels = {"y1": torch.from_numpy(y[k, rows, 0]), "y2": torch.from_numpy(y[k, rows, 1])}
                total, _ = loss(logits, labels, stats)
                optimizer.zero_grad()
                total.backward()
                optimizer.step()
        for name, p in alone.named_parameters():
            torch.testing.assert_close(stacked.params[f"model.{name}"][k], p, rtol=1e-4, atol=1e-5, msg=name)
    own = stacked.evaluate(x, y)
    assert own.shape == (2, 2) and np.isfinite(own).all()


def test_spread_ratio_interval_covers_the_truth():
    rng = np.random.default_rng(1)
    wide, narrow = rng.normal(0, 2.0, 200), rng.normal(0, 1.0, 200)
    ratio, lo, hi = spread_ratio(wide, narrow)
    assert lo < 2.0 < hi and lo > 1.0 and ratio == pytest.approx(wide.std(ddof=1) / narrow.std(ddof=1))


def test_the_shipped_spec_is_the_papers_setting():
    spec = load_paper_spec(spec_path("paper_synthetic"))
    assert spec.data.dim == 100 and spec.runs >= 20 and spec.learning_rates == (1e-4, 1e-3, 1e-2)
    assert {1.0, 0.9, 0.5, 0.0} <= set(spec.correlations)
    sizes = {m.name: m.config().arch for m in spec.models}
    assert sizes["mmoe"].num_experts == 8 and sizes["mmoe"].expert_hidden == (16,)
    assert sizes["omoe"].type == "omoe" and sizes["shared_bottom"].expert_hidden == (113,)
    assert all(a.tower_hidden == (8,) for a in sizes.values())


def test_paper_spec_runs_end_to_end_reports_and_reuses_its_cells(tmp_path):
    out = tmp_path / "paper"
    command = [sys.executable, "-m", "pipelines.experiment", "--spec", "paper_synthetic", "--quick"]
    command += ["--out", str(out)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    report = (out / "results.md").read_text()
    assert "## Findings" in report and "p=0: MMoE's test loss is" in report
    assert "MMoE's spread of final losses over runs is" in report
    for name in ("loss_by_correlation.png", "loss_curves.png", "trainability.png"):
        assert (out / name).stat().st_size > 10_000
    records = json.loads((out / "records.json").read_text())
    assert {(r["model"], r["correlation"]) for r in records} == {
        (m, c) for m in ("shared_bottom", "omoe", "mmoe") for c in (1.0, 0.0)
    }
    assert all(len(r["test_losses"]) == 3 and all(np.isfinite(r["test_losses"])) for r in records)
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("paper-synthetic").experiment_id)
    parents = [r for r in runs if r.data.tags.get("experiment.kind") == "paper_synthetic"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 6
    assert all(r.info.status == "FINISHED" for r in runs)
    curve = client.get_metric_history(children[0].info.run_id, "valid_loss")
    assert len(curve) == 3  # before training and after each of the 2 epochs
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert (
        second.returncode == 0 and second.stdout.count(": reused (") + second.stderr.count(": reused (") == 6
    )
    bad = subprocess.run([*command, "--seeds", "1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--seeds: not an option of a paper_synthetic spec" in bad.stderr
