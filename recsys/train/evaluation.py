"""Evaluation of a sharded model: predictions gathered from all workers, and their metrics on rank 0.

Each worker reads its contiguous share of an evaluation split straight from the Parquet files
(:class:`~recsys.data.shard.ParquetShard`, in file order): a Ray Data execution per evaluation cost ~10 s of
actor and task start-up here, more than the whole evaluation of a small split. An evaluation pass goes on
while any worker has rows, the others feeding padding batches whose predictions are dropped, so no row is
lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from recsys.calibration import PlattScaling, calibrate, fit_calibrators
from recsys.data.batch import batch_from_arrow
from recsys.data.shard import lockstep_batches, padding_row
from recsys.metric_names import expert_load_metrics, uncalibrated_metrics
from recsys.metrics import evaluate, oracle_gap
from recsys.precision import autocast
from recsys.train.config import TrainConfig
from recsys.train.sharding import ShardedModel

LABEL_PREFIX = "label_"  # a label column in a predictions table
PROB_PREFIX = "p_"  # a task's predicted probability in a predictions table
RAW_PROB_PREFIX = "raw_p_"  # a task's probability before calibration in a predictions table


@dataclass
class Predictions:
    """Predictions of one split gathered on rank 0 (numpy arrays, one row per evaluated row).

    Attributes:
        labels: per label column, ``(N,)``.
        probs: per task, the predicted probability ``(N,)`` (a regression task's prediction).
        keys: per key column (``impression_id``, the GAUC group), ``(N,)``.
        stats: per routing statistic ``{gate}/load``, the share of rows sent to each expert ``(E,)``.
        raw_probs: per calibrated task, the model's own probability before calibration ``(N,)``; empty
            before :meth:`calibrated`.
    """

    labels: dict[str, np.ndarray]
    probs: dict[str, np.ndarray]
    keys: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    raw_probs: dict[str, np.ndarray] = field(default_factory=dict)

    def to_arrow(self) -> pa.Table:
        """Keys, ``p_{task}``, ``raw_p_{task}`` and ``label_{label}`` columns (not the routing statistics)."""
        columns = {
            **self.keys,
            **{PROB_PREFIX + k: v for k, v in self.probs.items()},
            **{RAW_PROB_PREFIX + k: v for k, v in self.raw_probs.items()},
            **{LABEL_PREFIX + k: v for k, v in self.labels.items()},
        }
        return pa.table({k: pa.array(v) for k, v in columns.items()})

    @classmethod
    def from_arrow(cls, table: pa.Table) -> Predictions:
        """Reads :meth:`to_arrow`'s table back."""
        labels, probs, keys, raw = {}, {}, {}, {}
        for name in table.column_names:
            values = table.column(name).to_numpy()
            if name.startswith(LABEL_PREFIX):
                labels[name[len(LABEL_PREFIX) :]] = values
            elif name.startswith(PROB_PREFIX):
                probs[name[len(PROB_PREFIX) :]] = values
            elif name.startswith(RAW_PROB_PREFIX):
                raw[name[len(RAW_PROB_PREFIX) :]] = values
            else:
                keys[name] = values
        return cls(labels, probs, keys, raw_probs=raw)

    def binary(self, config: TrainConfig) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Labels and probabilities of the binary tasks, both keyed by task name."""
        tasks = [t for t in config.model.tasks if t.kind == "binary"]
        return {t.name: self.labels[t.label] for t in tasks}, {t.name: self.probs[t.name] for t in tasks}

    def regression(self, config: TrainConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Labels and predictions of the regression tasks, keyed by task name."""
        tasks = [t for t in config.model.tasks if t.kind == "regression"]
        return {t.name: (self.labels[t.label], self.probs[t.name]) for t in tasks}

    def calibrated(self, calibrators: dict[str, PlattScaling]) -> Predictions:
        """These predictions with each task's calibrator applied; the probabilities before it kept as raw."""
        raw = {task: self.probs[task] for task in calibrators}
        return replace(self, probs=calibrate(self.probs, calibrators), raw_probs={**self.raw_probs, **raw})


def predict_split(
    sharded: ShardedModel, shard: Any, config: TrainConfig, key_columns: list[str]
) -> Predictions | None:
    """Runs the sharded model over a split; returns all workers' predictions on rank 0 (None elsewhere).

    Every worker must call it (the forward passes and the gather are collectives).
    """
    sharded.dmp.eval()
    with torch.no_grad():
        regression = {t.name for t in config.model.tasks if t.kind == "regression"}
        local = _local_predictions(sharded, shard, config.training.batch_size, key_columns, regression)
    sharded.dmp.train()
    return _gather(local)


def _local_predictions(
    sharded: ShardedModel, shard: Any, batch_size: int, key_columns: list[str], regression: set[str]
) -> dict[str, dict[str, np.ndarray]]:
    """This worker's predictions: ``{"labels", "probs", "keys", "stats"}``, each per column.

    A binary task's logit becomes a probability; a regression task's output is its prediction.
    """
    layout = sharded.layout
    parts: dict[str, dict[str, list[np.ndarray]]] = {"labels": {}, "probs": {}, "keys": {}, "stats": {}}
    padding = padding_row(layout, key_columns)
    for table, n_real in lockstep_batches(shard, batch_size, complete=True, padding=padding):
        batch = batch_from_arrow(table, layout).to(sharded.device)
        with autocast(sharded.autocast_dtype, sharded.device):
            _, (_, logits, batch_stats) = sharded.dmp(batch)
        if n_real == 0:
            continue
        for name, value in logits.items():
            value = value[:n_real].float()  # fp32 (bf16 autocast gives bf16 logits)
            value = value if name in regression else torch.sigmoid(value)
            parts["probs"].setdefault(name, []).append(value.double().cpu().numpy())
        for name in layout.labels:
            parts["labels"].setdefault(name, []).append(batch.labels[name][:n_real].double().cpu().numpy())
        for name in key_columns:
            parts["keys"].setdefault(name, []).append(table.column(name).slice(0, n_real).to_numpy())
        for name, value in batch_stats.items():
            if name.endswith("/load"):  # a share per expert: weighted by rows, to average over workers
                parts["stats"].setdefault(name, []).append(value.double().cpu().numpy() * n_real)
    empty = {"labels": np.zeros(0), "probs": np.zeros(0), "keys": np.zeros(0, dtype=np.int64)}
    local = {part: {k: np.concatenate(v) for k, v in parts[part].items()} for part in empty}
    for name in layout.labels:
        local["labels"].setdefault(name, empty["labels"])
    for name in key_columns:
        local["keys"].setdefault(name, empty["keys"])
    local["stats"] = {k: np.sum(v, axis=0) for k, v in parts["stats"].items()}
    return local


def _gather(local: dict[str, dict[str, np.ndarray]]) -> Predictions | None:
    """All workers' predictions on rank 0; the expert loads averaged over all rows."""
    gathered: list[Any] = [local]
    if dist.get_world_size() > 1:
        # Not with one worker: a gloo all-gather of a large buffer (here the pickled predictions) left the
        # training steps after it ~12% slower on 2 cores. Its copy runs as a second OpenMP team, and once
        # libgomp manages more threads than there are CPUs it throttles the spin-wait of the step's
        # threads for the rest of the process (the same rate as OMP_WAIT_POLICY=PASSIVE from the start).
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
    if dist.get_rank() != 0:
        return None

    def cat(part: str) -> dict[str, np.ndarray]:
        names = {k for g in gathered for k in g[part]}
        return {k: np.concatenate([g[part][k] for g in gathered if k in g[part]]) for k in sorted(names)}

    n_rows = sum(len(next(iter(g["labels"].values()), [])) for g in gathered)
    names = {k for g in gathered for k in g["stats"]}
    loads = {k: sum(g["stats"][k] for g in gathered if k in g["stats"]) / max(n_rows, 1) for k in names}
    return Predictions(cat("labels"), cat("probs"), cat("keys"), loads)


def split_metrics(
    preds: Predictions, config: TrainConfig, truth: dict[str, np.ndarray] | None, prefix: str
) -> dict[str, float]:
    """Per-task metrics of gathered predictions, the expert loads, and the oracle gap on synthetic data.

    Of calibrated predictions, the metrics calibration changes are also given before it (``..._raw``).
    """
    labels, probs = preds.binary(config)
    out = evaluate(labels, probs, preds.keys.get(config.group_column), prefix=prefix) if labels else {}
    for task, (y, pred) in preds.regression(config).items():
        mse = float(np.mean((pred - y) ** 2)) if len(y) else float("nan")
        out.update(
            {f"{prefix}{task}/mse": mse, f"{prefix}{task}/neg_mse": -mse, f"{prefix}{task}/count": len(y)}
        )
    raw = {task: preds.raw_probs[task] for task in labels if task in preds.raw_probs}
    if raw:
        out.update(uncalibrated_metrics(evaluate({t: labels[t] for t in raw}, raw, prefix=prefix)))
    if truth is not None and "impression_id" in preds.keys:
        order = np.searchsorted(truth["impression_id"], preds.keys["impression_id"])
        for task, task_labels in labels.items():
            column = f"p_{task}"
            if column in truth:
                gap = oracle_gap(task_labels, probs[task], truth[column][order])
                out.update({f"{prefix}{task}/{k}": float(v) for k, v in gap.items()})
    out.update(expert_load_metrics(prefix, preds.stats))
    return out


def fit_calibration(preds: Predictions | None, config: TrainConfig) -> dict[str, PlattScaling]:
    """Per binary task, Platt scaling fitted to gathered (validation) predictions; empty if turned off.

    Empty also where there are no predictions (on ranks other than 0).
    """
    if preds is None or config.training.calibration == "none":
        return {}
    labels, probs = preds.binary(config)
    return fit_calibrators(labels, probs)


def read_truth(path: str) -> dict[str, np.ndarray] | None:
    """The generator's ``truth.parquet`` (true probabilities) sorted by ``impression_id``; None if no path."""
    if not path:
        return None
    import polars as pl

    frame = pl.read_parquet(path).sort("impression_id")
    return {name: frame[name].to_numpy() for name in frame.columns}


def finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics with a finite value, as floats (MLflow and JSON take no NaN)."""
    return {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
