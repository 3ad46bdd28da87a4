"""Multi-task architectures: from one input ``(B, D)`` to one representation ``(B, H)`` per task.

* :class:`MMoE`: E shared experts, one gate per task (Ma et al. 2018), optionally beside each task's own
  experts, which only that task's gate mixes.
* :class:`OMoE`: E shared experts and one gate for every task (the paper's one-gate MoE baseline).
* :class:`PLE`: shared and task-specific experts in one or more extraction levels (Tang et al. 2020);
  one level is CGC. Tasks may have different numbers of their own experts.
* :class:`SharedBottom`: one MLP shared by every task.
* :class:`SingleTask`: one MLP per task (computed together); the tasks share only their input.

Every architecture returns ``(representations, stats)``: a list with one ``(B, H)`` tensor per task and
a dict of routing statistics (empty without gates), with ``moe/aux_loss`` the mean load-balancing loss of
all gates. Gates are built by a factory ``make_gate(in_dim, num_experts)``, so the same code runs dense
softmax and noisy top-k gates. ``shared_parameters()`` are the parameters more than one task's loss
trains (the experts or bottom; what GradNorm and PCGrad compare the tasks' gradients on).

Example:
    >>> from recsys.modules.gates import SoftmaxGate
    >>> mmoe = MMoE(in_dim=8, task_names=["click", "purchase"], num_experts=4, expert_hidden=[16],
    ...             make_gate=lambda d, e: SoftmaxGate(d, e))
    >>> reps, stats = mmoe(torch.randn(3, 8))
    >>> [r.shape for r in reps], stats["moe/click/load"].shape
    ([torch.Size([3, 16]), torch.Size([3, 16])], torch.Size([4]))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from recsys.modules.experts import MLP, StackedExperts
from recsys.modules.gates import expert_capacity, route_with_capacity, routing_stats

GateFactory = Callable[[int, int], nn.Module]
Output = tuple[list[torch.Tensor], dict[str, torch.Tensor]]


class GatedExperts(nn.Module):
    """Stacked experts in input groups, mixed by gates over subsets of them: one MMoE layer or PLE level.

    Experts are numbered group by group. Expert group ``j`` reads input ``j``; gate ``g`` reads input
    ``gate_inputs[g]`` and mixes the experts of the groups ``gate_groups[g]``. With one input for all groups
    the experts' first layers are one wide GEMM.

    In dispatch mode (``capacity_factor`` set; top-k gates only) each gate routes its rows with
    :func:`~recsys.modules.gates.route_with_capacity`; the rows routed to each expert are gathered into one
    ``(E, S, D)`` buffer (S = the capacities of the gates that use the expert, summed) and all experts run
    as one batched matmul on it, so the work is ``E * S`` rows instead of ``E * B`` (S is the largest such
    sum; experts used by fewer gates pad). A row sent to one expert by two gates is computed twice. Without
    overflow the outputs equal the dense path's. The ``load`` statistics count the gates' choices before
    capacity; ``overflow``, ``dropped`` and ``capacity`` are added per gate, and ``overflow`` in total.

    Args:
        in_dim: D, the input size.
        group_sizes: experts per group.
        gate_names: a name per gate, for the statistics.
        gate_inputs: the input (group) index each gate reads.
        gate_groups: the expert groups each gate mixes.
        expert_hidden: layer sizes of each expert.
        make_gate: ``make_gate(in_dim, num_experts)`` builds a gate returning a ``GateOutput``.
        dropout: dropout in the experts.
        capacity_factor: dispatch mode with this capacity factor; None computes every expert on every row.
        overflow: dispatch: ``fallback`` to the next-best expert or ``drop``.
        prefix: the statistics' key prefix.
    """

    def __init__(
        self,
        in_dim: int,
        group_sizes: Sequence[int],
        gate_names: Sequence[str],
        gate_inputs: Sequence[int],
        gate_groups: Sequence[Sequence[int]],
        expert_hidden: Sequence[int],
        make_gate: GateFactory,
        dropout: float = 0.0,
        capacity_factor: float | None = None,
        overflow: str = "fallback",
        prefix: str = "moe",
    ) -> None:
        super().__init__()
        starts = [sum(group_sizes[:j]) for j in range(len(group_sizes))]
        self.num_experts = sum(group_sizes)
        self.num_groups = len(group_sizes)
        self.experts = StackedExperts(self.num_experts, in_dim, expert_hidden, dropout)
        self.out_dim = self.experts.out_dim
        self.gate_names = list(gate_names)
        self.gate_inputs = list(gate_inputs)
        members = [
            [e for j in groups for e in range(starts[j], starts[j] + group_sizes[j])]
            for groups in gate_groups
        ]
        self.gate_sizes = [len(m) for m in members]
        self.gate_is_full = [m == list(range(self.num_experts)) for m in members]
        self.gates = nn.ModuleList(make_gate(in_dim, len(m)) for m in members)
        # (G, max n_g): each gate's experts, padded; gate g uses the first gate_sizes[g] columns.
        padded = [m + [0] * (max(self.gate_sizes) - len(m)) for m in members]
        self.register_buffer("gate_experts", torch.tensor(padded, dtype=torch.int64), persistent=False)
        cover = [[float(e in m) for e in range(self.num_experts)] for m in members]
        self.register_buffer("gate_cover", torch.tensor(cover), persistent=False)  # (G, E)
        group_of = [j for j, n in enumerate(group_sizes) for _ in range(n)]
        self.register_buffer("expert_group", torch.tensor(group_of, dtype=torch.int64), persistent=False)
        self.capacity_factor = capacity_factor
        self.fallback = overflow == "fallback"
        self.prefix = prefix

    def _gate_experts(self, g: int) -> torch.Tensor:
        return self.gate_experts[g, : self.gate_sizes[g]]

    def forward(self, inputs: list[torch.Tensor]) -> Output:
        """Mixes the experts for every gate.

        Args:
            inputs: one ``(B, D)`` tensor read by every group and gate, or one per group.

        Returns:
            One ``(B, H)`` mixture per gate, and the gates' statistics.
        """
        if self.capacity_factor is not None:
            return self._dispatch(inputs)
        if len(inputs) == 1:
            expert_out = self.experts(inputs[0])  # (E, B, H)
        else:
            stacked = torch.stack(inputs)  # (G, B, D)
            expert_out = self.experts.forward_per_expert(
                stacked.index_select(0, self.expert_group)
            )  # (E, B, H)
        outputs: list[torch.Tensor] = []
        stats: dict[str, torch.Tensor] = {}
        for g, gate in enumerate(self.gates):
            gate_out = gate(inputs[self.gate_inputs[g] if len(inputs) > 1 else 0])
            mixed = expert_out if self.gate_is_full[g] else expert_out.index_select(0, self._gate_experts(g))
            # One batched matmul per row, (B, 1, n) @ (B, n, H): a broadcast multiply and sum over experts
            # would write and read an (n, B, H) temporary, forward and backward (a quarter of a step).
            mix = torch.bmm(gate_out.weights.unsqueeze(1), mixed.transpose(0, 1))  # (B, 1, H)
            outputs.append(mix.squeeze(1))
            stats.update(routing_stats(gate_out, f"{self.prefix}/{self.gate_names[g]}"))
        return outputs, stats

    def _dispatch(self, inputs: list[torch.Tensor]) -> Output:
        rows = inputs[0].size(0)
        num_experts, in_dim = self.num_experts, inputs[0].size(1)
        gate_outs = [
            gate(inputs[self.gate_inputs[g] if len(inputs) > 1 else 0]) for g, gate in enumerate(self.gates)
        ]
        caps = [
            expert_capacity(self.capacity_factor, rows, out.indices.size(1), n)
            for out, n in zip(gate_outs, self.gate_sizes, strict=True)
        ]
        # Slots of expert e: the capacities of the gates that use it, one after the other, gate by gate.
        take = (
            self.gate_cover
            * torch.tensor(caps, dtype=self.gate_cover.dtype, device=self.gate_cover.device)[:, None]
        )
        base = (take.cumsum(dim=0) - take).long()  # (G, E): where gate g's slots of expert e start
        slots = int(take.sum(dim=0).max())  # S
        trash = num_experts * slots  # dropped slots write (and read) one extra row, then weigh 0

        flat_inputs = torch.cat(inputs)  # (G * B, D): input j's row b is row j * B + b
        row_ids = torch.arange(rows, device=flat_inputs.device).unsqueeze(1)  # (B, 1)
        stats: dict[str, torch.Tensor] = {}
        targets, sources, weights, overflow = [], [], [], []
        for g, gate_out in enumerate(gate_outs):
            routing = route_with_capacity(gate_out, caps[g], self.fallback)
            served = routing.experts >= 0
            expert = self._gate_experts(g)[routing.experts.clamp(min=0)]  # (B, k) global expert ids
            target = expert * slots + base[g].gather(0, expert.flatten()).view_as(expert) + routing.positions
            target = torch.where(served, target, torch.full_like(target, trash))  # (B, k) buffer rows
            source = (
                self.expert_group[expert] * rows if len(inputs) > 1 else 0
            ) + row_ids  # (B, k) input rows
            targets.append(target)
            sources.append(source.expand_as(target))
            name = f"{self.prefix}/{self.gate_names[g]}"
            stats.update(routing_stats(gate_out, name))
            stats[f"{name}/overflow"] = routing.overflow
            stats[f"{name}/dropped"] = routing.dropped
            stats[f"{name}/capacity"] = torch.tensor(caps[g])
            overflow.append(routing.overflow)
            weights.append(routing.weights)  # (B, k), 0 for dropped slots
        target_all = torch.cat([t.flatten() for t in targets])
        source_all = torch.cat([s.flatten() for s in sources])
        buffer = flat_inputs.new_zeros(trash + 1, in_dim).index_copy(0, target_all, flat_inputs[source_all])
        out = self.experts.forward_per_expert(buffer[:trash].view(num_experts, slots, in_dim))  # (E, S, H)
        out = torch.cat([out.reshape(trash, -1), out.new_zeros(1, out.size(-1))])  # (E * S + 1, H)
        outputs = [
            (out[target] * w.unsqueeze(-1)).sum(dim=1)  # (B, k, H) -> (B, H)
            for target, w in zip(targets, weights, strict=True)
        ]
        stats[f"{self.prefix}/overflow"] = torch.stack(overflow).sum()
        return outputs, stats


def _aux_mean(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([v for k, v in stats.items() if k.endswith("/aux_loss")]).mean()


class MMoE(nn.Module):
    """Multi-gate mixture of experts: E shared experts, one gate per task.

    Args:
        in_dim: D, the input size.
        task_names: the tasks (one gate each), for output order and statistics.
        num_experts: E.
        expert_hidden: layer sizes of each expert; H = the last.
        make_gate: ``make_gate(in_dim, num_experts)`` builds a gate.
        dropout: dropout in the experts.
        capacity_factor: top-k dispatch mode with this capacity factor (None: every expert on every row).
        overflow: dispatch: ``fallback`` or ``drop``.
        num_task_experts: each task's own experts (empty or all 0: none); task t's gate mixes the shared
            experts and task t's own.
    """

    def __init__(
        self,
        in_dim: int,
        task_names: Sequence[str],
        num_experts: int,
        expert_hidden: Sequence[int],
        make_gate: GateFactory,
        dropout: float = 0.0,
        capacity_factor: float | None = None,
        overflow: str = "fallback",
        num_task_experts: Sequence[int] = (),
    ) -> None:
        super().__init__()
        tasks = list(task_names)
        own = list(num_task_experts) if any(num_task_experts) else []
        if own and len(own) != len(tasks):
            raise ValueError(
                f"model.arch.num_task_experts: expected one number per task of {tasks}, got {own}"
            )
        self.layer = GatedExperts(
            in_dim,
            [num_experts, *own],
            tasks,
            [0] * len(tasks),
            [[0, t + 1] if own else [0] for t in range(len(tasks))],
            expert_hidden,
            make_gate,
            dropout,
            capacity_factor,
            overflow,
            prefix="moe",
        )
        self.out_dim = self.layer.out_dim

    def forward(self, x: torch.Tensor) -> Output:
        """``x`` ``(B, D)`` -> one ``(B, H)`` per task, and the routing statistics."""
        outputs, stats = self.layer([x])
        stats["moe/aux_loss"] = _aux_mean(stats)
        return outputs, stats

    def shared_parameters(self) -> list[nn.Parameter]:
        """The experts (with task experts, their weights are stacked with the shared ones)."""
        return list(self.layer.experts.parameters())


class OMoE(MMoE):
    """One-gate mixture of experts: E shared experts and one gate, whose mixture every task's tower reads.

    The baseline of the MMoE paper (Ma et al. 2018, its "OMoE"): the same experts as :class:`MMoE`, but the
    tasks cannot weigh them differently. Its gate's statistics are ``moe/shared/...``.

    Args:
        in_dim: D, the input size.
        num_tasks: T.
        num_experts: E.
        expert_hidden: layer sizes of each expert; H = the last.
        make_gate: ``make_gate(in_dim, num_experts)`` builds the gate.
        dropout: dropout in the experts.
        capacity_factor: top-k dispatch mode with this capacity factor (None: every expert on every row).
        overflow: dispatch: ``fallback`` or ``drop``.
    """

    def __init__(
        self,
        in_dim: int,
        num_tasks: int,
        num_experts: int,
        expert_hidden: Sequence[int],
        make_gate: GateFactory,
        dropout: float = 0.0,
        capacity_factor: float | None = None,
        overflow: str = "fallback",
    ) -> None:
        super().__init__(
            in_dim, ["shared"], num_experts, expert_hidden, make_gate, dropout, capacity_factor, overflow
        )
        self.num_tasks = num_tasks

    def forward(self, x: torch.Tensor) -> Output:
        """``x`` ``(B, D)`` -> the same ``(B, H)`` for each task, and the gate's statistics."""
        outputs, stats = super().forward(x)
        return outputs * self.num_tasks, stats

    def shared_parameters(self) -> list[nn.Parameter]:
        """The experts and the gate: every task trains them."""
        return list(self.layer.parameters())


