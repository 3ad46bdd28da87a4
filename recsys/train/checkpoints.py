"""Checkpoints of a sharded model, the best epoch's weights, and the unsharded model gathered for packaging.

Every worker writes its own shard of the model and optimizer state (``rank{r}.pt``) into the folder that
Ray Train merges into one checkpoint. Ray Train prunes old checkpoints (``run.checkpoints_to_keep``); the
shards of the best epoch so far are kept apart in ``<run>/best/epoch<N>`` (:func:`keep_best_epoch`), where
:func:`restore_best_epoch` reads them.

A checkpoint file holds plain data only: each ShardedTensor of the state dicts is written as its local
shards (offsets, sizes and a plain tensor each), so that files load with ``torch.load(weights_only=True)``
and a crafted file cannot run code.

The checkpoint does not depend on the number of workers nor on the sharding plan: a worker reads every
rank's file (memory-mapped) and fills each of its own shards from the saved shards that overlap it, so a
run resumes on another number of workers (2 -> 1, 1 -> 3) or plan (table-wise <-> column-wise). Tables are
``[rows, dim]`` in every plan; the fused row-wise optimizer's state is one number per row and column shard
(``[rows * shards]``), converted when the number of column shards changes (the mean over the shards: exact
for row-wise Adagrad, whose state is the mean of the squared gradients over a shard's columns; a table
split into more shards gives each the table's value). Dense parameters and their optimizer state are the
same on every worker (DDP) and are read from one file. The place in the data is the number of the epoch's
global batches trained, which are the same on any number of workers (``TrainingState.data_shards``).
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
BEST_DIR = "best"  # the run's folder of the best epoch's shards, kept apart from pruned checkpoints
CHECKPOINT_FORMAT = 2  # 1: pickled ShardedTensors (weights_only=False), refused since
_SHARDS = "__shards__"  # the key that marks a ShardedTensor written as its local shards


def checkpoint_file(directory: Path, rank: int | None = None) -> Path:
    """The file of ``rank`` (default: this worker's) in a checkpoint folder."""
    return Path(directory) / CHECKPOINT_FILE.format(rank=dist.get_rank() if rank is None else rank)


def save_checkpoint(sharded: ShardedModel, directory: Path, state: TrainingState) -> None:
    """Writes this worker's shard of the model and optimizer state (Ray merges all workers' files)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "world_size": dist.get_world_size(),
        "model": _plain(sharded.dmp.state_dict()),
        "optimizer": _plain(sharded.optimizer.state_dict()),
        "state": state.to_dict(),
    }
    torch.save(payload, checkpoint_file(directory))


def load_checkpoint(sharded: ShardedModel, directory: Path) -> TrainingState:
    """Restores this worker's shares of the model and optimizer state from every rank's file.

    Returns the run's state at the checkpoint.

    Raises:
        ValueError: a file is not a checkpoint of this format, or holds code or objects beyond plain
            tensors and numbers (``weights_only`` refuses them), or the checkpoint lacks a part of a table
            (a missing rank file, another model).
        FileNotFoundError: the folder holds no rank file.
    """
    files = checkpoint_files(directory)
    payloads = [read_checkpoint_file(path, mmap=True) for path in files]
    rank = dist.get_rank()
    own = rank if rank < len(payloads) else 0  # dense state is the same in every file
    order = [own, *(i for i in range(len(payloads)) if i != own)]
    where = f"checkpoint {directory}"
    model = sharded.dmp.state_dict()
    rows = _table_rows(model)
    _fill(model, [payloads[i]["model"] for i in order], f"{where}: model", rows)
    sharded.dmp.load_state_dict(model)
    # Adam creates its state at the first step; TorchRec's keyed optimizers load only into existing state.
    sharded.dense_optimizer.init_state()
    optimizer = sharded.optimizer.state_dict()
    _fill(optimizer, [payloads[i]["optimizer"] for i in order], f"{where}: optimizer", rows)
    sharded.optimizer.load_state_dict(optimizer)
    state = TrainingState.from_dict(payloads[own]["state"])
    if not state.data_shards:  # a checkpoint of before data shards: its workers' batches
        state = replace(state, data_shards=int(payloads[0].get("world_size", len(payloads))))
    return state


def checkpoint_files(directory: Path) -> list[Path]:
    """The rank files of a checkpoint folder, ``rank0.pt`` ... ``rank{W-1}.pt`` of the run that wrote it.

    Raises:
        FileNotFoundError: no ``rank0.pt``.
        ValueError: a rank file is missing (the folder is incomplete: the checkpoint of a failed write).
    """
    directory = Path(directory)
    first = checkpoint_file(directory, 0)
    if not first.exists():
        raise FileNotFoundError(f"checkpoint {directory}: no {first.name}; not a checkpoint folder")
    world = int(read_checkpoint_file(first, mmap=True).get("world_size", 0)) or len(
        list(directory.glob(CHECKPOINT_FILE.format(rank="*")))
    )
    files = [checkpoint_file(directory, r) for r in range(world)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ValueError(
            f"checkpoint {directory}: written by {world} workers, but {missing} missing; it is incomplete"
        )
    return files


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


def _fill(template: dict[str, Any], saved: list[dict[str, Any]], where: str, rows: dict[str, int]) -> None:
    """Puts the saved states (from :func:`_plain`, one per rank file) into ``template``, a live state dict.

    A ShardedTensor is filled from the shards of every file; anything else is taken from the first file
    that has it (``saved`` lists this worker's own file first).
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    for key, value in template.items():
        found = [s[key] for s in saved if isinstance(s, dict) and key in s]
        if not found:
            raise ValueError(f"{where}: no entry {key!r}; it was written for another model")
        if isinstance(value, ShardedTensor):
            _fill_shards(value, found, f"{where}: {key}", rows.get(str(key).split(".")[0]))
        elif isinstance(value, dict) and isinstance(found[0], dict) and _SHARDS not in found[0]:
            _fill(value, found, f"{where}: {key}", rows)
        else:
            template[key] = found[0]


def _fill_shards(value: Any, saved: list[Any], where: str, table_rows: int | None) -> None:
    """Fills ShardedTensor ``value``'s local shards from the saved shards (any plan) that overlap them."""
    if not all(isinstance(s, dict) and _SHARDS in s for s in saved):
        raise ValueError(f"{where}: expected a sharded table, found {type(saved[0]).__name__}")
    pieces = [p for s in saved for p in s[_SHARDS]]
    size = list(value.size())
    if list(saved[0]["size"]) != size:
        pieces = _resized(pieces, list(saved[0]["size"]), size, table_rows, where)
    for shard in value.local_shards():
        offsets, sizes = list(shard.metadata.shard_offsets), list(shard.metadata.shard_sizes)
        covered = 0
        with torch.no_grad():
            for piece in pieces:
                lo = [max(a, b) for a, b in zip(offsets, piece["offsets"], strict=True)]
                hi = [
                    min(a + n, b + m)
                    for a, n, b, m in zip(offsets, sizes, piece["offsets"], piece["sizes"], strict=True)
                ]
                if any(h <= low for low, h in zip(lo, hi, strict=True)):
                    continue
                target = shard.tensor[_box(lo, hi, offsets)]
                target.copy_(piece["tensor"][_box(lo, hi, piece["offsets"])])
                covered += target.numel()
        if covered != shard.tensor.numel():
            raise ValueError(
                f"{where}: the saved shards cover {covered} of the {shard.tensor.numel()} values at offsets "
                f"{offsets} (sizes {sizes}); a rank file of the checkpoint is missing or of another model"
            )


def _box(lo: list[int], hi: list[int], origin: list[int]) -> tuple[slice, ...]:
    """The index of the global box ``[lo, hi)`` in a tensor whose first element is at ``origin``."""
    return tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin, strict=True))


