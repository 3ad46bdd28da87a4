"""Fast checks of the training layer's pieces (the end-to-end runs are in test_train.py)."""

from __future__ import annotations

import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys.data.batch import FeatureLayout, SparseFeature, batch_from_arrow
from recsys.data.shard import ParquetShard, pad, padding_row, read_ahead
from recsys.modules.embedding import SparseArch, embedding_bag_collection
from recsys.train.config import TrainConfig

LAYOUT = FeatureLayout(
    sparse=(SparseFeature("a", 5), SparseFeature("b", 7), SparseFeature("c", 3)),
    dense=("x",),
    labels=("click",),
)


class ReversedKeys(torch.nn.Module):
    """A real collection whose output keys come in another order, as a sharded collection's do."""

    def __init__(self, ebc: torch.nn.Module) -> None:
        super().__init__()
        self.ebc = ebc

    def embedding_bag_configs(self):
        return self.ebc.embedding_bag_configs()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        kt = self.ebc(features)
        keys = list(reversed(kt.keys()))
        return KeyedTensor.from_tensor_list(keys, [kt[k] for k in keys])


def test_sparse_arch_orders_features_by_the_output_keys_not_by_position():
    torch.manual_seed(0)
    ebc = embedding_bag_collection(LAYOUT, dim=4)
    kjt = KeyedJaggedTensor(
        keys=["a", "b", "c"],
        values=torch.tensor([1, 2, 6, 3, 0, 2]),
        lengths=torch.tensor([1, 1, 1, 1, 1, 1]),
    )
    plain = SparseArch(ebc, LAYOUT.keys)(kjt)
    reordered = SparseArch(ReversedKeys(ebc), LAYOUT.keys)(kjt)
    torch.testing.assert_close(reordered, plain)
    assert plain.shape == (2, 3, 4)


def test_padding_rows_make_a_valid_batch():
    padding = pad(padding_row(LAYOUT, ["impression_id"]), 4)
    batch = batch_from_arrow(padding, LAYOUT)
    assert batch.dense.shape == (4, 1) and batch.sparse.lengths().tolist() == [1] * 12
    table = pa.table(
        {
            "a": [1, 2],
            "b": [3, 4],
            "c": [0, 1],
            "x": pa.array([0.5, 1.0], pa.float32()),
            "click": pa.array([1.0, 0.0], pa.float32()),
        }
    )
    padded = pad(table, 5)
    assert padded.num_rows == 5 and padded.column("a").to_pylist() == [1, 2, 1, 1, 1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"training": {"epochs": 0}}, r"training\.epochs: expected an integer >= 1, got 0"),
        ({"training": {"sharding": "diagonal"}}, r"training\.sharding: .* got 'diagonal'"),
        ({"training": {"main_metric": "dwell/auc"}}, r"training\.main_metric: expected a task of"),
        ({"training": {"ingest": "kafka"}}, r"training\.ingest: expected one of .* got 'kafka'"),
        (
            {"training": {"calibration": "isotonic"}},
            r"training\.calibration: expected one of .* got 'isotonic'",
        ),
        ({"run": {"num_workers": 0}}, r"run\.num_workers: expected an integer >= 1, got 0"),
        ({"run": {"colour": 1}}, r"run: unknown field\(s\) \['colour'\]"),
    ],
)
def test_train_config_errors_name_the_field_and_value(change, message):
    base = {"features": "f", "model": "ecommerce_mmoe"}
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({**base, **change})


def test_shipped_train_configs_load():
    from recsys.train.config import builtin_train_config

    for name in ("train_demo", "train_census", "train_census_shared_bottom"):
        config = TrainConfig.from_yaml(builtin_train_config(name))
        assert config.run.num_workers == 2


def test_model_process_env_keeps_the_users_tunables():
    from recsys.runtime import MALLOC_TUNABLES, model_process_env

    assert model_process_env({})["GLIBC_TUNABLES"] == MALLOC_TUNABLES
    mine = "glibc.malloc.trim_threshold=5:glibc.malloc.arena_max=2"
    merged = model_process_env({"GLIBC_TUNABLES": mine})["GLIBC_TUNABLES"].split(":")
    # the user's trim threshold wins, ours fills in the mmap threshold, nothing is dropped
    assert merged == ["glibc.malloc.mmap_threshold=33554432", *mine.split(":")]


_NICENESS_PROBE = """
import os, ray
from recsys.runtime import embedded_ray_env
embedded_ray_env()
ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
print("NICE", ray.get(ray.remote(lambda: os.nice(0)).remote()))
ray.shutdown()
"""


