"""What rank 0 records of a training run, through :mod:`recsys.tracking.core` (the one MLflow module).

A :class:`RankZeroSession` opens (or, after a worker restart or ``--resume``, reopens) the MLflow run,
logs the config, the feature spec and the sharding plan, train loss and throughput every N steps, the
validation metrics and plots every epoch, and at the end the test metrics, the model (logged and
registered: ``champion`` if it beats the current champion on the main validation metric, else
``challenger``) and a ``result.json`` summary beside the checkpoints.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from features.spec import FeatureSpec
from recsys.train.config import TrainConfig


class RankZeroSession:
    """Rank 0's side of a run: every MLflow call of training goes through here."""

    def __init__(
        self, loop_config: dict[str, Any], config: TrainConfig, spec: FeatureSpec, sharded: Any
    ) -> None:
        from recsys.tracking import Tracker

        self.config = config
        self.spec = spec
        self.run_dir = Path(loop_config["run_dir"])
        self.tracker = Tracker(
            loop_config["tracking_uri"], config.run.experiment, require=loop_config["require_tracking"]
        )
        state_file = self.run_dir / "tracking.json"
        previous = json.loads(state_file.read_text()) if state_file.exists() else {}
        self.steps: list[int] = []
        self.losses: dict[str, list[float]] = {}
        self.run_id = self.tracker.start_run(
            run_name=self.run_dir.name,
            run_id=previous.get("run_id"),
            tags={"ray_run": self.run_dir.name, "spec_hash": spec.content_hash, **_run_tags(config)},
        )
        if previous.get("run_id"):
            return  # a restarted worker or --resume: params and artifacts are there already
        state_file.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(state_file, json.dumps({"run_id": self.run_id}))
        self.tracker.log_params(config.to_dict())
        self.tracker.log_dict(config.to_dict(), "config/train_config.json")
        self.tracker.log_text(spec.to_json(), "config/feature_spec.json")
        self.tracker.log_text(str(sharded.plan), "config/sharding_plan.txt")
        world = torch.distributed.get_world_size()
        self.tracker.log_params({"world_size": world, "sharding_plan_ranks": _plan_ranks(sharded.plan)})

    def resumed(self, meta: dict[str, Any]) -> None:
        """Notes a restart from a checkpoint."""
        self.tracker.log_metrics({"restarts/from_epoch": float(meta["epoch"])}, step=int(meta["step"]))

    def train_window(self, step: int, losses: list[dict[str, float]], rows_per_s: float, stats: dict) -> None:
        """Logs the mean losses of the last window, the throughput and the gates' statistics."""
        means = {k: float(np.mean([row[k] for row in losses])) for k in losses[0]}
        self.steps.append(step)
        for k, v in means.items():
            self.losses.setdefault(k, []).append(v)
        metrics = {f"train/{k}": v for k, v in means.items()}
        metrics["train/examples_per_s"] = rows_per_s
        for name, value in stats.items():
            if value.numel() == 1:
                metrics[f"train/{name}"] = float(value)
        self.tracker.log_metrics(metrics, step=step)

    def epoch_end(self, epoch: int, step: int, metrics: dict[str, float], preds: Any) -> None:
        """Logs the validation metrics and the epoch's plots."""
        from recsys.report import calibration_figure

        self.tracker.log_metrics({**_scalars(metrics), "epoch": float(epoch)}, step=step)
        tasks = [t for t in self.config.model.tasks if t.kind == "binary"]
        labels = {t.name: preds.labels[t.label] for t in tasks}
        probs = {t.name: preds.probs[t.name] for t in tasks}
        self.tracker.log_figure(
            calibration_figure(labels, probs, f"validation, epoch {epoch}"),
            f"report/calibration_valid_epoch{epoch:03d}.png",
        )
        print(
            f"epoch {epoch} step {step}: "
            + ", ".join(
                f"{k}={v:.4f}"
                for k, v in sorted(metrics.items())
                if k.endswith(("/auc", "/gauc", "/oracle_auc"))
            )
        )

    def finish(self, model: Any, metrics: dict[str, float], preds: Any, meta: dict[str, Any]) -> None:
        """Test metrics, the report, the model package, its registration, and ``result.json``."""
        from recsys.package import save_package
        from recsys.report import calibration_figure, expert_load_figure, loss_figure
        from recsys.tracking import log_model, register_model

        step = int(meta["step"])
        self.tracker.log_metrics(_scalars(metrics), step=step)
        tasks = [t for t in self.config.model.tasks if t.kind == "binary"]
        labels = {t.name: preds.labels[t.label] for t in tasks}
        probs = {t.name: preds.probs[t.name] for t in tasks}
        self.tracker.log_figure(
            calibration_figure(labels, probs, "test split"), "report/calibration_test.png"
        )
        self.tracker.log_figure(
            expert_load_figure(meta["history"], "expert load per gate (validation)"), "report/expert_load.png"
        )
        if self.steps:
            self.tracker.log_figure(loss_figure(self.steps, self.losses, "training loss"), "report/loss.png")
        self.tracker.log_dict({"history": meta["history"], "test": metrics}, "report/metrics.json")

        # The sharded model's test predictions, for audits (and the test that the registered model agrees).
        import polars as pl

        columns = {**preds.keys, **{f"p_{k}": v for k, v in preds.probs.items()}}
        predictions = self.run_dir / "test_predictions.parquet"
        pl.DataFrame(columns).write_parquet(predictions)
        self.tracker.log_artifact(predictions, "report")

        package_dir = self.run_dir / "model"
        save_package(  # a resumed run replaces the package its first part wrote
            package_dir,
            model,
            self.config.model,
            self.spec,
            extra={"run_id": self.run_id, "test_metrics": _scalars(metrics)},
            overwrite=True,
        )
        main_task, main_name = self.config.training.main_metric.split("/")
        best = meta["best"]
        # The registry compares the validation metric of the epoch whose weights the package holds.
        key = f"valid/{main_task}/{main_name}"
        rows = [h for h in meta["history"] if h["epoch"] == meta.get("final_epoch")] or meta["history"][-1:]
        final = rows[0].get(key, float("nan")) if rows else float("nan")
        summary: dict[str, Any] = {
            "mlflow_run_id": self.run_id,
            "model_package": str(package_dir),
            "best_valid_main_metric": best,
            "final_valid_main_metric": final,
            "final_epoch": meta.get("final_epoch"),
            "steps": meta.get("step"),  # training steps taken (on each worker)
            "test": {
                k: v
                for k, v in _scalars(metrics).items()
                if k.endswith(
                    ("/auc", "/gauc", "/log_loss", "/ne", "/calibration", "/oracle_auc", "/auc_gap")
                )
            },
        }
        loads = expert_loads(metrics, "test/")
        if loads:
            summary["expert_load"] = loads  # per gate, for experiments that compare routing
        uri = log_model(self.tracker, package_dir)
        version = None
        if uri is not None:
            version = register_model(self.tracker, uri, self.config.run.model_name, key, float(final))
        if version is not None:
            summary.update(
                {
                    "model_uri": uri,
                    "registered_model": self.config.run.model_name,
                    "version": version.version,
                    "alias": version.alias,
                }
            )
        self.tracker.end_run("FINISHED")
        _atomic_write(
            self.run_dir / "result.json", json.dumps(summary, indent=1, sort_keys=True, default=str)
        )
        print(f"test: {json.dumps(summary['test'], sort_keys=True)}")


