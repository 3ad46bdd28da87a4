"""Target attention over the user's history (DIN, Zhou et al. 2018): the candidate as the query.

A history feature (the user's last N clicked items) is the weighted sum of its ids' embeddings, each id
weighted by an MLP of the candidate's embedding ``q`` and the id's ``k_j``: ``w_j = MLP([q, k_j, q - k_j,
q * k_j])``. As in DIN the weights are not normalized (no softmax): the sum keeps how much of the history
matches the candidate, and an empty history is exactly zero, with no division to guard.

:class:`HistoryArch` looks the ids up in a TorchRec ``EmbeddingCollection`` (one embedding per id, not a
pooled bag), which ``DistributedModelParallel`` shards as it does the pooled tables. The candidate's id
is looked up in the same collection as a sequence of length 1: a TorchRec table belongs to one
collection, so the candidate and its history share the table only when both live here.

Example:
    >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    >>> from recsys.data.batch import FeatureLayout, SparseFeature
    >>> from recsys.modules.embedding import embedding_collection
    >>> layout = FeatureLayout(sparse=(SparseFeature("item", 10),
    ...                                SparseFeature("hist", 10, multi_hot=True, table="item")))
    >>> arch = HistoryArch(embedding_collection(layout, 4, ["item"]), ["item", "hist"], {"hist": "item"}, [8])
    >>> kjt = KeyedJaggedTensor(keys=["item", "hist"], values=torch.tensor([3, 4, 1, 2]),
    ...                         lengths=torch.tensor([1, 1, 2, 0]))
    >>> arch(kjt).shape  # (B, F, D): the item's embedding, the attended history (zeros in row 2)
    torch.Size([2, 2, 4])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import FeatureLayout
from recsys.modules.experts import MLP


def history_queries(layout: FeatureLayout) -> dict[str, str]:
    """History feature -> its candidate: each multi-hot feature whose table a single-id feature shares.

    The candidate is the first such single-id feature in layout order (``hist_items`` -> ``item``).
    """
    single = {}
    for f in layout.sparse:
        if not f.multi_hot:
            single.setdefault(f.table, f.name)
    return {f.name: single[f.table] for f in layout.sparse if f.multi_hot and f.table in single}


def pad_sequences(values: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged rows to a zero-padded block and its mask.

    Args:
        values: ``(N, D)`` the rows' embeddings, row after row.
        lengths: ``(B,)`` embeddings per row, summing to N.

    Returns:
        ``(B, L, D)`` embeddings (zeros past a row's length) and the ``(B, L)`` mask of real positions,
        L the longest row (0 when every row is empty).
    """
    longest = int(lengths.max()) if lengths.numel() else 0
    mask = torch.arange(longest, device=lengths.device) < lengths.unsqueeze(1)  # (B, L)
    padded = values.new_zeros(lengths.numel(), longest, values.size(-1))
    padded[mask] = values  # row-major over (B, L): the order of the jagged values
    return padded, mask


class TargetAttention(nn.Module):
    """DIN's activation unit: the un-normalized, attention-weighted sum of the keys.

    Args:
        dim: D, the size of the query and of each key.
        hidden: the MLP's hidden layer sizes (may be empty: a linear score).
    """

    def __init__(self, dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.mlp = MLP(4 * dim, hidden)
        self.score = nn.Linear(self.mlp.out_dim, 1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``sum_j mask_j * MLP([q, k_j, q - k_j, q * k_j]) * k_j``.

        Args:
            query: ``(B, D)`` the candidate's embedding.
            keys: ``(B, L, D)`` the history's embeddings.
            mask: ``(B, L)`` true at real positions; padding gets weight 0 (an empty row gives zeros).

        Returns:
            ``(B, D)``.
        """
        q = query.unsqueeze(1).expand_as(keys)  # (B, L, D)
        x = torch.cat([q, keys, q - keys, q * keys], dim=-1)  # (B, L, 4D)
        weights = self.score(self.mlp(x)).squeeze(-1)  # (B, L), DIN: no softmax
        weights = torch.where(mask, weights, torch.zeros_like(weights))
        return torch.bmm(weights.unsqueeze(1), keys).squeeze(1)  # (B, D)


class HistoryArch(nn.Module):
    """Unpooled lookups of candidates and their histories, each history attended by its candidate.

    Args:
        embedding_collection: the tables of the candidates and histories (one dimension).
        keys: the output's features, in order: every feature of the collection.
        queries: history feature -> its candidate feature (a single-id feature of the same table).
        hidden: the attention MLP's hidden layer sizes.
    """

    def __init__(
        self,
        embedding_collection: EmbeddingCollection,
        keys: Sequence[str],
        queries: Mapping[str, str],
        hidden: Sequence[int],
    ) -> None:
        super().__init__()
        self.embedding_collection = embedding_collection
        self.keys = list(keys)
        self.queries = dict(queries)
        produced = [name for c in embedding_collection.embedding_configs() for name in c.feature_names]
        if sorted(produced) != sorted(self.keys):
            raise ValueError(
                f"model.embedding: the tables' features {produced} differ from the keys {self.keys}"
            )
        self.dim = embedding_collection.embedding_dim()
        self.attention = nn.ModuleDict({h: TargetAttention(self.dim, hidden) for h in self.queries})

    @property
    def num_features(self) -> int:
        """F, the number of output features."""
        return len(self.keys)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Candidates' embeddings and attended histories.

        Args:
            features: ids of every key (and maybe others, ignored), ``B`` rows per key; a candidate has
                exactly one id per row.

        Returns:
            ``(B, F, D)``, features in key order.
        """
        sequences = self.embedding_collection(features)
        rows = features.stride()
        out = []
        for key in self.keys:
            jagged = sequences[key]
            if key in self.queries:
                query = sequences[self.queries[key]].values()  # (B, D): one id per row
                keys, mask = pad_sequences(jagged.values(), jagged.lengths())  # (B, L, D), (B, L)
                out.append(self.attention[key](query, keys, mask))
            else:
                if jagged.values().size(0) != rows:
                    raise ValueError(f"batch.{key}: expected one id per row, got {jagged.lengths().tolist()}")
                out.append(jagged.values())  # (B, D)
        return torch.stack(out, dim=1)  # (B, F, D)
