"""Fast checks of the training layer's pieces (the end-to-end runs are in test_train.py)."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys.data import FeatureLayout, SparseFeature, batch_from_arrow
from recsys.embedding import SparseArch, embedding_bag_collection
from recsys.train import _pad, padding_row
from recsys.train_config import TrainConfig

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
    pad = _pad(padding_row(LAYOUT, ["impression_id"]), 4)
    batch = batch_from_arrow(pad, LAYOUT)
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
    padded = _pad(table, 5)
    assert padded.num_rows == 5 and padded.column("a").to_pylist() == [1, 2, 1, 1, 1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"training": {"epochs": 0}}, r"training\.epochs: expected an integer >= 1, got 0"),
        ({"training": {"sharding": "diagonal"}}, r"training\.sharding: .* got 'diagonal'"),
        ({"training": {"main_metric": "dwell/auc"}}, r"training\.main_metric: expected a task of"),
        ({"run": {"num_workers": 0}}, r"run\.num_workers: expected an integer >= 1, got 0"),
        ({"run": {"colour": 1}}, r"run: unknown field\(s\) \['colour'\]"),
    ],
)
def test_train_config_errors_name_the_field_and_value(change, message):
    base = {"features": "f", "model": "ecommerce_mmoe"}
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({**base, **change})


def test_shipped_train_configs_load():
    from recsys.train_config import builtin_train_config

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
