"""Checkpoints of a sharded model, the best epoch's weights, and the unsharded model gathered for packaging.

Every worker writes its own shard of the model and optimizer state (``rank{r}.pt``) into the folder that
Ray Train merges into one checkpoint; a restarted worker reads its own file back. A checkpoint holds
ShardedTensors, so it can only be read by the same number of workers.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from features.console import story
from recsys.losses import RankingTrain
from recsys.model import RankingModel, build_model
from recsys.train.config import TrainConfig
from recsys.train.sharding import ShardedModel, task_balancer
from recsys.train.state import TrainingState

CHECKPOINT_FILE = "rank{rank}.pt"


def checkpoint_file(directory: Path, rank: int | None = None) -> Path:
    """The file of ``rank`` (default: this worker's) in a checkpoint folder."""
    return Path(directory) / CHECKPOINT_FILE.format(rank=dist.get_rank() if rank is None else rank)


def save_checkpoint(sharded: ShardedModel, directory: Path, state: TrainingState) -> None:
    """Writes this worker's shard of the model and optimizer state (Ray merges all workers' files)."""
    payload = {
        "model": sharded.dmp.state_dict(),
        "optimizer": sharded.optimizer.state_dict(),
        "state": state.to_dict(),
    }
    torch.save(payload, checkpoint_file(directory))


def load_checkpoint(sharded: ShardedModel, directory: Path) -> TrainingState:
    """Restores this worker's shard; returns the run's state at the checkpoint."""
    # The checkpoint holds ShardedTensors written by this project's own workers, not a downloaded model:
    # full unpickling is needed for them (the registered model, in contrast, loads with weights_only).
    payload = torch.load(checkpoint_file(directory), weights_only=False)
    sharded.dmp.load_state_dict(payload["model"])
    # Adam creates its state at the first step; TorchRec's keyed optimizers load only into existing state.
    sharded.dense_optimizer.init_state()
    sharded.optimizer.load_state_dict(payload["optimizer"])
    return TrainingState.from_dict(payload.get("state") or payload["meta"])  # "meta": older checkpoints


def restore_best_epoch(sharded: ShardedModel, state: TrainingState, run_dir: Path) -> TrainingState:
    """Loads the checkpoint of the epoch with the best main metric, if a later epoch was worse.

    Deep CTR models often overfit from their second epoch on; the test split, the package and the registry
    then all see the best epoch's weights. Every worker decides alike (the state is broadcast each epoch).
    Returns the state with ``final_epoch``, the epoch whose weights the model now holds.
    """
    last = state.epoch - 1
    best = last if state.best_epoch is None else state.best_epoch
    directory = run_dir / f"checkpoint_epoch{best:03d}"
    if best == last or not checkpoint_file(directory).exists():
        return replace(state, final_epoch=last)
    load_checkpoint(sharded, directory)
    if dist.get_rank() == 0:
        story(
            f"restored the best epoch, {best + 1} (main metric {state.best:.4f}), over the last, {last + 1}"
        )
    return replace(state, final_epoch=best)


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
    wrapper = RankingTrain.from_config(model, config.model, task_balancer(config))
    wrapper.load_state_dict(full)
    return model.eval()