@pytest.mark.parametrize("preset, expected", [(None, 0), ("7", 7)])
def test_an_embedded_cluster_runs_its_workers_at_normal_priority(preset, expected):
    """Ray's default is nice 15 for workers; ours is 0, and a value the user set is kept."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_worker_niceness", "RAY_ADDRESS")}
    if preset is not None:
        env["RAY_worker_niceness"] = preset
    done = subprocess.run(
        [sys.executable, "-c", _NICENESS_PROBE], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"NICE {expected}" in done.stdout


@pytest.fixture
def split(tmp_path):
    """A split of 3 files, 1,000 rows in row groups of 100 to 300 (ids 0-999)."""
    start = 0
    for i, (rows, group) in enumerate([(300, 100), (450, 300), (250, 250)]):
        ids = pa.array(range(start, start + rows), pa.int64())
        pq.write_table(pa.table({"id": ids}), tmp_path / f"part-{i}.parquet", row_group_size=group)
        start += rows
    return tmp_path


def ids(batches):
    return [b.column("id").to_pylist() for b in batches]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("order_seed", [None, 4])
def test_parquet_shards_cover_every_row_once(split, world, order_seed):
    shards = [ParquetShard(split, rank, world, order_seed=order_seed) for rank in range(world)]
    assert [s.num_rows for s in shards] == [1000 * (r + 1) // world - 1000 * r // world for r in range(world)]
    seen = [i for s in shards for b in ids(s.iter_batches(64, local_shuffle_buffer_size=200)) for i in b]
    assert sorted(seen) == list(range(1000))
    if order_seed is None and world == 1:  # file order, no shuffle: the rows as written
        assert [i for b in ids(shards[0].iter_batches(64)) for i in b] == list(range(1000))


def test_shuffled_batches_are_full_mixed_and_repeat_with_the_seed(split):
    shard = ParquetShard(split, 0, 1, order_seed=1)
    first = ids(shard.iter_batches(64, drop_last=True, local_shuffle_buffer_size=300, local_shuffle_seed=2))
    again = ids(shard.iter_batches(64, drop_last=True, local_shuffle_buffer_size=300, local_shuffle_seed=2))
    other = ids(shard.iter_batches(64, drop_last=True, local_shuffle_buffer_size=300, local_shuffle_seed=3))
    assert first == again != other
    assert len(first) == 1000 // 64 and all(len(b) == 64 for b in first)
    assert len({i for b in first for i in b}) == 1000 // 64 * 64  # no row twice
    assert first[0] != sorted(first[0])  # shuffled within the buffer
    # another seed of the row groups' order starts elsewhere in the data
    assert ParquetShard(split, 0, 1, order_seed=1).groups != ParquetShard(split, 0, 1, order_seed=2).groups


@pytest.mark.parametrize("order_seed", [None, 4])
def test_the_global_batches_are_the_same_on_any_number_of_workers(split, order_seed):
    """The rows cut into 2 shards: on 1, 2, 3 or 4 workers each step's parts, put together, are the same."""
    steps = {}
    for world in (2, 1, 3, 4):
        shards = [ParquetShard(split, r, world, order_seed=order_seed, shards=2) for r in range(world)]
        parts = [ids(s.iter_batches(64, drop_last=True, local_shuffle_buffer_size=200, local_shuffle_seed=5))
                 for s in shards]  # fmt: skip
        assert len({len(p) for p in parts}) == 1 and {s.num_batches(64) for s in shards} == {len(parts[0])}
        sizes = {128 * (r + 1) // world - 128 * r // world for r in range(world)}  # differing by one
        assert {len(part) for p in parts for part in p} == sizes
        steps[world] = [[i for part in step for i in part] for step in zip(*parts, strict=True)]
    assert steps[1] == steps[2] == steps[3] == steps[4]
    assert len(steps[2]) == 500 // 64 and all(len(s) == 128 and len(set(s)) == 128 for s in steps[2])
    with pytest.raises(ValueError, match="training only"):
        next(iter(ParquetShard(split, 0, 1, shards=2).iter_batches(64)))


def test_read_ahead_raises_the_producers_error_and_stops_with_its_consumer():
    def items():
        yield 1
        raise ValueError("bad row group")

    reader = read_ahead(items(), depth=2)
    assert next(reader) == 1
    with pytest.raises(ValueError, match="bad row group"):
        next(reader)

    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    reader = read_ahead(endless(), depth=2)
    assert [next(reader) for _ in range(3)] == [0, 1, 2]
    (thread,) = [t for t in threading.enumerate() if t.name == "parquet-read-ahead"]
    assert thread.is_alive()  # blocked on the full queue, the endless producer waits for its consumer
    reader.close()  # stops and joins the producer thread
    assert not thread.is_alive()
    assert len(produced) <= 3 + 2 + 1  # read at most depth ahead (+1 waiting to be put)


def test_lockstep_batches_prepare_each_batch_on_the_read_ahead_thread(split, world_of_one):
    from recsys.data.shard import lockstep_batches

    def batches(**kwargs):
        shard = ParquetShard(split, 0, 1, order_seed=3)
        return list(lockstep_batches(shard, 64, complete=False, shuffle_rows=200, seed=5, **kwargs))

    def prepare(table):
        return threading.current_thread().name, table.column("id").to_pylist()

    plain, prepared = batches(), batches(prepare=prepare)
    assert [n for _, n in prepared] == [n for _, n in plain] == [64] * (1000 // 64)
    assert [ids for (_, ids), _ in prepared] == ids(t for t, _ in plain)  # the same rows, in the same order
    threads = {thread for (thread, _), _ in prepared}
    assert threads and all(t.startswith("batch-prepare") for t in threads)  # built off the training thread
    assert [ids for (_, ids), _ in batches(prepare=prepare, prepare_threads=3)] == ids(t for t, _ in plain)
    assert len(batches(prepare=prepare, max_steps=3)) == 3
    # A worker's part of a global batch (43 of 2 x 64 rows on 3 workers) is trained as it is: not padded.
    part = list(lockstep_batches(ParquetShard(split, 1, 3, shards=2), 64, complete=False, shuffle_rows=200))
    assert part and all(t.num_rows == n == 43 for t, n in part)
    with pytest.raises(ValueError, match="prepare: only in training mode"):
        next(lockstep_batches(ParquetShard(split, 0, 1), 64, complete=True, prepare=prepare))


def test_parallel_map_keeps_the_order_and_raises_the_error_in_the_consumer():
    import time

    from recsys.data.shard import parallel_map

    def slow_square(i):
        time.sleep(0.01 * (5 - i % 5))  # later items finish first
        if i == 7:
            raise ValueError("bad batch 7")
        return i * i

    results = parallel_map(slow_square, iter(range(10)), workers=3)
    assert [next(results) for _ in range(7)] == [i * i for i in range(7)]
    with pytest.raises(ValueError, match="bad batch 7"):
        next(results)


def test_ray_dashboard_is_off_where_ray_default_is_not_installed(monkeypatch):
    import sys

    from recsys.runtime import dashboard_available

    monkeypatch.delitem(sys.modules, "ray.dashboard.optional_deps", raising=False)
    assert dashboard_available()  # this machine has ray[default]
    monkeypatch.delitem(sys.modules, "ray.dashboard.optional_deps", raising=False)
    monkeypatch.setitem(sys.modules, "aiohttp_cors", None)  # as in a minimal install: not importable
    assert not dashboard_available()


def test_weight_decay_shrinks_only_the_embedding_rows_a_batch_touches(tmp_path, world_of_one):
    from recsys.train.config import TrainConfig
    from recsys.train.sharding import shard_model
    from tests.test_model_model import LAYOUT, tiny_batch

    model = {
        "tasks": [{"name": "click"}, {"name": "purchase", "given": "click"}],
        "embedding": {"dim": 4},
        "arch": {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]},
    }

    def user_table_after_steps(**training):
        config = TrainConfig.from_dict({"features": str(tmp_path), "model": model, "training": training})
        sharded = shard_model(config, LAYOUT, torch.device("cpu"))
        for _ in range(3):  # one step showed no decay with the CPU kernel here; three do
            loss, _ = sharded.dmp(tiny_batch())
            loss.backward()
            sharded.optimizer.step()
            sharded.optimizer.zero_grad()
        key = "model.sparse_arch.embedding_bag_collection.embedding_bags.t_user.weight"
        table = sharded.dmp.state_dict()[key]
        return table.local_shards()[0].tensor.detach().clone(), sharded

    plain, _ = user_table_after_steps()
    decayed, sharded = user_table_after_steps(embedding_weight_decay=5.0, dense_weight_decay=0.1)
    touched = [0, 1, 2]  # the batch's users; row 3 is not in it
    assert not torch.allclose(plain[touched], decayed[touched])
    torch.testing.assert_close(plain[3], decayed[3])  # an untouched row does not decay
    assert isinstance(sharded.dense_optimizer._optimizer, torch.optim.AdamW)
    with pytest.raises(ValueError, match=r"training\.embedding_weight_decay: expected a number >= 0, got -1"):
        TrainConfig.from_dict({"features": "f", "model": model, "training": {"embedding_weight_decay": -1}})


def test_lr_decay_sets_each_epochs_rates_in_the_table_kernels_and_the_dense_optimizer(tmp_path, world_of_one):
    from recsys.train.config import TrainConfig
    from recsys.train.sharding import set_epoch_lr, shard_model
    from tests.test_model_model import LAYOUT

    model = {"tasks": [{"name": "click"}], "embedding": {"dim": 4}, "arch": {"num_experts": 2}}
    training = {"embedding_lr": 0.08, "dense_lr": 0.002, "lr_decay": 0.5}
    config = TrainConfig.from_dict({"features": str(tmp_path), "model": model, "training": training})
    sharded = shard_model(config, LAYOUT, torch.device("cpu"))

    def kernels(optimizer):
        if hasattr(optimizer, "_emb_module"):
            return [optimizer._emb_module]
        return [k for _, child in getattr(optimizer, "optimizers", []) for k in kernels(child)]

    kernels = kernels(sharded.dmp.fused_optimizer)
    assert kernels
    for epoch, factor in ((0, 1.0), (2, 0.25), (1, 0.5)):  # a resumed run may set any epoch
        assert set_epoch_lr(sharded, config.training, epoch) == factor
        assert all(k.get_learning_rate() == pytest.approx(0.08 * factor) for k in kernels)
        assert [g["lr"] for g in sharded.dense_optimizer.param_groups] == [pytest.approx(0.002 * factor)]
    frozen = TrainConfig.from_dict(
        {"features": str(tmp_path), "model": model, "training": {**training, "embedding_epochs": 2}}
    )
    set_epoch_lr(sharded, frozen.training, 1)
    assert all(k.get_learning_rate() == pytest.approx(0.04) for k in kernels)
    set_epoch_lr(sharded, frozen.training, 2)  # frozen tables from the third epoch on; dense layers go on
    assert all(k.get_learning_rate() == 0.0 for k in kernels)
    assert [g["lr"] for g in sharded.dense_optimizer.param_groups] == [pytest.approx(0.0005)]
    redrawn = TrainConfig.from_dict(
        {"features": str(tmp_path), "model": model, "training": {**training, "embedding_reinit": True}}
    )
    set_epoch_lr(sharded, redrawn.training, 2)  # tables drawn anew train at the first epoch's rate
    assert all(k.get_learning_rate() == pytest.approx(0.08) for k in kernels)
    assert [g["lr"] for g in sharded.dense_optimizer.param_groups] == [pytest.approx(0.0005)]
    with pytest.raises(ValueError, match=r"training\.lr_decay: expected a number > 0 and <= 1, got 1.5"):
        TrainConfig.from_dict({"features": "f", "model": model, "training": {"lr_decay": 1.5}})


def test_embedding_reinit_draws_the_tables_anew_and_clears_their_optimizer_state(tmp_path, world_of_one):
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from recsys.train.config import TrainConfig
    from recsys.train.sharding import reinit_tables, shard_model
    from tests.test_model_model import LAYOUT, tiny_batch

    model = {"tasks": [{"name": "click"}], "embedding": {"dim": 4}, "arch": {"num_experts": 2}}
    config = TrainConfig.from_dict(
        {"features": str(tmp_path), "model": model, "training": {"embedding_reinit": True}}
    )
    sharded = shard_model(config, LAYOUT, torch.device("cpu"))

    def step():
        loss, _ = sharded.dmp(tiny_batch())
        sharded.optimizer.zero_grad()
        loss.backward()
        sharded.optimizer.step()

    def tables():
        state = sharded.dmp.state_dict()
        return {
            k: v.local_shards()[0].tensor.clone() for k, v in state.items() if isinstance(v, ShardedTensor)
        }

    def momentum():
        states = sharded.dmp.fused_optimizer.state.values()
        return [v.local_shards()[0].tensor.clone() for state in states for v in state.values()]

    for _ in range(3):
        step()
    trained, dense = tables(), {k: v.clone() for k, v in sharded.dmp.named_parameters() if "tower" in k}
    assert len(trained) == 2 and all(m.abs().sum() > 0 for m in momentum())
    reinit_tables(sharded, seed=5)
    drawn = tables()
    for key, table in drawn.items():  # TorchRec's initialisation: U(-1/sqrt(rows), 1/sqrt(rows))
        assert not torch.allclose(table, trained[key])
        assert table.abs().max() <= table.shape[0] ** -0.5
    assert all(m.abs().sum() == 0 for m in momentum())  # read back from the kernels: cleared there
    for key, value in sharded.dmp.named_parameters():
        if key in dense:
            torch.testing.assert_close(value, dense[key])  # the dense layers keep what they learnt
    reinit_tables(sharded, seed=5)
    assert all(torch.equal(drawn[k], v) for k, v in tables().items())  # the seed decides the draw
    step()  # the kernels train the new rows
    assert any(not torch.equal(drawn[k], v) for k, v in tables().items())
    assert all(m.abs().sum() > 0 for m in momentum())
    with pytest.raises(ValueError, match=r"training\.embedding_reinit: expected true or false, got 'yes'"):
        TrainConfig.from_dict({"features": "f", "model": model, "training": {"embedding_reinit": "yes"}})
