"""Distributed training: Ray Train workers over TorchRec-sharded embedding tables.

Read top to bottom: :func:`run_training` (the driver) builds a Ray Train ``TorchTrainer``; each worker runs
:func:`train_loop_per_worker`, which

1. builds the model with its embedding tables on the ``meta`` device, asks TorchRec's planner for a plan
   over all workers (table-wise by default: whole tables live on one worker each), and wraps it in
   ``DistributedModelParallel``; tables train with a fused sparse optimizer (only the rows a batch touches
   are updated), dense parameters with Adam;
2. reads its share of the model-ready training Parquet itself (:class:`ParquetShard`: row groups in an
   order drawn anew every epoch, cut into one contiguous range per worker, shuffled within a buffer,
   read ahead on a background thread; never the whole data set in memory), or with
   ``training.ingest: ray_data`` streams it through Ray Data. Reading directly needs no coordinator:
   Ray Data's split coordinator took ~70% of a core on the 2-core machine at 20M rows (193 files), and
   its read tasks ran in other processes competing for the same cores;
3. evaluates on the validation split every epoch and on the test split at the end, on predictions
   gathered from all workers (rank 0 computes the metrics); each worker reads its contiguous share of an
   evaluation split straight from the Parquet files (:class:`ParquetShard`, in file order): a Ray Data
   execution per evaluation cost ~10 s of actor and task start-up here, more than the whole evaluation
   of a small split;
4. checkpoints its shard of the state every epoch (and every N steps), so that a killed worker is
   restarted from the last checkpoint (``FailureConfig``); a run resumed from a checkpoint within an
   epoch skips the batches that epoch already trained on (their order depends only on seed and epoch);
5. at the end gathers the sharded tables into one unsharded model on rank 0, which saves it as a model
   package, logs it to MLflow and registers it.

MLflow is only called by rank 0, through :mod:`recsys.tracking.core`.

Lockstep: every forward pass of a sharded model exchanges embeddings between all workers, so every worker
must run the same number of steps. Training steps go on while every worker still has a full batch; an
evaluation pass goes on while any worker has rows, the others feeding a padding batch whose predictions
are dropped, so no evaluation row is lost.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from recsys.data.batch import FeatureLayout, batch_from_arrow
from recsys.data.shard import ParquetShard, lockstep_batches, padding_row, read_ahead  # noqa: F401
from recsys.losses import RankingTrain
from recsys.model import RankingModel, build_model
from recsys.runtime import embedded_ray_env, model_process_env
from recsys.train.config import TrainConfig

if TYPE_CHECKING:  # polars, which features.spec needs, is not needed to shard or step the model
    from features.spec import FeatureSpec

SPLIT_DIRS = ("train", "valid", "test")
CHECKPOINT_FILE = "rank{rank}.pt"


# ----------------------------------------------------------------------------------- sharded model


@dataclass
class ShardedModel:
    """A worker's share of the model and everything that trains it."""

    dmp: torch.nn.Module  # DistributedModelParallel(RankingTrain)
    optimizer: Any  # CombinedOptimizer(fused sparse, Adam dense)
    dense_optimizer: Any  # the Adam part, whose state is created lazily
    plan: Any
    layout: FeatureLayout
    device: torch.device


def _fused_optimizer(name: str) -> type:
    from torchrec.optim import RowWiseAdagrad

    return {"rowwise_adagrad": RowWiseAdagrad, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]


def build_sharded_model(config: TrainConfig, spec: FeatureSpec, device: torch.device) -> ShardedModel:
    """Builds the model on the meta device, plans its tables over all workers and shards it.

    Must run in every worker of an initialised process group, with the same seed: dense parameters are
    created identically everywhere (DDP also broadcasts them), tables are materialised by their owners.
    """
    return shard_model(config, FeatureLayout.from_spec(spec, config.model.embedding), device)


