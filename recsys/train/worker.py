"""The training function every Ray Train worker runs: setup, epochs, finish.

1. **setup**: each worker builds the sharded model (:mod:`recsys.train.sharding`) and restores its shard of
   the latest checkpoint (after a failure or ``--resume``) or of ``start_from``;
2. **epochs**: each worker reads its share of the model-ready training Parquet itself
   (:class:`~recsys.data.shard.ParquetShard`: row groups in an order drawn anew every epoch, one contiguous
   range per worker, shuffled within a buffer, read ahead on a background thread; never the whole data set
   in memory), or with ``training.ingest: ray_data`` streams it through Ray Data; the workers step in
   lockstep (every forward pass of a sharded model exchanges embeddings between all workers). After each
   epoch they validate (:mod:`recsys.train.evaluation`) and checkpoint their shards; a run resumed from a
   checkpoint within an epoch skips the batches that epoch already trained on (their order depends only
   on the seed and the epoch). The global batches do not depend on the number of workers: a run resumed
   on fewer or more workers than it started with trains on the same ones (each worker on its part);
3. **finish**: the best epoch's weights are restored, the validation split is scored again to fit each
   binary task's calibration (``training.calibration``), the test split is scored (its metrics after the
   calibration, and before it as ``..._raw``), and the tables are gathered into one unsharded model, which
   rank 0 saves with the calibration as a model package beside the final checkpoint (its records folder).

Workers never call MLflow: they compute, and report (:mod:`recsys.train.reports`) what the driver's recorder
logs. Rank 0 draws a progress bar per epoch (``ray.experimental.tqdm_ray``, drawn by the driver) and tells one
line of the run's story per epoch.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from features.console import story
from recsys.data.batch import Batch, batch_from_arrow
from recsys.data.shard import ParquetShard, lockstep_batches
from recsys.precision import autocast
from recsys.train.checkpoints import (
    gather_unsharded,
    keep_best_epoch,
    load_checkpoint,
    restore_best_epoch,
    save_checkpoint,
)
from recsys.train.config import TrainConfig
from recsys.train.divergence import LossWatch, TrainingDivergedError
from recsys.train.evaluation import (
    Predictions,
    finite_metrics,
    fit_calibration,
    predict_split,
    read_truth,
    split_metrics,
)
from recsys.train.reports import (
    PACKAGE_DIR,
    TEST_PREDICTIONS,
    VALID_PREDICTIONS,
    EpochReport,
    FinalReport,
    Report,
    StartReport,
    StepReport,
    TrainWindow,
    records_folder,
    report_metrics,
)
from recsys.train.sharding import ShardedModel, build_sharded_model, plan_ranks, reinit_tables, set_epoch_lr
from recsys.train.state import TrainingState, WorkerSettings

if TYPE_CHECKING:
    from features.spec import FeatureSpec
    from recsys.calibration import PlattScaling


class WindowMeter:
    """Train loss and throughput per window of ``every`` steps, kept until the next report takes them.

    A window starts anew with every epoch (and after skipped batches); the step count goes on.
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self.pending: list[TrainWindow] = []
        self.epoch_rate = float("nan")  # rows per second of the last epoch's training, all workers
        self.start_epoch()

    def start_epoch(self) -> None:
        """Starts counting an epoch's rows and time."""
        self.epoch_started: float | None = None
        self.epoch_rows = 0
        self.restart()

    def restart(self) -> None:
        """Starts a new window now."""
        self.started, self.rows, self.losses = time.perf_counter(), 0, []

    def add(
        self, step: int, rows: int, losses: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]
    ) -> None:
        """Counts one step of ``rows`` (all workers); closes the window every ``every`` steps."""
        if self.epoch_started is None:
            self.epoch_started = self.started
        self.rows += rows
        self.epoch_rows += rows
        self.losses.append(losses)
        if step % self.every == 0:
            # The only wait for the device: a window's losses are read once, when the window closes.
            means = {k: float(torch.stack([row[k] for row in self.losses]).mean()) for k in self.losses[0]}
            scalars = {name: float(v) for name, v in stats.items() if v.numel() == 1}
            rate = self.rows / (time.perf_counter() - self.started)
            self.pending.append(TrainWindow(step, means, rate, scalars))
            self.restart()

    def end_epoch(self) -> None:
        """Sets :attr:`epoch_rate` from the epoch's trained rows and time."""
        if self.epoch_started is not None:
            self.epoch_rate = self.epoch_rows / (time.perf_counter() - self.epoch_started)

    def take(self) -> tuple[TrainWindow, ...]:
        """The windows closed since the last call."""
        windows, self.pending = tuple(self.pending), []
        return windows


