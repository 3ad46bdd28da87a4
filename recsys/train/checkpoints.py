"""Checkpoints of a sharded model, the best epoch's weights, and the unsharded model gathered for packaging.

Every worker writes its own shard of the model and optimizer state (``rank{r}.pt``) into the folder that
Ray Train merges into one checkpoint; a restarted worker reads its own file back, with the number of workers
and the sharding plan it was written with.

A checkpoint file holds plain data only: each ShardedTensor of the state dicts is written as its local
shards (offsets, sizes and a plain tensor each), so that files load with ``torch.load(weights_only=True)``
and a crafted file cannot run code. Loading copies the shards into the model's own ShardedTensors.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from features.console import story
from recsys.losses import RankingTrain
from recsys.model import RankingModel, build_model
from recsys.train.config import TrainConfig
from recsys.train.sharding import ShardedModel, task_balancer
from recsys.train.state import TrainingState

CHECKPOINT_FILE = "rank{rank}.pt"
CHECKPOINT_FORMAT = 2  # 1: pickled ShardedTensors (weights_only=False), refused since
_SHARDS = "__shards__"  # the key that marks a ShardedTensor written as its local shards


def checkpoint_file(directory: Path, rank: int | None = None) -> Path:
    """The file of ``rank`` (default: this worker's) in a checkpoint folder."""
    return Path(directory) / CHECKPOINT_FILE.format(rank=dist.get_rank() if rank is None else rank)


def save_checkpoint(sharded: ShardedModel, directory: Path, state: TrainingState) -> None:
    """Writes this worker's shard of the model and optimizer state (Ray merges all workers' files)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": _plain(sharded.dmp.state_dict()),
        "optimizer": _plain(sharded.optimizer.state_dict()),
        "state": state.to_dict(),
    }
    torch.save(payload, checkpoint_file(directory))


def load_checkpoint(sharded: ShardedModel, directory: Path) -> TrainingState:
    """Restores this worker's shard; returns the run's state at the checkpoint.

    Raises:
        ValueError: the file is not a checkpoint of this format, or holds code or objects beyond plain
            tensors and numbers (``weights_only`` refuses them), or was written with another sharding plan.
    """
    path = checkpoint_file(directory)
    payload = read_checkpoint_file(path)
    model = sharded.dmp.state_dict()
    _fill(model, payload["model"], f"{path}: model")
    sharded.dmp.load_state_dict(model)
    # Adam creates its state at the first step; TorchRec's keyed optimizers load only into existing state.
    sharded.dense_optimizer.init_state()
    optimizer = sharded.optimizer.state_dict()
    _fill(optimizer, payload["optimizer"], f"{path}: optimizer")
    sharded.optimizer.load_state_dict(optimizer)
    return TrainingState.from_dict(payload["state"])


def read_checkpoint_file(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """One worker's checkpoint file, loaded with ``weights_only=True`` (``mmap``: without reading the data).

    Raises:
        ValueError: the file holds more than tensors and plain data (never unpickled), or is not a
            checkpoint of this format; the message names the file.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # UnpicklingError and the like: a file of other content
        first = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise ValueError(
            f"checkpoint {path}: not a checkpoint of this version; only tensors and plain data are loaded, "
            f"nothing is unpickled ({first})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format", 1) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"checkpoint {path}: format {found}, expected {CHECKPOINT_FORMAT}; start a new run "
            "(checkpoints of format 1 held pickled objects and are no longer read)"
        )
    return payload


def _plain(value: Any) -> Any:
    """``value`` with every ShardedTensor replaced by its local shards as plain data (nested containers)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        shards = [
            {
                "offsets": list(s.metadata.shard_offsets),
                "sizes": list(s.metadata.shard_sizes),
                "tensor": s.tensor.detach().cpu(),
            }
            for s in value.local_shards()
        ]
        return {_SHARDS: shards, "size": list(value.size())}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _fill(template: dict[str, Any], saved: dict[str, Any], where: str) -> None:
    """Puts ``saved`` (from :func:`_plain`) into ``template``, a live state dict: shards copied in place."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    for key, value in template.items():
        if key not in saved:
            raise ValueError(f"checkpoint {where}: no entry {key!r}; it was written for another model")
        if isinstance(value, ShardedTensor):
            _fill_shards(value, saved[key], f"{where}: {key}")
        elif isinstance(value, dict) and isinstance(saved[key], dict) and _SHARDS not in saved[key]:
            _fill(value, saved[key], f"{where}: {key}")
        else:
            template[key] = saved[key]


def _fill_shards(value: Any, saved: Any, where: str) -> None:
    """Copies the saved local shards into ShardedTensor ``value``'s own (the same plan's offsets)."""
    if not isinstance(saved, dict) or _SHARDS not in saved:
        raise ValueError(f"checkpoint {where}: expected a sharded table, found {type(saved).__name__}")
    by_offsets = {tuple(s["offsets"]): s for s in saved[_SHARDS]}
    for shard in value.local_shards():
        offsets = tuple(shard.metadata.shard_offsets)
        entry = by_offsets.get(offsets)
        if entry is None or list(entry["sizes"]) != list(shard.metadata.shard_sizes):
            raise ValueError(
                f"checkpoint {where}: no shard at offsets {list(offsets)} of sizes "
                f"{list(shard.metadata.shard_sizes)}; it was written with another number of workers or "
                "sharding plan"
            )
        with torch.no_grad():
            shard.tensor.copy_(entry["tensor"])


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