def shard_model(config: TrainConfig, layout: FeatureLayout, device: torch.device) -> ShardedModel:
    """:func:`build_sharded_model` for a layout given directly (benchmarks build one without a spec)."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    t = config.training
    torch.manual_seed(t.seed)
    model = build_model(config.model, layout, embedding_device="meta")
    train_module = RankingTrain.from_config(model, config.model)
    apply_optimizer_in_backward(
        _fused_optimizer(t.embedding_optimizer), model.sparse_arch.parameters(), {"lr": t.embedding_lr}
    )
    world = dist.get_world_size()
    constraints = None
    if t.sharding != "auto":
        tables = [f"t_{name}" for name in layout.tables]
        constraints = {name: ParameterConstraints(sharding_types=[t.sharding]) for name in tables}
    topology = Topology(world_size=world, compute_device=device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(train_module, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(train_module, device=device, plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        # fused: one kernel over all parameters instead of ~6 elementwise ops per parameter (CPU and CUDA)
        lambda params: torch.optim.Adam(params, lr=t.dense_lr, fused=True),
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    return ShardedModel(dmp, optimizer, dense, plan, layout, device)


def gather_unsharded(sharded: ShardedModel, config: TrainConfig) -> RankingModel | None:
    """Gathers every table shard to rank 0 and returns the unsharded model there (None elsewhere).

    Every worker must call it: the shards travel by collective ``gather``.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    rank = dist.get_rank()
    state = sharded.dmp.state_dict()
    full: dict[str, torch.Tensor] = {}
    for key in sorted(state):  # the same order on every worker: each gather is a collective
        value = state[key]
        if isinstance(value, ShardedTensor):
            out = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=out)
            if rank == 0:
                full[key] = out
        elif rank == 0:
            full[key] = value.detach().cpu()
    if rank != 0:
        return None
    model = build_model(config.model, sharded.layout)
    wrapper = RankingTrain.from_config(model, config.model)
    wrapper.load_state_dict(full)
    return model.eval()


@dataclass
class Predictions:
    """Predictions of one split gathered on rank 0 (numpy arrays, one row per evaluated row)."""

    labels: dict[str, np.ndarray]
    probs: dict[str, np.ndarray]
    keys: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, np.ndarray] = field(default_factory=dict)


def predict_split(
    sharded: ShardedModel, shard: Any, config: TrainConfig, key_columns: list[str]
) -> Predictions | None:
    """Runs the sharded model over a split; returns all workers' predictions on rank 0 (None elsewhere)."""
    dmp, layout = sharded.dmp, sharded.layout
    dmp.eval()
    labels: dict[str, list[np.ndarray]] = {name: [] for name in layout.labels}
    probs: dict[str, list[np.ndarray]] = {}
    keys: dict[str, list[np.ndarray]] = {name: [] for name in key_columns}
    stats: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        padding = padding_row(layout, key_columns)
        for table, n_real in lockstep_batches(
            shard, config.training.batch_size, complete=True, padding=padding
        ):
            batch = batch_from_arrow(table, layout).to(sharded.device)
            _, (_, logits, batch_stats) = dmp(batch)
            if n_real == 0:
                continue
            for name, value in logits.items():
                probs.setdefault(name, []).append(torch.sigmoid(value[:n_real]).double().cpu().numpy())
            for name in layout.labels:
                labels[name].append(batch.labels[name][:n_real].double().cpu().numpy())
            for name in key_columns:
                keys[name].append(table.column(name).slice(0, n_real).to_numpy())
            for name, value in batch_stats.items():
                if name.endswith("/load"):
                    stats.setdefault(name, []).append(value.double().cpu().numpy() * n_real)
    dmp.train()
    local = {
        "labels": {k: np.concatenate(v) if v else np.zeros(0) for k, v in labels.items()},
        "probs": {k: np.concatenate(v) if v else np.zeros(0) for k, v in probs.items()},
        "keys": {k: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for k, v in keys.items()},
        "stats": {k: np.sum(v, axis=0) for k, v in stats.items()},
    }
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
        names = gathered[0][part].keys()
        return {k: np.concatenate([g[part][k] for g in gathered if k in g[part]]) for k in names}

    n_rows = sum(len(next(iter(g["labels"].values()), [])) for g in gathered)
    loads = {}
    for name in {k for g in gathered for k in g["stats"]}:
        loads[name] = sum(g["stats"][name] for g in gathered if name in g["stats"]) / max(n_rows, 1)
    return Predictions(cat("labels"), cat("probs"), cat("keys"), loads)


