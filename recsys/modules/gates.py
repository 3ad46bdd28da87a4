"""Gates that mix experts, the load-balancing loss, routing statistics and capacity-limited routing.

A gate maps its input ``(B, D)`` to a :class:`GateOutput` over its ``E`` experts:

* :class:`SoftmaxGate`: dense softmax weights over all experts (classic MMoE).
* :class:`NoisyTopKGate`: Shazeer et al. 2017, "Outrageously large neural networks": trainable Gaussian
  noise while training, the ``k`` largest logits kept, their softmax as weights (renormalized over k).

Both divide their logits by a temperature first.

Example:
    >>> gate = NoisyTopKGate(in_dim=8, num_experts=4, k=2)
    >>> out = gate(torch.randn(3, 8))
    >>> (out.weights > 0).sum(dim=1).tolist(), out.indices.shape
    ([2, 2, 2], torch.Size([3, 2]))
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

_NOISE_EPS = 1e-2  # a floor on the noise std, as in Shazeer et al.


class GateOutput(NamedTuple):
    """What a gate says about a batch.

    Attributes:
        weights: ``(B, E)`` mixing weights; rows sum to 1 (zeros outside the top k).
        probs: ``(B, E)`` softmax over all experts (the load-balancing loss and the entropy use it).
        logits: ``(B, E)`` the (noisy, tempered) logits the routing used.
        indices: ``(B, k)`` the experts each row is routed to, best first (the arg-max, k = 1, for a
            dense softmax gate: routing statistics count it).
    """

    weights: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor
    indices: torch.Tensor


class SoftmaxGate(nn.Module):
    """Dense softmax gate: ``softmax(x W / temperature)``.

    Args:
        in_dim: D, the input size.
        num_experts: E, the experts it mixes.
        temperature: logits are divided by it.
    """

    def __init__(self, in_dim: int, num_experts: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, num_experts, bias=False)
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> GateOutput:
        """Gates ``x`` ``(B, D)``; see :class:`GateOutput` for the shapes."""
        logits = self.linear(x) / self.temperature  # (B, E)
        probs = torch.softmax(logits, dim=1)
        return GateOutput(probs, probs, logits, logits.argmax(dim=1, keepdim=True))


class NoisyTopKGate(nn.Module):
    """Noisy top-k gate (Shazeer et al. 2017).

    While training, ``H = x W_g + N(0, 1) * softplus(x W_noise)``; the weights are the softmax of the k
    largest ``H / temperature``, zero elsewhere. In eval mode there is no noise. With ``k = 1`` the weight
    is the chosen expert's softmax probability over all experts instead (Switch Transformer), as a
    renormalized single weight is the constant 1, through which the gate would learn nothing.

    Args:
        in_dim: D, the input size.
        num_experts: E, the experts it chooses among.
        k: experts per row.
        temperature: logits are divided by it.
        noise: add the trainable noise while training.
    """

    def __init__(
        self, in_dim: int, num_experts: int, k: int, temperature: float = 1.0, noise: bool = True
    ) -> None:
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"model.gate.k: expected an integer in [1, {num_experts}], got {k!r}")
        self.linear = nn.Linear(in_dim, num_experts, bias=False)
        # The paper initialises both matrices to zero; W_g keeps PyTorch's default here so that an untrained
        # model in eval mode (no noise) does not route every row to the same k experts by tie-breaking.
        self.noise_linear = nn.Linear(in_dim, num_experts, bias=False) if noise else None
        if self.noise_linear is not None:
            nn.init.zeros_(self.noise_linear.weight)
        self.temperature = temperature
        self.k = k

    def forward(self, x: torch.Tensor) -> GateOutput:
        """Gates ``x`` ``(B, D)``; see :class:`GateOutput` for the shapes."""
        logits = self.linear(x)  # (B, E)
        if self.noise_linear is not None and self.training:
            std = F.softplus(self.noise_linear(x)) + _NOISE_EPS
            logits = logits + torch.randn_like(logits) * std
        logits = logits / self.temperature
        probs = torch.softmax(logits, dim=1)
        top_logits, indices = logits.topk(self.k, dim=1)  # (B, k), best first
        # Renormalized over k; with k = 1 that weight would be the constant 1 and the gate would get no
        # gradient from the task loss, so top-1 keeps the expert's softmax probability (Switch Transformer).
        top_weights = torch.softmax(top_logits, dim=1) if self.k > 1 else probs.gather(1, indices)
        weights = torch.zeros_like(logits).scatter(1, indices, top_weights)
        return GateOutput(weights, probs, logits, indices)


def expert_load(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The share of routing assignments (row, slot) that go to each expert.

    Args:
        indices: ``(B, k)`` routed experts.
        num_experts: E.

    Returns:
        ``(E,)``, summing to 1.
    """
    counts = F.one_hot(indices, num_experts).sum(dim=(0, 1))  # (E,)
    return counts.to(torch.float32) / indices.numel()


def load_balancing_loss(gate: GateOutput) -> torch.Tensor:
    """Switch Transformer auxiliary loss: ``E * sum_e load_e * mean_gate_prob_e``.

    1 for uniform routing (its minimum when the probabilities follow the routing), E when every row goes
    to one expert with probability 1. The load is not differentiable; the gradient flows through the
    mean probabilities, pushing probability away from over-used experts.
    """
    num_experts = gate.probs.size(1)
    load = expert_load(gate.indices, num_experts)  # (E,)
    return num_experts * (load * gate.probs.mean(dim=0)).sum()


