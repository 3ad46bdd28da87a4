"""The sparse part of the model: TorchRec embedding tables pooled per feature.

Example:
    >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    >>> from recsys.data.batch import FeatureLayout, SparseFeature
    >>> layout = FeatureLayout(sparse=(SparseFeature("item", 10),
    ...                                SparseFeature("hist", 10, multi_hot=True, table="item")))
    >>> arch = SparseArch(embedding_bag_collection(layout, dim=4, pooling="mean"), layout.keys)
    >>> kjt = KeyedJaggedTensor(keys=["item", "hist"], values=torch.tensor([3, 4, 1, 2]),
    ...                         lengths=torch.tensor([1, 1, 2, 0]))
    >>> arch(kjt).shape  # (B, F, D)
    torch.Size([2, 2, 4])
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import FeatureLayout

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def embedding_bag_collection(
    layout: FeatureLayout,
    dim: int,
    pooling: str = "mean",
    device: torch.device | None = None,
    exclude: Collection[str] = (),
) -> EmbeddingBagCollection:
    """One TorchRec table per table of the layout (shared tables are looked up by several features).

    Args:
        layout: the feature layout; its ``tables`` give each table's size and features.
        dim: the embedding dimension of every table.
        pooling: ``sum`` or ``mean`` over a bag's ids.
        device: where to allocate the tables (``meta`` to defer, for sharding).
        exclude: layout tables to leave out (those of an :func:`embedding_collection`).
    """
    if pooling not in _POOLING:
        raise ValueError(f"model.embedding.pooling: expected one of {list(_POOLING)}, got {pooling!r}")
    tables = [
        EmbeddingBagConfig(
            name=f"t_{table}",
            embedding_dim=dim,
            num_embeddings=size,
            feature_names=list(features),
            pooling=_POOLING[pooling],
        )
        for table, (size, features) in layout.tables.items()
        if table not in exclude
    ]
    return EmbeddingBagCollection(tables=tables, device=device)


def embedding_collection(
    layout: FeatureLayout, dim: int, tables: Collection[str], device: torch.device | None = None
) -> EmbeddingCollection:
    """Unpooled TorchRec tables (one embedding per id) for the given tables of the layout.

    TorchRec shards an ``EmbeddingCollection`` as it does an ``EmbeddingBagCollection``, but a table
    belongs to one collection: every feature of these tables is looked up here, single ids included.

    Args:
        layout: the feature layout.
        dim: the embedding dimension of every table.
        tables: the layout's tables to hold (same names as in :func:`embedding_bag_collection`).
        device: where to allocate the tables (``meta`` to defer, for sharding).
    """
    return EmbeddingCollection(
        tables=[
            EmbeddingConfig(
                name=f"t_{table}", embedding_dim=dim, num_embeddings=size, feature_names=list(features)
            )
            for table, (size, features) in layout.tables.items()
            if table in tables
        ],
        device=device,
    )


class SparseArch(nn.Module):
    """Pools the embeddings of every sparse feature and stacks them in layout key order.

    Args:
        embedding_bag_collection: the tables; all of one embedding dimension.
        keys: the feature order of the output (the layout's keys).
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection, keys: list[str]) -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        configs = embedding_bag_collection.embedding_bag_configs()
        dims = {c.embedding_dim for c in configs}
        if len(dims) != 1:
            raise ValueError(f"model.embedding.dim: every table needs one dimension, got {sorted(dims)}")
        self.dim = dims.pop()
        self.keys = list(keys)
        produced = [name for c in configs for name in c.feature_names]
        if sorted(produced) != sorted(self.keys):
            raise ValueError(
                f"model.embedding: the tables' features {produced} differ from the keys {self.keys}"
            )
        # Column order of the pooled output, by the order the collection produced its keys in: the
        # unsharded collection groups features by table, a sharded one (DistributedModelParallel) by shard,
        # so the permutation is worked out from the output's own keys (once per order seen).
        self._orders: dict[tuple[str, ...], torch.Tensor | None] = {}

    @property
    def num_features(self) -> int:
        """F, the number of pooled features."""
        return len(self.keys)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Pooled embeddings.

        Args:
            features: ids of every key, ``B`` bags per key.

        Returns:
            ``(B, F, D)`` pooled embeddings, features in key order.
        """
        pooled_kt = self.embedding_bag_collection(features)
        produced = tuple(pooled_kt.keys())
        if produced not in self._orders:
            order = [produced.index(k) for k in self.keys]
            self._orders[produced] = None if order == list(range(len(order))) else torch.tensor(order)
        pooled = pooled_kt.values()  # (B, F * D), in the produced order
        pooled = pooled.view(pooled.size(0), self.num_features, self.dim)  # (B, F, D)
        order = self._orders[produced]
        if order is None:
            return pooled
        return pooled.index_select(1, order.to(pooled.device))


def enable_sparse_gradients(embedding_bag_collection: EmbeddingBagCollection) -> list[nn.Parameter]:
    """Makes the tables produce sparse gradients (rows touched by the batch only) and returns their weights.

    Use with an optimizer for sparse gradients (``torch.optim.SparseAdam``, ``Adagrad``) on these
    parameters, and a dense optimizer on the rest: a dense Adam step on a 200k-row table costs more
    than the whole forward pass. Sharded training (DistributedModelParallel) uses TorchRec's fused
    optimizers instead.
    """
    params = []
    for bag in embedding_bag_collection.embedding_bags.values():
        bag.sparse = True
        params.append(bag.weight)
    return params