def split_metrics(
    preds: Predictions, config: TrainConfig, truth: Any | None, prefix: str
) -> dict[str, float]:
    """Per-task metrics of gathered predictions, plus the oracle gap on synthetic data."""
    from recsys.metrics import evaluate, oracle_gap

    tasks = [t for t in config.model.tasks if t.kind == "binary"]
    labels = {t.name: preds.labels[t.label] for t in tasks}
    probs = {t.name: preds.probs[t.name] for t in tasks}
    groups = preds.keys.get(config.group_column)
    out = evaluate(labels, probs, groups, prefix=prefix)
    if truth is not None and "impression_id" in preds.keys:
        ids = preds.keys["impression_id"]
        order = np.searchsorted(truth["impression_id"], ids)
        for task in tasks:
            column = f"p_{task.name}"
            if column in truth:
                gap = oracle_gap(labels[task.name], probs[task.name], truth[column][order])
                out.update({f"{prefix}{task.name}/{k}": float(v) for k, v in gap.items()})
    for name, load in preds.stats.items():
        for e, share in enumerate(load):
            out[f"{prefix}{name}/expert{e}"] = float(share)
    return out


# ------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(sharded: ShardedModel, directory: Path, meta: dict[str, Any]) -> None:
    """Writes this worker's shard of the model and optimizer state (Ray merges all workers' files)."""
    state = {"model": sharded.dmp.state_dict(), "optimizer": sharded.optimizer.state_dict(), "meta": meta}
    torch.save(state, directory / CHECKPOINT_FILE.format(rank=dist.get_rank()))


def load_checkpoint(sharded: ShardedModel, directory: Path) -> dict[str, Any]:
    """Restores this worker's shard; returns the checkpoint's metadata (epoch, step, history)."""
    # The checkpoint holds ShardedTensors written by this project's own workers, not a downloaded model:
    # full unpickling is needed for them (the registered model, in contrast, loads with weights_only).
    state = torch.load(directory / CHECKPOINT_FILE.format(rank=dist.get_rank()), weights_only=False)
    sharded.dmp.load_state_dict(state["model"])
    # Adam creates its state at the first step; TorchRec's keyed optimizers load only into existing state.
    sharded.dense_optimizer.init_state()
    sharded.optimizer.load_state_dict(state["optimizer"])
    return state["meta"]


# ------------------------------------------------------------------------------------ the worker


