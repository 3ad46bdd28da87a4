"""Explicit feature interactions between the pooled embeddings, ahead of the experts.

An MLP over concatenated embeddings learns a product such as user x category only slowly and
approximately (Rendle et al., RecSys 2020); a factorization term gives it directly. :class:`DotInteraction`
is DLRM's (Naumov et al. 2019): the dense features are projected to one more embedding-sized vector, and
the dot product of every pair of vectors is appended to the concatenated inputs.

Example:
    >>> inter = DotInteraction(num_sparse=3, dim=4, num_dense=2)
    >>> inter(torch.zeros(5, 3, 4), torch.zeros(5, 2)).shape  # (B, 3*4 + 2 + 6 pairs of 4 vectors)
    torch.Size([5, 20])
"""

from __future__ import annotations

import torch
from torch import nn


class DotInteraction(nn.Module):
    """Concatenated inputs plus the pairwise dot products of the embeddings (and the projected dense).

    Args:
        num_sparse: ``F``, pooled sparse features.
        dim: ``D``, the embedding dimension.
        num_dense: dense features; when > 0 they are projected to one more ``D``-vector that takes part in
            the dot products.
    """

    def __init__(self, num_sparse: int, dim: int, num_dense: int) -> None:
        super().__init__()
        self.dense_proj = nn.Linear(num_dense, dim) if num_dense > 0 else None
        vectors = num_sparse + (1 if num_dense > 0 else 0)
        rows, cols = torch.triu_indices(vectors, vectors, offset=1)
        # Flat indices of the upper triangle of the (K, K) Gram matrix, without the diagonal.
        self.register_buffer("pairs", rows * vectors + cols, persistent=False)
        self.out_dim = num_sparse * dim + num_dense + len(rows)

    def forward(self, embedded: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``(B, F, D)`` pooled embeddings and ``(B, n_dense)`` -> ``(B, F*D + n_dense + K(K-1)/2)``."""
        vectors = embedded
        if self.dense_proj is not None:
            vectors = torch.cat([embedded, self.dense_proj(dense).unsqueeze(1)], dim=1)  # (B, K, D)
        gram = torch.bmm(vectors, vectors.transpose(1, 2)).flatten(1)  # (B, K*K)
        return torch.cat([embedded.flatten(1), dense, gram[:, self.pairs]], dim=1)