@dataclass
class Worker:
    """One worker's side of a run: what setup builds and the epochs use."""

    settings: WorkerSettings
    spec: FeatureSpec
    sharded: ShardedModel
    rank: int
    world: int
    key_columns: list[str]
    truth: dict[str, np.ndarray] | None  # rank 0 only: the generator's true probabilities
    meter: WindowMeter = field(init=False)

    def __post_init__(self) -> None:
        self.meter = WindowMeter(self.config.training.log_every_steps)

    @property
    def config(self) -> TrainConfig:
        """The run's config."""
        return self.settings.config

    @property
    def main_key(self) -> str:
        """The validation metric that selects the model, e.g. ``valid/click/auc``."""
        return f"valid/{self.config.training.main_metric}"

    def split(self, name: str, order_seed: int | None = None, shards: int | None = None) -> ParquetShard:
        """This worker's share of a split of the model-ready data (see :class:`ParquetShard`)."""
        directory = Path(self.config.features) / name
        return ParquetShard(directory, self.rank, self.world, order_seed=order_seed, shards=shards)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The training function every Ray Train worker runs (see the module docstring).

    Args:
        loop_config: ``{"settings": WorkerSettings}`` (Ray Train passes the trainer's loop config).
    """
    import ray.train

    worker = setup(loop_config["settings"])
    state = restore(worker)
    try:
        state = run_epochs(worker, state)
    except TrainingDivergedError as diverged:  # on every worker at once; reported, not retried by Ray Train
        ray.train.report(report_metrics(diverged.report) if worker.rank == 0 else {})
        return
    finish(worker, state)


def setup(settings: WorkerSettings) -> Worker:
    """Builds this worker's share of the model, on its device."""
    import ray.train

    from features.spec import FeatureSpec

    config = settings.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cpu")
    if config.run.use_gpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, config.run.cpus_per_worker))
    spec = FeatureSpec.load(Path(config.features) / "spec.json")
    sharded = build_sharded_model(config, spec, device)
    if rank == 0 and config.training.precision != "fp32":
        story(sharded.precision_line)
    passthrough = spec.feature_config.passthrough
    key_columns = [c for c in ("impression_id", config.group_column) if c and c in passthrough]
    truth = read_truth(config.truth) if rank == 0 else None
    return Worker(settings, spec, sharded, rank, world, key_columns, truth)


def restore(worker: Worker) -> TrainingState:
    """This run's latest checkpoint (after a failure or ``--resume``), else ``start_from``, else a new state.

    Reports the start (the sharding plan, and where the workers resumed) to the driver.
    """
    import ray.train

    state, restored = TrainingState(data_shards=worker.config.run.max_workers), True
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(worker.sharded, Path(directory))
    elif worker.settings.start_from:
        state = load_checkpoint(worker.sharded, Path(worker.settings.start_from))
    else:
        restored = False
    plan = worker.sharded.plan
    start = StartReport(
        worker.world, str(plan), plan_ranks(plan), state.step, state.epoch if restored else None
    )
    ray.train.report(report_metrics(start) if worker.rank == 0 else {})
    t = worker.config.training
    if worker.rank == 0 and state.data_shards != worker.world and t.ingest == "parquet":
        rows, was = t.batch_size * state.data_shards, state.data_shards
        story(f"each step trains the global batch of {was} workers ({rows:,} rows) on {worker.world}")
    return state


def run_epochs(worker: Worker, state: TrainingState) -> TrainingState:
    """Trains and validates epoch after epoch, until the last or early stopping."""
    for epoch in range(state.epoch, worker.config.training.epochs):
        state = train_epoch(worker, state, epoch)
        state = validate(worker, state, epoch)
        if state.should_stop(worker.config.training.early_stopping_patience):
            break
    return state