def _read_truth(path: str) -> dict[str, np.ndarray] | None:
    if not path:
        return None
    import polars as pl

    frame = pl.read_parquet(path).sort("impression_id")
    return {name: frame[name].to_numpy() for name in frame.columns}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The training function every Ray Train worker runs (see the module docstring)."""
    import ray.train

    config = TrainConfig.from_dict(loop_config["config"])
    t = config.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if config.run.use_gpu
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, config.run.cpus_per_worker))
    from features.spec import FeatureSpec

    spec = FeatureSpec.load(Path(config.features) / "spec.json")
    sharded = build_sharded_model(config, spec, device)

    tracker = None
    if rank == 0:
        from recsys.train.session import RankZeroSession

        tracker = RankZeroSession(loop_config, config, spec, sharded)

    meta = {"epoch": 0, "step": 0, "best": None, "bad_epochs": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()  # this run's own latest one, after a failure or --resume
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            meta = load_checkpoint(sharded, Path(directory))
    elif loop_config.get("start_from"):
        meta = load_checkpoint(sharded, Path(loop_config["start_from"]))
    if tracker and (checkpoint is not None or loop_config.get("start_from")):
        tracker.resumed(meta)

    key_columns = [
        c for c in ("impression_id", config.group_column) if c and c in spec.feature_config.passthrough
    ]
    truth = _read_truth(config.truth) if rank == 0 else None
    step = meta["step"]
    # A run resumed from a checkpoint taken within an epoch skips the batches that epoch already trained
    # on: the order of the batches depends only on the seed and the epoch, so they are the same batches.
    skip = meta.get("epoch_step", 0)
    stop = False
    for epoch in range(meta["epoch"], t.epochs):
        if t.ingest == "ray_data":
            shard = ray.train.get_dataset_shard("train")
        else:
            order_seed = t.seed * 1000 + epoch if t.shuffle_rows else None
            shard = ParquetShard(Path(config.features) / "train", rank, world, order_seed=order_seed)
        window_start, window_rows, losses = time.perf_counter(), 0, []
        epoch_step = 0
        batches = lockstep_batches(
            shard,
            t.batch_size,
            complete=False,
            max_steps=t.max_steps_per_epoch,
            shuffle_rows=t.shuffle_rows,
            seed=t.seed * 1000 + epoch,
        )
        for table, _ in batches:
            epoch_step += 1
            if epoch_step <= skip:
                window_start = time.perf_counter()
                continue
            batch = batch_from_arrow(table, sharded.layout).to(device)
            loss, (parts, _, stats) = sharded.dmp(batch)
            sharded.optimizer.zero_grad()
            loss.backward()
            sharded.optimizer.step()
            step += 1
            window_rows += table.num_rows * world
            losses.append({k: float(v) for k, v in parts.items()})
            if step % t.log_every_steps == 0:
                seconds = time.perf_counter() - window_start
                if tracker:
                    tracker.train_window(step, losses, window_rows / seconds, stats)
                window_start, window_rows, losses = time.perf_counter(), 0, []
            if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
                within = {**meta, "epoch": epoch, "step": step, "epoch_step": epoch_step}
                _report(sharded, within, {"step": step}, f"step{step:08d}")
        skip = 0
        valid = ParquetShard(Path(config.features) / "valid", rank, world)
        preds = predict_split(sharded, valid, config, key_columns)
        decision = [None]
        if rank == 0:
            metrics = split_metrics(preds, config, truth, "valid/")
            main = metrics.get(f"valid/{t.main_metric}", float("nan"))
            improved = meta["best"] is None or main > meta["best"]
            meta["best"] = main if improved else meta["best"]
            meta["best_epoch"] = epoch if improved else meta.get("best_epoch", epoch)
            meta["bad_epochs"] = 0 if improved else meta["bad_epochs"] + 1
            meta["history"].append({"epoch": epoch, "step": step, **metrics})
            tracker.epoch_end(epoch, step, metrics, preds)
            stop = bool(t.early_stopping_patience and meta["bad_epochs"] >= t.early_stopping_patience)
            decision = [{"meta": meta, "stop": stop}]
        dist.broadcast_object_list(decision, src=0)
        meta, stop = decision[0]["meta"], decision[0]["stop"]
        meta = {**meta, "epoch": epoch + 1, "step": step, "epoch_step": 0}
        # valid_main_metric is this epoch's (main_metric the best so far): a scheduler such as Ray Tune's
        # ASHA compares trials on it, epoch by epoch.
        latest = meta["history"][-1].get(f"valid/{t.main_metric}") if meta["history"] else None
        reported = {"epoch": epoch, "step": step, "main_metric": meta["best"], "valid_main_metric": latest}
        _report(sharded, meta, reported, f"epoch{epoch:03d}")
        if stop:
            break

    meta = _restore_best_epoch(sharded, meta, Path(loop_config["run_dir"]))
    test = ParquetShard(Path(config.features) / "test", rank, world)
    preds = predict_split(sharded, test, config, key_columns)
    model = gather_unsharded(sharded, config)
    if rank == 0:
        metrics = split_metrics(preds, config, truth, "test/")
        tracker.finish(model, metrics, preds, meta)


def _restore_best_epoch(sharded: ShardedModel, meta: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Loads the checkpoint of the epoch with the best main metric, if a later epoch was worse.

    Deep CTR models often overfit from their second epoch on; the test split, the package and the registry
    then all see the best epoch's weights. Every worker decides alike (``meta`` is broadcast each epoch).
    Returns ``meta`` with ``final_epoch``, the epoch whose weights the model now holds.
    """
    last = meta["epoch"] - 1
    best = meta.get("best_epoch", last)
    directory = run_dir / f"checkpoint_epoch{best:03d}"
    if best == last or not (directory / CHECKPOINT_FILE.format(rank=dist.get_rank())).exists():
        return {**meta, "final_epoch": last}
    load_checkpoint(sharded, directory)
    if dist.get_rank() == 0:
        print(f"restored the best epoch, {best} (main metric {meta['best']:.4f}), over the last, {last}")
    return {**meta, "final_epoch": best}


