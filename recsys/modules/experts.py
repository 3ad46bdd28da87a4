"""MLPs, and E same-shaped MLP experts computed together from stacked weights.

:class:`StackedExperts` never loops over experts. When every expert reads the same input (MMoE, the first
PLE level), the first layers of all experts are one wide GEMM ``(B, D) @ (D, E * H1)``; the later layers
are one batched matmul ``(E, B, H_i) @ (E, H_i, H_{i+1})`` each. When each expert has its own rows
(per-expert inputs, or the rows dispatched to it), every layer is one batched matmul.

Example:
    >>> experts = StackedExperts(num_experts=4, in_dim=8, hidden=[16, 8])
    >>> experts(torch.randn(3, 8)).shape  # (E, B, H)
    torch.Size([4, 3, 8])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Linear layers with ReLU (and dropout while training) after each.

    Args:
        in_dim: the input size.
        hidden: the layer sizes.
        dropout: dropout probability after each activation.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        sizes = [in_dim, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.dropout = dropout
        self.out_dim = sizes[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim)`` -> ``(B, hidden[-1])`` (the input itself when ``hidden`` is empty)."""
        for layer in self.layers:
            x = F.dropout(layer(x).relu_(), self.dropout, self.training)  # in place: a linear keeps no output
        return x


class StackedExperts(nn.Module):
    """E MLP experts of the same sizes, with ReLU (and dropout) after every layer, weights stacked.

    Each layer ``i`` holds a weight ``(E, H_i, H_{i+1})`` and a bias ``(E, H_{i+1})``, initialised like
    ``nn.Linear`` per expert. The first weight is stored as ``(D, E * H_1)`` so that a shared input needs
    one wide GEMM; :meth:`forward_per_expert` views it as ``(E, D, H_1)``.

    Args:
        num_experts: E.
        in_dim: D, the input size.
        hidden: layer sizes of each expert; the output is ``hidden[-1]``.
        dropout: dropout probability after each activation.
    """

    def __init__(self, num_experts: int, in_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        if num_experts < 1 or not hidden:
            raise ValueError(
                f"experts: expected >= 1 expert and >= 1 layer, got {num_experts} and {list(hidden)}"
            )
        self.num_experts = num_experts
        self.in_dim = in_dim
        self.hidden = list(hidden)
        self.dropout = dropout
        self.out_dim = self.hidden[-1]
        e, h1 = num_experts, self.hidden[0]
        self.first_weight = nn.Parameter(torch.empty(in_dim, e * h1))  # (D, E * H1)
        self.first_bias = nn.Parameter(torch.empty(e * h1))  # (E * H1,)
        sizes = self.hidden
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(e, a, b)) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(e, 1, b)) for b in sizes[1:])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation for each expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        bound = 1 / math.sqrt(self.in_dim)
        nn.init.uniform_(self.first_weight, -bound, bound)
        nn.init.uniform_(self.first_bias, -bound, bound)
        for w, b in zip(self.weights, self.biases, strict=True):
            bound = 1 / math.sqrt(w.size(1))
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        # In place: x is a fresh matmul output that its backward does not need; saves a (B, E * H) tensor.
        return F.dropout(x.relu_(), self.dropout, self.training)

    def _rest(self, h: torch.Tensor) -> torch.Tensor:
        for w, b in zip(self.weights, self.biases, strict=True):
            h = self._act(torch.baddbmm(b, h, w))  # (E, N, H_i) @ (E, H_i, H_i+1) -> (E, N, H_i+1)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every row of a shared input.

        Args:
            x: ``(B, D)``.

        Returns:
            ``(E, B, H)`` with ``H = hidden[-1]``.
        """
        h = self._act(torch.addmm(self.first_bias, x, self.first_weight))  # (B, E * H1): one wide GEMM
        h = h.view(x.size(0), self.num_experts, self.hidden[0]).transpose(0, 1)  # (E, B, H1)
        return self._rest(h)

    def forward_per_expert(self, x: torch.Tensor) -> torch.Tensor:
        """Each expert on its own rows.

        Args:
            x: ``(E, N, D)``: row ``n`` of expert ``e`` is ``x[e, n]``.

        Returns:
            ``(E, N, H)``.
        """
        w = self.first_weight.view(self.in_dim, self.num_experts, self.hidden[0]).transpose(
            0, 1
        )  # (E, D, H1)
        b = self.first_bias.view(self.num_experts, 1, self.hidden[0])  # (E, 1, H1)
        return self._rest(self._act(torch.baddbmm(b, x, w)))