class PLE(nn.Module):
    """Progressive layered extraction: per level, shared experts and each task's own experts.

    At each level, task t's gate mixes the shared experts and task t's experts, read from task t's
    input; below the last level a shared gate mixes all experts, read from the shared input, for the
    next level's shared experts. Level 0 reads ``x`` everywhere. One level is CGC.

    Args:
        in_dim: D, the input size.
        task_names: the tasks, for output order and statistics.
        num_shared_experts: shared experts per level.
        num_task_experts: experts per task per level: one number for every task, or one per task.
        num_levels: extraction levels.
        expert_hidden: layer sizes of each expert; H = the last.
        make_gate: ``make_gate(in_dim, num_experts)`` builds a gate.
        dropout: dropout in the experts.
        capacity_factor: top-k dispatch mode with this capacity factor (None: every expert on every row).
        overflow: dispatch: ``fallback`` or ``drop``.
    """

    def __init__(
        self,
        in_dim: int,
        task_names: Sequence[str],
        num_shared_experts: int,
        num_task_experts: int | Sequence[int],
        num_levels: int,
        expert_hidden: Sequence[int],
        make_gate: GateFactory,
        dropout: float = 0.0,
        capacity_factor: float | None = None,
        overflow: str = "fallback",
    ) -> None:
        super().__init__()
        tasks = list(task_names)
        t = len(tasks)
        self.num_tasks = t
        own = [num_task_experts] * t if isinstance(num_task_experts, int) else list(num_task_experts)
        if len(own) != t or any(num_shared_experts + n < 1 for n in own):
            raise ValueError(
                f"model.arch.num_task_experts: expected one number per task of {tasks}, each gate mixing "
                f">= 1 expert with the {num_shared_experts} shared, got {num_task_experts!r}"
            )
        groups = [num_shared_experts, *own]  # group 0 shared, group 1 + i task i
        self.levels = nn.ModuleList()
        dim = in_dim
        for level in range(num_levels):
            last = level == num_levels - 1
            names = tasks + ([] if last else ["shared"])
            inputs = list(range(1, t + 1)) + ([] if last else [0])
            mixes = [[0, i + 1] for i in range(t)] + ([] if last else [list(range(t + 1))])
            self.levels.append(
                GatedExperts(
                    dim,
                    groups,
                    names,
                    inputs,
                    mixes,
                    expert_hidden,
                    make_gate,
                    dropout,
                    capacity_factor,
                    overflow,
                    prefix=f"moe/level{level}",
                )
            )
            dim = self.levels[-1].out_dim
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> Output:
        """``x`` ``(B, D)`` -> one ``(B, H)`` per task, and the routing statistics."""
        inputs = [x]
        stats: dict[str, torch.Tensor] = {}
        outputs: list[torch.Tensor] = []
        overflow: list[torch.Tensor] = []
        for level in self.levels:
            outputs, level_stats = level(inputs)
            stats.update(level_stats)
            if f"{level.prefix}/overflow" in level_stats:
                overflow.append(level_stats[f"{level.prefix}/overflow"])
            inputs = outputs[self.num_tasks :] + outputs[: self.num_tasks]  # shared first, as the groups
        if overflow:
            stats["moe/overflow"] = torch.stack(overflow).sum()
        stats["moe/aux_loss"] = _aux_mean(stats)
        return outputs[: self.num_tasks], stats

    def shared_parameters(self) -> list[nn.Parameter]:
        """The experts of every level (each level's shared and task experts are stacked in one weight)."""
        return [p for level in self.levels for p in level.experts.parameters()]