def _report(sharded: ShardedModel, meta: dict[str, Any], metrics: dict[str, Any], name: str) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(sharded, Path(tmp), meta)
        ray.train.report(
            {k: v for k, v in metrics.items() if v is not None},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_{name}",
        )


# ------------------------------------------------------------------------------------ the driver


INGEST_OBJECT_STORE_BYTES = 1 << 30  # Ray Data's read-ahead for training, all workers together


def _data_config() -> Any:
    """Ray Train's data config for the training split, in file order.

    Order is preserved, so that a run (and a resumed run) reads its data in the same order.
    """
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    # Ray Data reads ahead into the object store up to its own budget, a share of the whole store (GBs),
    # so the memory of training grew with the data set until the split was larger than that budget
    # (6.6 GiB RSS at 2M rows, 12.3 GiB at 20M). A fixed cap keeps it flat in the number of rows.
    limits = options.resource_limits
    cap = min(limits.object_store_memory or float("inf"), INGEST_OBJECT_STORE_BYTES)
    options.resource_limits = limits.copy(object_store_memory=cap)
    return DataConfig(execution_options=options)


@dataclass
class TrainResult:
    """What a training run produced (filled from rank 0's ``result.json``)."""

    run_name: str
    storage: Path
    summary: dict[str, Any]