def train_epoch(worker: Worker, state: TrainingState, epoch: int) -> TrainingState:
    """One pass over this worker's share of the training split; returns the state with its steps."""
    t = worker.config.training
    shard = _train_shard(worker, state, epoch)
    # Reading a loss waits for the device: on a GPU it is checked once per window.
    watch = LossWatch(worker.rank, 1 if worker.sharded.device.type == "cpu" else t.log_every_steps)
    batches = lockstep_batches(
        shard, t.batch_size, complete=False, max_steps=t.max_steps_per_epoch, shuffle_rows=t.shuffle_rows,
        seed=t.seed * 1000 + epoch, prepare=_gpu_feed(worker.sharded),
        prepare_threads=max(1, worker.config.run.cpus_per_worker // 2), stop=watch.tripped,
    )  # fmt: skip
    set_epoch_lr(worker.sharded, t, epoch)
    if t.embedding_reinit and epoch > 0 and state.epoch_step == 0:  # not again when resumed within it
        reinit_tables(worker.sharded, seed=t.seed * 1000 + epoch)
    bar = _progress_bar(worker, epoch, shard)
    step, skip = state.step, state.epoch_step
    scale = _loss_scale(shard, t.batch_size)
    worker.meter.start_epoch()
    for epoch_step, (batch, rows) in enumerate(batches, start=1):
        if bar is not None:
            bar.update(1)
        if epoch_step <= skip:  # trained on before the checkpoint this run started from
            worker.meter.restart()
            continue
        losses, stats = train_step(worker.sharded, batch, scale)
        step += 1
        watch.check(epoch, step, losses)
        worker.meter.add(step, rows * worker.world, losses, stats)
        if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0 and not watch.any_worker():
            within = replace(state, epoch=epoch, step=step, epoch_step=epoch_step)
            record = StepReport(epoch, step, worker.meter.take())
            report_checkpoint(worker, within, record, f"step{step:08d}")
    worker.meter.end_epoch()
    if bar is not None:
        bar.close()
    watch.raise_if_found()
    return replace(state, epoch=epoch, step=step, epoch_step=0)


def _train_shard(worker: Worker, state: TrainingState, epoch: int) -> Any:
    """This worker's training rows of ``epoch``: its part of every global batch, or its Ray Data shard."""
    t = worker.config.training
    if t.ingest == "ray_data":
        import ray.train

        return ray.train.get_dataset_shard("train")
    order_seed = t.seed * 1000 + epoch if t.shuffle_rows else None
    return worker.split("train", order_seed=order_seed, shards=state.data_shards)


def _loss_scale(shard: Any, batch_size: int) -> float:
    """The factor on this worker's loss that makes its part of a global batch count as the others'.

    Each worker's loss is the mean over its ``n`` rows; the dense gradients are averaged over the ``W``
    workers (DDP) and so are the tables' (TorchRec divides the gradients its all-to-all sends back by
    ``W``): with equal parts, both get the global batch's mean. Where ``W`` does not divide the global
    batch's ``G`` rows (3 workers), parts differ by a row, and ``n * W / G`` weighs each row alike (1 with
    as many workers as shards, and for a Ray Data shard).
    """
    if not isinstance(shard, ParquetShard):
        return 1.0
    rows = sum(hi - lo for _, lo, hi in shard.parts(batch_size))
    return rows * shard.world / (batch_size * shard.shards)


def _progress_bar(worker: Worker, epoch: int, shard: Any) -> Any:
    """Rank 0's bar of the epoch's batches (drawn by the driver); None on other ranks."""
    if worker.rank != 0:
        return None
    from ray.experimental.tqdm_ray import tqdm

    t = worker.config.training
    total = shard.num_batches(t.batch_size) if isinstance(shard, ParquetShard) else None
    if total is not None and t.max_steps_per_epoch:
        total = min(total, t.max_steps_per_epoch)
    return tqdm(desc=f"epoch {epoch + 1}/{t.epochs}", total=total, unit="batch")


def _gpu_feed(sharded: ShardedModel) -> Callable[[pa.Table], Batch] | None:
    """On a GPU: the read-ahead thread builds each batch and pins it (the copy then need not block)."""
    if sharded.device.type != "cuda":
        return None  # on a CPU the training thread builds the batch: the threads would share the cores
    layout = sharded.layout
    return lambda table: batch_from_arrow(table, layout).pin_memory()


def train_step(
    sharded: ShardedModel, data: pa.Table | Batch, loss_scale: float = 1.0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One optimizer step on a batch (Arrow rows, or a built batch).

    ``loss_scale`` weighs this worker's part of a global batch that does not split evenly
    (:func:`_loss_scale`).

    Returns:
        The loss parts and the gates' statistics, as tensors on the device: reading them would wait for
        the step to finish, so the meter reads them once per window.
    """
    batch = data if isinstance(data, Batch) else batch_from_arrow(data, sharded.layout)
    batch = batch.to(sharded.device, non_blocking=True)
    with autocast(sharded.autocast_dtype, sharded.device):
        loss, (parts, _, stats) = sharded.dmp(batch)
    sharded.optimizer.zero_grad()
    if sharded.train_module.loss.balancer.needs_task_gradients:  # GradNorm, PCGrad
        stats = {**stats, **sharded.train_module.before_backward()}
    (loss * loss_scale if loss_scale != 1.0 else loss).backward()
    sharded.optimizer.step()
    return {k: v.detach() for k, v in parts.items()}, stats


def validate(worker: Worker, state: TrainingState, epoch: int) -> TrainingState:
    """Scores the validation split; rank 0 decides the new state for all; checkpoints and reports it."""
    preds = predict_split(worker.sharded, worker.split("valid"), worker.config, worker.key_columns)
    decided: list[Any] = [None]
    record = None
    if worker.rank == 0:
        metrics = split_metrics(preds, worker.config, worker.truth, "valid/")
        decided = [state.after_validation(epoch, state.step, metrics, worker.main_key)]
        record = EpochReport(epoch, state.step, metrics, decided[0].best, worker.meter.take())
        story(_epoch_line(worker, epoch, metrics, worker.meter.epoch_rate))
    dist.broadcast_object_list(decided, src=0)
    state = decided[0]
    best = epoch if state.best_epoch == epoch else None
    report_checkpoint(worker, state, record, f"epoch{epoch:03d}", {VALID_PREDICTIONS: preds}, best)
    return state


def _epoch_line(worker: Worker, epoch: int, metrics: dict[str, float], rate: float) -> str:
    """``epoch 2/3  valid/click/auc 0.7123  valid/purchase/auc 0.6950  25.1k examples/s``."""
    keys = [f"valid/{t.name}/auc" for t in worker.config.model.tasks if t.kind == "binary"]
    if worker.main_key not in keys:
        keys.insert(0, worker.main_key)
    shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
    return f"epoch {epoch + 1}/{worker.config.training.epochs}  {shown}  {rate / 1000:.1f}k examples/s"


def report_checkpoint(
    worker: Worker,
    state: TrainingState,
    record: Report | None,
    name: str,
    predictions: dict[str, Predictions | None] | None = None,
    best_epoch: int | None = None,
) -> None:
    """Checkpoints this worker's shard and reports it, with rank 0's record and predictions files.

    The shards of a new best epoch (``best_epoch``) are also kept apart: Ray Train prunes old checkpoints.
    """
    for file, preds in (predictions or {}).items():
        if preds is not None:  # rank 0 holds the gathered predictions
            _write_predictions(preds, _records(worker, name) / file)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(worker.sharded, Path(tmp), state)
        if best_epoch is not None:
            keep_best_epoch(Path(tmp), Path(worker.settings.run_dir), best_epoch)
        _report(worker, record, Path(tmp), name)


def _records(worker: Worker, name: str) -> Path:
    """Rank 0's records folder of checkpoint ``name`` (a restarted worker writes it again)."""
    folder = records_folder(worker.settings.run_dir, _checkpoint_dir(name))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def finish(worker: Worker, state: TrainingState) -> None:
    """Restores the best epoch, calibrates, scores the test split, and reports the final checkpoint.

    The final checkpoint holds the last epoch's shards (a resumed run goes on from there, as from the last
    epoch's checkpoint); rank 0 leaves the test predictions (calibrated, with the probabilities before
    calibration) and the gathered model's package with its calibration in the report's records folder.
    """
    import shutil

    from recsys.package import save_package

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        save_checkpoint(worker.sharded, directory, state)
        state = restore_best_epoch(worker.sharded, state, Path(worker.settings.run_dir))
        calibration = _fit_calibration(worker)
        preds = predict_split(worker.sharded, worker.split("test"), worker.config, worker.key_columns)
        model = gather_unsharded(worker.sharded, worker.config)
        record = None
        if worker.rank == 0:
            records = _records(worker, "final")
            preds = preds.calibrated(calibration)
            metrics = split_metrics(preds, worker.config, worker.truth, "test/")
            _write_predictions(preds, records / TEST_PREDICTIONS)
            extra = {"run_id": worker.settings.mlflow_run_id, "test_metrics": finite_metrics(metrics)}
            package = records / PACKAGE_DIR
            shutil.rmtree(package, ignore_errors=True)  # an earlier attempt's (a restarted worker)
            save_package(
                package, model, worker.config.model, worker.spec, extra=extra, calibration=calibration
            )
            record = FinalReport(state, metrics, worker.meter.take())
        _report(worker, record, directory, "final")


def _fit_calibration(worker: Worker) -> dict[str, PlattScaling]:
    """The calibration of the model as restored, fitted on rank 0 to the validation split (others: empty).

    Every worker scores the split (a collective). The validation predictions of the best epoch were
    written with its checkpoint, but scoring them again costs one validation pass and relies on no file of
    an earlier process (a resumed run's best epoch may be from before the restart).
    """
    if worker.config.training.calibration == "none":
        return {}
    preds = predict_split(worker.sharded, worker.split("valid"), worker.config, worker.key_columns)
    return fit_calibration(preds, worker.config)


def _write_predictions(preds: Predictions, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(preds.to_arrow(), path)


def _report(worker: Worker, record: Report | None, directory: Path, name: str) -> None:
    """``ray.train.report`` of a checkpoint folder, by every worker; rank 0's carries the record."""
    import ray.train

    metrics = report_metrics(record, worker.main_key) if record is not None else {}
    checkpoint = ray.train.Checkpoint.from_directory(directory)
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=_checkpoint_dir(name))


def _checkpoint_dir(name: str) -> str:
    """The folder of checkpoint ``name`` in the run (``checkpoint_epoch001``), and of its records."""
    return f"checkpoint_{name}"