def routing_stats(gate: GateOutput, prefix: str) -> dict[str, torch.Tensor]:
    """Expert-utilisation statistics of one gate, for logging.

    Returns:
        ``{prefix}/load`` ``(E,)`` share of assignments per expert; ``{prefix}/top_share`` the share that
        goes to the most used expert (1/E balanced, 1/k collapsed onto k experts); ``{prefix}/entropy``
        the mean entropy of the gate's softmax (log E when uniform, 0 when one-hot), in nats;
        ``{prefix}/aux_loss`` the load-balancing loss (with gradient).
    """
    load = expert_load(gate.indices, gate.probs.size(1)).detach()
    probs = gate.probs.detach()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1).mean()
    return {
        f"{prefix}/load": load,
        f"{prefix}/top_share": load.max(),
        f"{prefix}/entropy": entropy,
        f"{prefix}/aux_loss": load_balancing_loss(gate),
    }


def expert_capacity(capacity_factor: float, batch_size: int, k: int, num_experts: int) -> int:
    """Rows one expert may take from one gate: ``ceil(capacity_factor * B * k / E)``, at least 1."""
    return max(1, math.ceil(capacity_factor * batch_size * k / num_experts))


class Routing(NamedTuple):
    """Capacity-limited routing of one gate.

    Attributes:
        experts: ``(B, k)`` the expert each slot is served by, or -1 when it was dropped.
        positions: ``(B, k)`` the slot's position in its expert's queue (< capacity).
        weights: ``(B, k)`` mixing weights of the served slots (0 where dropped).
        overflow: the number of (row, slot) assignments whose first-choice expert was full.
        dropped: the number of assignments served by no expert.
    """

    experts: torch.Tensor
    positions: torch.Tensor
    weights: torch.Tensor
    overflow: torch.Tensor
    dropped: torch.Tensor


def route_with_capacity(gate: GateOutput, capacity: int, fallback: bool) -> Routing:
    """Assigns every (row, slot) of a top-k gate to an expert with room, in priority order.

    Priority is slot-major: every row's first choice is placed before any second choice, rows in batch
    order within a slot (as GShard). A slot whose expert is full either falls back, in rounds, to the row's
    next-best expert not yet used (``fallback``) or is dropped (Switch Transformer).

    Weights: with ``fallback``, the softmax of the logits over the experts a row is finally served by (the
    gate's own top-k weights when nothing overflowed; for k = 1 the served expert's probability); with
    drop, the gate's weights, zero where dropped, not renormalized: the row goes on without that expert's
    share.

    Args:
        gate: a top-k gate's output over E experts.
        capacity: rows one expert takes from this gate.
        fallback: re-route overflowing slots instead of dropping them.
    """
    logits, indices = gate.logits, gate.indices
    rows, num_experts = logits.shape
    k = indices.size(1)
    # Each row's experts, best first: its top k, then the rest by logit.
    rest = logits.scatter(1, indices, float("-inf")).argsort(dim=1, descending=True)[:, : num_experts - k]
    ranking = torch.cat([indices, rest], dim=1)  # (B, E)

    experts = torch.full_like(indices, -1)
    positions = torch.zeros_like(indices)
    used = torch.zeros(num_experts, dtype=torch.int64, device=logits.device)  # slots taken per expert
    candidate = indices
    pending = torch.ones_like(indices, dtype=torch.bool)
    overflowed = torch.zeros_like(pending)
    next_rank = torch.full((rows,), k, dtype=torch.int64, device=logits.device)
    for _ in range(num_experts - k + 1):
        requests = F.one_hot(candidate, num_experts) * pending.unsqueeze(-1)  # (B, k, E)
        # Queue order: slot-major, then row; position = slots already taken + rank in this round's queue.
        queue = requests.transpose(0, 1).reshape(k * rows, num_experts).cumsum(dim=0)
        queue = queue.reshape(k, rows, num_experts).transpose(0, 1)  # (B, k, E)
        position = (used + queue - 1).gather(2, candidate.unsqueeze(-1)).squeeze(-1)  # (B, k)
        accepted = pending & (position < capacity)
        experts = torch.where(accepted, candidate, experts)
        positions = torch.where(accepted, position, positions)
        used = used + (requests * accepted.unsqueeze(-1)).sum(dim=(0, 1))
        overflowed = overflowed | (pending & ~accepted)
        pending = pending & ~accepted
        if not fallback or not bool(pending.any()):
            break
        # The m-th pending slot of a row takes the row's m-th next unused expert.
        rank = next_rank.unsqueeze(1) + pending.long().cumsum(dim=1) - 1  # (B, k)
        pending = pending & (rank < num_experts)
        candidate = torch.where(pending, ranking.gather(1, rank.clamp(max=num_experts - 1)), candidate)
        next_rank = next_rank + pending.sum(dim=1)

    served = experts >= 0
    if fallback and k == 1:
        weights = gate.probs.gather(1, experts.clamp(min=0)) * served  # the top-1 rule of NoisyTopKGate
    elif fallback:
        masked = logits.gather(1, experts.clamp(min=0)).masked_fill(~served, torch.finfo(logits.dtype).min)
        weights = torch.softmax(masked, dim=1) * served
    else:
        weights = gate.weights.gather(1, indices) * served
    return Routing(experts, positions, weights, overflowed.sum(), (~served).sum())
