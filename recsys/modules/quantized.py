"""Row-wise quantized pooled tables for scoring on the CPU: fp16, int8 or int4 rows, FBGEMM's CPU kernels.

:class:`QuantizedBags` takes the place of a float TorchRec ``EmbeddingBagCollection`` in
:class:`~recsys.modules.embedding.SparseArch` for inference. Its tables are packed once, row by row:

* ``int8``: ``torch.ops.quantized.embedding_bag_byte_prepack``: D bytes and an fp32 scale and bias per row
  (D + 8 bytes; 24 for D = 16, against 64 in fp32);
* ``int4``: ``embedding_bag_4bit_prepack``: two values per byte and an fp16 scale and bias (D / 2 + 4 bytes);
* ``fp16``: the rows as half floats (2 D bytes).

The lookups are PyTorch's quantized embedding-bag operators (``embedding_bag_byte_rowwise_offsets``,
``embedding_bag_4bit_rowwise_offsets``: FBGEMM's ``EmbeddingSpMDM`` kernels, vectorized), which dequantize
while they pool. TorchRec's own quantized inference collection (``torchrec.quant``) pools through FBGEMM's
``IntNBitTableBatchedEmbeddingBags``, whose CPU kernel ran 15 times slower than these here (2026-12-07:
250k against 3.9M rows/s of the benchmark's 17 features at batch 8,192, 2 threads) and 2.5 times slower
than the fp32 tables themselves. The pooled output is fp32, in the collection's feature order, as a
``KeyedTensor``; mean pooling divides the sums by the bag lengths (an empty bag pools to zeros, as in
TorchRec).

Example:
    >>> from recsys.data.batch import FeatureLayout, SparseFeature
    >>> from recsys.modules.embedding import embedding_bag_collection
    >>> layout = FeatureLayout(sparse=(SparseFeature("item", 10),))
    >>> bags = QuantizedBags(embedding_bag_collection(layout, dim=4), "int8")
    >>> kjt = KeyedJaggedTensor(keys=["item"], values=torch.tensor([3, 4]), lengths=torch.tensor([1, 1]))
    >>> bags(kjt).values().shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

QUANTIZED_DTYPES = ("fp16", "int8", "int4")


def pack(weight: torch.Tensor, dtype: str) -> torch.Tensor:
    """The rows of a float table in the packed form of ``dtype`` (see the module docstring)."""
    weight = weight.detach().float().cpu().contiguous()
    if dtype == "int8":
        return torch.ops.quantized.embedding_bag_byte_prepack(weight)
    if dtype == "int4":
        return torch.ops.quantized.embedding_bag_4bit_prepack(weight)
    if dtype == "fp16":
        return weight.half()
    raise ValueError(f"embedding_dtype: expected one of {list(QUANTIZED_DTYPES)}, got {dtype!r}")


def pooled_sum(weight: torch.Tensor, dtype: str, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``(B, D)`` fp32 sums of the packed rows of each bag (bags start at ``offsets``)."""
    if dtype == "int8":
        op = torch.ops.quantized.embedding_bag_byte_rowwise_offsets
        return op(weight, ids, offsets, False, 0, False, None, None, False)
    if dtype == "int4":
        op = torch.ops.quantized.embedding_bag_4bit_rowwise_offsets
        return op(weight, ids, offsets, False, 0, False, None, None, False)
    return F.embedding_bag(ids, weight, offsets, mode="sum").float()


class _Table(nn.Module):
    """One packed table: its ``weight`` buffer (the state-dict key of the float table it replaces)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)


class QuantizedBags(nn.Module):
    """The packed tables of a float ``EmbeddingBagCollection``, pooling the same features in the same order.

    Args:
        collection: the trained float collection (unsharded).
        dtype: ``fp16``, ``int8`` or ``int4``.

    Raises:
        ValueError: an unknown ``dtype``, or tables of mixed pooling.
    """

    def __init__(self, collection: EmbeddingBagCollection, dtype: str) -> None:
        super().__init__()
        configs = collection.embedding_bag_configs()
        poolings = {c.pooling for c in configs}
        if not poolings <= {PoolingType.SUM, PoolingType.MEAN} or len(poolings) != 1:
            raise ValueError(
                f"model.embedding.pooling: expected one of sum or mean for all tables, got {poolings}"
            )
        self.dtype = dtype
        self.mean = poolings == {PoolingType.MEAN}
        self._configs = configs
        self.features = [(feature, c.name) for c in configs for feature in c.feature_names]
        self.dims = [c.embedding_dim for c in configs for _ in c.feature_names]
        self.embedding_bags = nn.ModuleDict(
            {c.name: _Table(pack(collection.embedding_bags[c.name].weight, dtype)) for c in configs}
        )

    def embedding_bag_configs(self) -> list:
        """The float collection's table configs."""
        return self._configs

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled ``(B, sum of D)`` fp32 embeddings of every feature, keyed as the float collection's."""
        per_key = features.to_dict()
        pooled = []
        for feature, table in self.features:
            bags = per_key[feature]
            lengths = bags.lengths()
            offsets = torch.zeros_like(lengths)
            offsets[1:] = torch.cumsum(lengths[:-1], 0)
            sums = pooled_sum(self.embedding_bags[table].weight, self.dtype, bags.values(), offsets)
            pooled.append(sums / lengths.clamp(min=1).unsqueeze(1).to(sums.dtype) if self.mean else sums)
        keys = [feature for feature, _ in self.features]
        return KeyedTensor(keys=keys, length_per_key=self.dims, values=torch.cat(pooled, dim=1))