class SharedBottom(nn.Module):
    """One MLP whose output every task's tower reads.

    Args:
        in_dim: D, the input size.
        num_tasks: T.
        hidden: the bottom's layer sizes; H = the last.
        dropout: dropout in the bottom.
    """

    def __init__(self, in_dim: int, num_tasks: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.bottom = MLP(in_dim, hidden, dropout)
        self.num_tasks = num_tasks
        self.out_dim = self.bottom.out_dim

    def forward(self, x: torch.Tensor) -> Output:
        """``x`` ``(B, D)`` -> the same ``(B, H)`` for each task, and no statistics."""
        h = self.bottom(x)
        return [h] * self.num_tasks, {}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The bottom MLP."""
        return list(self.bottom.parameters())


class SingleTask(nn.Module):
    """One bottom MLP per task, as separate single-task models that share only the embeddings.

    The bottoms are computed together as stacked experts (one per task, no gate).

    Args:
        in_dim: D, the input size.
        num_tasks: T.
        hidden: each bottom's layer sizes; H = the last.
        dropout: dropout in the bottoms.
    """

    def __init__(self, in_dim: int, num_tasks: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.bottoms = StackedExperts(num_tasks, in_dim, hidden, dropout)
        self.out_dim = self.bottoms.out_dim

    def forward(self, x: torch.Tensor) -> Output:
        """``x`` ``(B, D)`` -> task t's own ``(B, H)``, and no statistics."""
        return list(self.bottoms(x).unbind(0)), {}

    def shared_parameters(self) -> list[nn.Parameter]:
        """None: each task has its own bottom."""
        return []
