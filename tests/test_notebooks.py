"""The notebooks execute top to bottom on small data (nbclient, a real kernel), and are committed without
outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from features.config import FeatureConfig, builtin_config
from features.pipeline import build, load_tables
from recsys.train.config import TrainConfig
from recsys.train.driver import run_training
from synth.generate import generate

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS.parent)}}
    )
    client.execute()
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
    )


def images(notebook: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in o.get("data", {}) for c in notebook.cells if c.cell_type == "code" for o in c.outputs
    )


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebooks")
    generate(root / "raw", 6_000, seed=11, n_users=100, n_items=200, progress=False)
    return root


@pytest.mark.slow
def test_explore_notebook_runs_on_a_generated_data_set(data, monkeypatch):
    monkeypatch.setenv("NOTEBOOK_DATA_DIR", str(data / "raw"))
    notebook = execute("explore_generated_data.ipynb")
    text = outputs(notebook)
    assert "click_rate" in text and "purchase_given_click" in text
    assert images(notebook) >= 3  # position bias, popularity, price


@pytest.mark.slow
def test_training_run_notebook_shows_curves_calibration_and_expert_load(data, monkeypatch):
    build(
        FeatureConfig.from_yaml(builtin_config("ecommerce")),
        load_tables(data / "raw"),
        data / "features",
        progress=False,
    )
    config = TrainConfig.from_dict(
        {
            "features": str(data / "features"),
            "truth": str(data / "raw" / "truth.parquet"),
            "model": {
                "tasks": [{"name": "click"}, {"name": "purchase", "given": "click"}],
                "embedding": {"dim": 4},
                "arch": {"type": "mmoe", "num_experts": 3, "expert_hidden": [8], "tower_hidden": [4]},
                "gate": {"type": "noisy_topk", "k": 2, "load_balance_weight": 0.01},
            },
            "training": {"epochs": 2, "batch_size": 256, "log_every_steps": 2, "max_steps_per_epoch": 6},
            "run": {
                "experiment": "notebook",
                "model_name": "notebook",
                "num_workers": 1,
                "max_failures": 0,
                "storage_path": str(data / "ray"),
            },
        }
    )
    uri = f"sqlite:///{data / 'mlflow.db'}"
    run_id = run_training(config, tracking_uri=uri).summary.mlflow_run_id
    monkeypatch.setenv("NOTEBOOK_TRACKING_URI", uri)
    monkeypatch.setenv("NOTEBOOK_EXPERIMENT", "notebook")
    monkeypatch.setenv("NOTEBOOK_RUN_ID", "")  # the latest finished run: this one
    notebook = execute("training_run.ipynb")
    text = outputs(notebook)
    assert run_id in text and "['click', 'purchase']" in text
    assert "click: mean prediction" in text and "purchase: mean prediction" in text
    assert images(notebook) >= 4  # learning curves, calibration, expert load heat maps, gate entropy