def _latest_run(storage: Path) -> str:
    runs = (
        sorted((p for p in storage.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if storage.exists()
        else []
    )
    if not runs:
        raise ValueError(f"--resume: no earlier run under {storage}")
    return runs[-1].name


def _latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = sorted(run_dir.glob("checkpoint_*"), key=lambda p: p.stat().st_mtime)
    return checkpoints[-1] if checkpoints else None


def run_training(
    config: TrainConfig,
    *,
    tracking_uri: str | None = None,
    require_tracking: bool = False,
    resume: bool = False,
    callbacks: list[Any] | None = None,
    start_from: str | Path | None = None,
) -> TrainResult:
    """Trains with Ray Train: an embedded local Ray unless ``RAY_ADDRESS`` names a cluster.

    Args:
        config: the run's config.
        tracking_uri: MLflow tracking URI (default: a local SQLite store, ``mlflow.db``).
        require_tracking: fail if MLflow is unreachable (else training goes on without it, said once).
        resume: continue the latest run under ``run.storage_path`` (or ``run.name``) from its last checkpoint.
        callbacks: Ray Train callbacks of the run (e.g. Ray Tune's ``TuneReportCallback``, which passes each
            epoch's report on to a Tune trial; see :mod:`recsys.experiments.search`).
        start_from: a checkpoint folder of an earlier run (``<run>/checkpoint_*``, written with the same
            number of workers): a new run starts from its weights, optimizer state and place in the data
            (epoch, and batch within the epoch).

    Returns:
        The run's name, storage folder and summary (test metrics, registered version).
    """
    import ray
    import ray.data
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from recsys.tracking import default_tracking_uri

    if require_tracking:
        from recsys.tracking import Tracker

        # Fail here, in seconds, rather than in a worker that Ray Train would restart max_failures times.
        Tracker(tracking_uri or default_tracking_uri(), config.run.experiment, require=True)
    # Workers run in their own working directories: relative paths are resolved here, once.
    config = config.replace(
        features=str(Path(config.features).resolve()),
        truth=str(Path(config.truth).resolve()) if config.truth else "",
    )
    features = Path(config.features)
    for split in ("spec.json", *SPLIT_DIRS):
        if not (features / split).exists():
            raise FileNotFoundError(
                f"features: {features / split} not found; build the features first "
                "(python -m pipelines.features build ...)"
            )
    storage = Path(config.run.storage_path).resolve()
    if resume:
        name = config.run.name or _latest_run(storage)
    else:
        name = config.run.name or f"{config.run.model_name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    run_dir = storage / name
    # Ray Train restores a run from the latest checkpoint under its storage path and name by itself;
    # --resume only picks that name (the latest run's), and checks there is something to resume.
    if resume and _latest_checkpoint(run_dir) is None:
        raise ValueError(f"--resume: run {name} has no checkpoint under {run_dir}")
    if start_from is not None:
        if resume:
            raise ValueError(
                "start_from: a new run starts from a checkpoint; --resume continues the last run"
            )
        start_from = Path(start_from).resolve()
        for rank in range(config.run.num_workers):
            if not (start_from / CHECKPOINT_FILE.format(rank=rank)).exists():
                raise FileNotFoundError(
                    f"start_from: {start_from / CHECKPOINT_FILE.format(rank=rank)} not found; a checkpoint "
                    f"folder of a run with run.num_workers = {config.run.num_workers} is needed"
                )

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # Embedded local cluster: the workers take their CPUs, so the cluster advertises two more logical
        # CPUs than that for Ray Data's read tasks (ingest: ray_data); with none left, reading would wait
        # forever.
        num_cpus = (
            None
            if address
            else max(os.cpu_count() or 1, config.run.num_workers * config.run.cpus_per_worker) + 2
        )
        if not address:
            embedded_ray_env()  # workers at the normal priority, not nice 15
        # The dashboard (on 127.0.0.1 only) serves the State API, which Ray Train's PlacementGroupCleaner
        # polls; without it the cleaner logged "Failed to query Ray Train Controller actor state" every
        # few seconds of every run (it also frees the CPUs of runs stopped early: see recsys.experiments.search).
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one bar per batch floods the logs
    # Ray 2.60's Parquet datasource V2 (ListFiles -> ReadFilesParquetV2) took 4.5-5 s to read a 10k-row
    # file on a warm local Ray here, V1 0.23 s: a fixed cost per execution, i.e. per epoch.
    context.use_datasource_v2 = False
    # The evaluation splits, and with ``parquet`` ingest the training split, are read by the workers
    # themselves (ParquetShard).
    ray_data = config.training.ingest == "ray_data"
    datasets = {"train": ray.data.read_parquet(str((features / "train").resolve()))} if ray_data else None
    loop_config = {
        "config": config.to_dict(),
        "tracking_uri": tracking_uri or default_tracking_uri(),
        "require_tracking": require_tracking,
        "run_dir": str(run_dir),
        "start_from": str(start_from) if start_from else "",
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if config.run.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=config.run.num_workers,
            use_gpu=config.run.use_gpu,
            resources_per_worker={"CPU": config.run.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": model_process_env()},
        ),
        datasets=datasets,
        dataset_config=_data_config() if ray_data else None,
    )
    trainer.fit()
    summary_path = run_dir / "result.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return TrainResult(name, run_dir, summary)