def _resized(
    pieces: list[dict[str, Any]], saved: list[int], size: list[int], rows: int | None, where: str
) -> list:
    """The row-wise optimizer state of ``saved`` column shards as one piece of ``size`` (other shards).

    Row-wise state is ``[rows * shards]``, shard ``i`` at ``i * rows``; the saved shards' mean per row is
    the table's state, given to each of the new shards.
    """
    if len(saved) != 1 or len(size) != 1 or not rows or saved[0] % rows or size[0] % rows:
        raise ValueError(f"{where}: saved with size {saved}, the model has {size}; it is another model")
    full = torch.zeros(saved[0], dtype=pieces[0]["tensor"].dtype)
    for piece in pieces:
        full[piece["offsets"][0] : piece["offsets"][0] + piece["sizes"][0]] = piece["tensor"]
    per_row = full.view(saved[0] // rows, rows).mean(dim=0)
    return [{"offsets": [0], "sizes": size, "tensor": per_row.repeat(size[0] // rows)}]


def _table_rows(model_state: dict[str, Any]) -> dict[str, int]:
    """Rows of each sharded table by name (``t_item``), from the model's ``...<table>.weight`` entries."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return {
        key.split(".")[-2]: value.size(0)
        for key, value in model_state.items()
        if isinstance(value, ShardedTensor) and key.endswith(".weight") and len(value.size()) == 2
    }


def keep_best_epoch(directory: Path, run_dir: Path, epoch: int) -> None:
    """Keeps this worker's file of a new best epoch in ``<run>/best/epoch<N>`` (every worker calls it).

    A hard link to the file just written where the file system allows one (else a copy); the earlier best
    epoch's folder is removed once every worker's file is in place.
    """
    import os
    import shutil

    best = Path(run_dir) / BEST_DIR
    target = best / f"epoch{epoch:03d}"
    if dist.get_rank() == 0:
        shutil.rmtree(target, ignore_errors=True)  # a restarted run's earlier attempt, maybe more workers
        target.mkdir(parents=True)
    dist.barrier()
    source, kept = checkpoint_file(directory), checkpoint_file(target)
    try:
        os.link(source, kept)
    except OSError:
        shutil.copyfile(source, kept)
    dist.barrier()
    if dist.get_rank() == 0:
        for old in best.iterdir():
            if old != target:
                shutil.rmtree(old, ignore_errors=True)


def restore_best_epoch(sharded: ShardedModel, state: TrainingState, run_dir: Path) -> TrainingState:
    """Loads the shards of the epoch with the best main metric, if a later epoch was worse.

    Deep CTR models often overfit from their second epoch on; the test split, the package and the registry
    then all see the best epoch's weights. Every worker decides alike (the state is broadcast each epoch).
    Returns the state with ``final_epoch``, the epoch whose weights the model now holds.
    """
    last = state.epoch - 1
    best = last if state.best_epoch is None else state.best_epoch
    if best == last:
        return replace(state, final_epoch=last)
    directory = run_dir / BEST_DIR / f"epoch{best:03d}"
    if not checkpoint_file(directory, 0).exists():  # started from another run's checkpoint: not here
        if dist.get_rank() == 0:
            story(
                f"the best epoch, {best + 1}, was trained in another run: the last epoch's weights are kept"
            )
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