def _run_tags(config: TrainConfig) -> dict[str, str]:
    """The config's extra MLflow tags, and the parent run's id when the run is nested."""
    tags = dict(config.run.tags)
    if config.run.parent_run_id:
        tags["mlflow.parentRunId"] = config.run.parent_run_id
    return tags


def expert_loads(metrics: dict[str, float], prefix: str) -> dict[str, list[float]]:
    """The share of rows routed to each expert, per gate, from ``{prefix}{gate}/load/expert{e}`` metrics.

    Example: ``{"test/moe/click/load/expert0": 0.7, "test/moe/click/load/expert1": 0.3}`` with prefix
    ``"test/"`` gives ``{"moe/click": [0.7, 0.3]}``.
    """
    cells: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        if key.startswith(prefix) and "/load/expert" in key:
            gate, expert = key[len(prefix) :].split("/load/expert")
            cells.setdefault(gate, {})[int(expert)] = float(value)
    return {gate: [shares[e] for e in sorted(shares)] for gate, shares in sorted(cells.items())}


def _scalars(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if np.isfinite(v)}


def _plan_ranks(plan: Any) -> str:
    """``table:ranks`` for every table of the plan, e.g. ``t_item:[0] t_user:[1]``."""
    parts = []
    for module_plan in plan.plan.values():
        for table, sharding in module_plan.items():
            parts.append(f"{table}:{sharding.ranks}")
    return " ".join(sorted(parts))


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
