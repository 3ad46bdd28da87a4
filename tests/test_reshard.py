"""Checkpoints independent of the number of workers and the sharding plan (issue 21).

One gloo process group per phase: 2 workers table-wise train and checkpoint; 1 worker column-wise loads
that checkpoint and checkpoints again; then 2 workers table-wise, then 3 column-wise (2 -> 1 -> 2 -> 3
workers, table-wise <-> column-wise at each step). The tables, the row-wise Adagrad state and the dense
state must come back exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recsys.train.checkpoints import _SHARDS, _resized, checkpoint_files, read_checkpoint_file

PHASES = (  # (workers, sharding, train steps, epoch_step saved)
    (2, "table_wise", 3, 4),
    (1, "column_wise", 0, None),
    (2, "table_wise", 0, None),
    (3, "column_wise", 0, None),
)
MODEL = {
    "tasks": [{"name": "click"}, {"name": "purchase", "given": "click"}],
    "embedding": {"dim": 4},
    "arch": {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]},
}


def _phase(root: Path, index: int, rank: int) -> None:
    from recsys.train.checkpoints import load_checkpoint, save_checkpoint
    from recsys.train.config import TrainConfig
    from recsys.train.sharding import plan_ranks, reinit_tables, shard_model
    from recsys.train.state import TrainingState
    from tests.test_model_model import LAYOUT, tiny_batch

    world, sharding, steps, epoch_step = PHASES[index]
    dist.init_process_group("gloo", init_method=f"file://{root}/store{index}", rank=rank, world_size=world)
    try:
        training = {"sharding": sharding, "embedding_optimizer": "rowwise_adagrad", "embedding_lr": 0.1}
        config = TrainConfig.from_dict({"features": str(root), "model": MODEL, "training": training})
        sharded = shard_model(config, LAYOUT, torch.device("cpu"))
        if index == 0:
            for _ in range(steps):
                loss, _ = sharded.dmp(tiny_batch())
                loss.backward()
                sharded.optimizer.step()
                sharded.optimizer.zero_grad()
            state = TrainingState(epoch=1, step=steps, epoch_step=epoch_step, data_shards=world)
        else:
            state = load_checkpoint(sharded, root / f"phase{index - 1}")
        (root / f"phase{index}").mkdir(exist_ok=True)
        save_checkpoint(sharded, root / f"phase{index}", state)
        sharded.dmp.eval()
        with torch.no_grad():  # every worker scores the same rows: the model as a whole answers
            _, (_, predictions, _) = sharded.dmp(tiny_batch())
        if rank == 0:
            info = {"place": [state.epoch_step, state.data_shards], "plan": plan_ranks(sharded.plan)}
            info["predictions"] = {k: v.tolist() for k, v in predictions.items()}
            (root / f"phase{index}.json").write_text(json.dumps(info))
        reinit_tables(sharded, seed=7)  # embedding_reinit's draw: the same tables whatever the plan
        (root / f"reinit{index}").mkdir(exist_ok=True)
        save_checkpoint(sharded, root / f"reinit{index}", state)
    finally:
        dist.destroy_process_group()


def _process(rank: int, root: str, index: int) -> None:
    _phase(Path(root), index, rank)


def _assembled(directory: Path) -> dict[str, torch.Tensor]:
    """Every entry of a checkpoint as one whole tensor: sharded ones put together from all rank files."""
    whole: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and _SHARDS in value:
            full = whole.setdefault(prefix, torch.full(value["size"], float("nan")))
            for piece in value[_SHARDS]:
                index = tuple(slice(o, o + n) for o, n in zip(piece["offsets"], piece["sizes"], strict=True))
                full[index] = piece["tensor"]
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, torch.Tensor) and prefix not in whole:
            whole[prefix] = value.clone()

    for path in checkpoint_files(directory):
        payload = read_checkpoint_file(path)
        walk("model", payload["model"])
        walk("optimizer", payload["optimizer"])
    return whole


@pytest.mark.slow
def test_a_checkpoint_resumes_on_other_worker_counts_and_plans_exactly(tmp_path):
    # Fresh processes per phase, as Ray Train starts them: TorchRec validates a process group's
    # collectives once per process, so a process reused across phases would wait for the others forever.
    for index, (world, *_) in enumerate(PHASES):
        mp.start_processes(_process, args=(str(tmp_path), index), nprocs=world, start_method="spawn")
    phases = [_assembled(tmp_path / f"phase{i}") for i in range(len(PHASES))]
    first = phases[0]
    momentum = [k for k in first if k.endswith("momentum1")]
    assert len(momentum) == 2 and all(first[k].abs().sum() > 0 for k in momentum)  # trained: state to carry
    for later in phases[1:]:
        assert later.keys() == first.keys()
        for key in first:
            assert not first[key].isnan().any(), key  # the shards of every worker were in the files
            torch.testing.assert_close(later[key], first[key], rtol=0, atol=0, msg=key)
    info = [json.loads((tmp_path / f"phase{i}.json").read_text()) for i in range(len(PHASES))]
    assert ":[1]" in info[0]["plan"] and ":[1]" not in info[1]["plan"]  # tables moved between workers
    # The place in the epoch: 4 global batches of the 2 workers the run started with, on any number.
    assert [i["place"] for i in info] == [[4, 2]] * 4
    assert all(i["predictions"] == info[0]["predictions"] for i in info)
    assert [len(checkpoint_files(tmp_path / f"phase{i}")) for i in range(len(PHASES))] == [2, 1, 2, 3]
    drawn = [_assembled(tmp_path / f"reinit{i}") for i in range(len(PHASES))]
    tables = [k for k in drawn[0] if k.startswith("model/") and "embedding_bags" in k]
    assert len(tables) == 2 and all(not torch.equal(drawn[0][k], first[k]) for k in tables)
    for later in drawn[1:]:
        assert all(torch.equal(later[k], drawn[0][k]) for k in tables)


def test_row_wise_state_of_column_shards_becomes_the_tables_mean_and_back():
    rows = 3
    two_shards = [
        {"offsets": [0], "sizes": [rows], "tensor": torch.tensor([1.0, 2.0, 3.0])},
        {"offsets": [rows], "sizes": [rows], "tensor": torch.tensor([3.0, 4.0, 5.0])},
    ]
    (whole,) = _resized(two_shards, [2 * rows], [rows], rows, "t")
    torch.testing.assert_close(whole["tensor"], torch.tensor([2.0, 3.0, 4.0]))
    (four,) = _resized([whole], [rows], [4 * rows], rows, "t")
    torch.testing.assert_close(four["tensor"], torch.tensor([2.0, 3.0, 4.0]).repeat(4))
    with pytest.raises(ValueError, match="saved with size \\[7\\], the model has \\[3\\]"):
        _resized(two_shards, [7], [rows], rows, "t")


GLOBAL_BATCH = {  # 6 rows, written out by hand: the global batch of 2 workers of 3 rows each
    "item": [3, 0, 5, 1, 2, 4],
    "user": [1, 2, 0, 3, 1, 2],
    "hist": [[1, 2], [], [5, 4, 3], [0], [2], []],
    "price_z": [0.5, -1.0, 2.0, 0.1, -0.3, 1.1],
    "clicks_7d": [0.0, 1.5, 3.0, 0.2, 0.9, 0.0],
    "click": [1.0, 0.0, 1.0, 0.0, 1.0, 0.0],
    "purchase": [0.0, 0.0, 1.0, 0.0, 1.0, 0.0],
    "dwell": [0.3, 0.0, 1.2, 0.0, 0.7, 0.0],
}
STEP_WORLDS = ((2, "table_wise"), (1, "column_wise"), (4, "column_wise"))  # 4: parts of 1, 2, 1, 2 rows


def _global_step(rank: int, root: str, index: int) -> None:
    """Loads the untrained checkpoint of 2 workers and trains one step of the global batch on ``world``."""
    from recsys.data.shard import ParquetShard
    from recsys.train.checkpoints import load_checkpoint, save_checkpoint
    from recsys.train.config import TrainConfig
    from recsys.train.sharding import shard_model
    from recsys.train.state import TrainingState
    from recsys.train.worker import _loss_scale, train_step
    from tests.test_model_model import LAYOUT

    world, sharding = STEP_WORLDS[index]
    root_path = Path(root)
    dist.init_process_group(
        "gloo", init_method=f"file://{root}/step-store{index}", rank=rank, world_size=world
    )
    try:
        training = {"sharding": sharding, "embedding_optimizer": "rowwise_adagrad", "embedding_lr": 0.1,
                    "batch_size": 3, "precision": "fp32"}  # fmt: skip
        config = TrainConfig.from_dict({"features": root, "model": MODEL, "training": training})
        sharded = shard_model(config, LAYOUT, torch.device("cpu"))
        if index == 0:
            sharded.dense_optimizer.init_state()  # Adam's state, as loading a checkpoint creates it
            (root_path / "init").mkdir(exist_ok=True)
            save_checkpoint(sharded, root_path / "init", TrainingState(data_shards=2))
            dist.barrier()
        state = load_checkpoint(sharded, root_path / "init")
        shard = ParquetShard(root_path / "data", rank, world, shards=state.data_shards)
        (part,) = list(shard.iter_rows(3, drop_last=True))  # this worker's part of the one global batch
        rows = part.table()
        train_step(sharded, rows, _loss_scale(shard, 3))  # parts of 1 and 2 rows weighed alike
        (root_path / f"rows{index}-{rank}.json").write_text(json.dumps(rows.column("item").to_pylist()))
        (root_path / f"step{index}").mkdir(exist_ok=True)
        save_checkpoint(sharded, root_path / f"step{index}", state)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_step_of_the_global_batch_trains_the_same_model_on_any_number_of_workers(tmp_path):
    """2 workers of 3 rows each, 1 worker of 6 rows, 4 workers of 1-2 rows: the same tables, Adagrad state,
    dense layers and Adam state after the step."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    columns = {
        k: pa.array(v, pa.large_list(pa.int64()) if k == "hist" else None) for k, v in GLOBAL_BATCH.items()
    }
    pq.write_table(pa.table(columns), tmp_path / "data" / "part-0.parquet")
    for index, (world, _) in enumerate(STEP_WORLDS):
        mp.start_processes(_global_step, args=(str(tmp_path), index), nprocs=world, start_method="spawn")
    for index, (world, _) in enumerate(STEP_WORLDS):  # the workers' parts make the global batch, in order
        parts = [json.loads((tmp_path / f"rows{index}-{r}.json").read_text()) for r in range(world)]
        assert [i for p in parts for i in p] == GLOBAL_BATCH["item"] and all(parts)
    init, *steps = (_assembled(tmp_path / name) for name in ("init", "step0", "step1", "step2"))
    moved = [k for k in init if not torch.equal(steps[0][k], init[k])]
    assert any("embedding_bags" in k for k in moved) and any("momentum1" in k for k in moved)
    assert any(k.startswith("model/") and "embedding" not in k for k in moved)  # the dense layers too
    for other in steps[1:]:
        assert other.keys() == steps[0].keys()
        for key in steps[0]:
            torch.testing.assert_close(other[key], steps[0][key], rtol=1e-5, atol=1e-7, msg=key)
