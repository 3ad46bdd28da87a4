"""Task balancing: how the task losses are combined into the one loss a training step minimises.

* ``fixed`` (the default): ``sum_t w_t L_t`` with the config's task weights.
* ``uncertainty`` (Kendall, Gal and Cipolla, CVPR 2018): a learned log-variance ``s_t`` per task,
  ``sum_t w_t (k_t exp(-s_t) L_t + s_t / 2)`` with ``k_t = 1/2`` for a regression task (Gaussian
  likelihood) and ``1`` for a binary one (the paper's classification form). ``s_t`` is a dense parameter
  trained by the dense optimizer; the task's effective weight is ``w_t k_t exp(-s_t)``.
* ``gradnorm`` (Chen et al., ICML 2018): loss weights ``g_t`` (summing to the number of tasks T) moved every
  step so that the norm of each weighted task's gradient on the shared layers, ``G_t = g_t |grad L_t|``,
  approaches ``mean(G) r_t^alpha``, where ``r_t`` is the task's loss ratio ``L_t / L_t(0)`` over its mean:
  a task that trains more slowly gets a larger gradient. ``G_t`` is linear in ``g_t`` and the target is held
  constant (as in the paper), so the GradNorm loss's gradient is ``sign(G_t - target_t) |grad L_t|``;
  the weights take an Adam step of ``gradnorm_lr`` on it and are renormalised.
* ``pcgrad`` (Yu et al., NeurIPS 2020): where two tasks' gradients on the shared layers conflict (negative
  dot product), each is projected onto the normal plane of the other, in a random order of the others,
  and the projected gradients are summed. The result is a combination ``sum_t c_t g_t`` of the tasks'
  gradients, whose coefficients follow from the gradients' dot products alone
  (:func:`pcgrad_coefficients`). Everything below the task towers (shared layers, gates and the embedding
  tables) then gets ``c_t`` times task t's gradient, through a gradient scale on each tower's input
  (:func:`scale_grad`); each tower still gets its own task's gradient, unscaled.

GradNorm and PCGrad need each task's gradient on the shared layers (the experts or the shared bottom: what
``shared_parameters()`` of the multi-task architecture returns): T extra backward passes through the dense
layers (not through the tables). With several workers these gradients (and the losses) are averaged over the
workers first, so that every worker computes the same weights or coefficients from the global batch.

Example:
    >>> from recsys.config import TaskConfig
    >>> balancer = TaskBalancer([TaskConfig("y1", kind="regression"), TaskConfig("y2", kind="regression")],
    ...                         "uncertainty")
    >>> total, stats = balancer.combine([torch.tensor(2.0), torch.tensor(4.0)])
    >>> round(float(total), 3), round(float(stats["balance/y1/weight"]), 3)
    (3.0, 0.5)
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from recsys.config import TaskConfig

BALANCING = ("fixed", "uncertainty", "gradnorm", "pcgrad")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scales[index]`` as it is *then*."""

    @staticmethod
    def forward(ctx, x, scales, index):  # noqa: ANN001, ANN205
        ctx.scales, ctx.index = scales, index  # not saved for backward: read after in-place updates
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad * ctx.scales[ctx.index].to(grad.dtype), None, None


def scale_grad(x: torch.Tensor, scales: torch.Tensor, index: int) -> torch.Tensor:
    """``x`` unchanged; its gradient is multiplied by ``scales[index]``, read when backward runs.

    ``scales`` may be filled in place between the forward and the backward pass: PCGrad computes the
    coefficients from the task gradients of the forward pass it scales.
    """
    return _ScaleGrad.apply(x, scales, index)


def pcgrad_coefficients(
    gram: torch.Tensor, order: Sequence[Sequence[int]] | None = None, rng: random.Random | None = None
) -> torch.Tensor:
    """PCGrad's combined gradient as coefficients of the task gradients: ``sum_t c_t g_t``.

    Task i's projected gradient stays in the span of the task gradients: it is tracked as coefficients
    ``a_i`` over them, and its dot product with ``g_j`` is ``a_i . gram[:, j]``. Projecting it off a
    conflicting ``g_j`` subtracts ``(a_i . gram[:, j]) / gram[j, j]`` from ``a_i[j]``.

    Args:
        gram: ``(T, T)`` the dot products of the task gradients, ``gram[i, j] = g_i . g_j``.
        order: for each task i, the other tasks in the order it is projected on them (default: a random
            order per task, as the paper, drawn from ``rng``).
        rng: draws the orders (default: the ``random`` module's generator).

    Returns:
        ``(T,)`` the coefficients ``c = sum_i a_i``.
    """
    gram = gram.double()
    t = gram.size(0)
    coefficients = torch.eye(t, dtype=torch.float64)
    for i in range(t):
        others = [j for j in range(t) if j != i]
        if order is not None:
            others = list(order[i])
        else:
            (rng or random).shuffle(others)
        a = coefficients[i]
        for j in others:
            dot = a @ gram[:, j]
            if dot < 0 and gram[j, j] > 0:
                a[j] -= dot / gram[j, j]
    return coefficients.sum(dim=0)


class TaskBalancer(nn.Module):
    """Combines the task losses by one of :data:`BALANCING` (see the module docstring).

    Args:
        tasks: the tasks (their weights ``w_t`` and kinds).
        method: ``fixed``, ``uncertainty``, ``gradnorm`` or ``pcgrad``.
        gradnorm_alpha: GradNorm's asymmetry ``alpha`` (the paper's default 1.5; 0 equalises the gradient
            norms).
        gradnorm_lr: the learning rate of GradNorm's weights.
    """

    def __init__(
        self,
        tasks: Sequence[TaskConfig],
        method: str = "fixed",
        gradnorm_alpha: float = 1.5,
        gradnorm_lr: float = 0.025,
    ) -> None:
        super().__init__()
        if method not in BALANCING:
            raise ValueError(f"training.task_balancing: expected one of {list(BALANCING)}, got {method!r}")
        self.method = method
        self.names = [t.name for t in tasks]
        self.alpha, self.gradnorm_lr = gradnorm_alpha, gradnorm_lr
        weights = torch.tensor([t.weight for t in tasks], dtype=torch.float32)
        self.register_buffer("task_weights", weights, persistent=False)
        self.register_buffer(
            "likelihood",
            torch.tensor([0.5 if t.kind == "regression" else 1.0 for t in tasks]),
            persistent=False,
        )
        t = len(self.names)
        if method == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(t))
        if method == "gradnorm":
            start = weights * t / weights.sum() if weights.sum() > 0 else torch.ones(t)
            # Buffers: in the checkpoints, but not dense parameters (their own Adam moves them).
            self.register_buffer("gradnorm_weights", start)
            self.register_buffer("initial_losses", torch.full((t,), float("nan")))
            self._weights_optimizer: torch.optim.Optimizer | None = None
        # PCGrad's coefficients, read by each tower input's gradient scale when backward runs.
        self.register_buffer("grad_scales", torch.ones(t), persistent=False)
        self.steps = 0  # PCGrad's projection orders are drawn from it: the same on every worker

    @property
    def needs_task_gradients(self) -> bool:
        """GradNorm and PCGrad look at each task's gradient before the backward pass."""
        return self.method in ("gradnorm", "pcgrad")

    def effective_weights(self) -> torch.Tensor:
        """``(T,)`` each task loss's current weight in the total."""
        if self.method == "uncertainty":
            return self.task_weights * self.likelihood * torch.exp(-self.log_vars)
        if self.method == "gradnorm":
            return self.gradnorm_weights.clone()
        return self.task_weights

    def combine(self, losses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss of the task losses (in task order), and the weights as statistics."""
        stacked = torch.stack(list(losses))
        weights = self.effective_weights()
        total = (weights * stacked).sum()
        if self.method == "uncertainty":
            total = total + 0.5 * (self.task_weights * self.log_vars).sum()
        stats = {f"balance/{name}/weight": weights[t].detach() for t, name in enumerate(self.names)}
        return total, stats

    def before_backward(
        self, losses: Sequence[torch.Tensor], shared: Sequence[nn.Parameter]
    ) -> dict[str, torch.Tensor]:
        """GradNorm: updates the weights; PCGrad: sets the tower inputs' gradient scales. Others: nothing.

        Call after the forward pass and before ``backward()`` of the total (the graph is kept).

        Args:
            losses: the task losses of the forward pass, with their graph, in task order.
            shared: the shared dense parameters the tasks' gradients are compared on.

        Returns:
            Statistics: the gradients' cosine (two tasks) or smallest cosine, the number of conflicting
            pairs, and the per-task gradient norms.
        """
        if not self.needs_task_gradients:
            return {}
        self.steps += 1
        shared = [p for p in shared if p.requires_grad]
        if not shared:
            raise ValueError(
                f"training.task_balancing: {self.method} compares the tasks' gradients on shared layers; "
                "this architecture has none (single_task)"
            )
        self.grad_scales.fill_(1.0)  # the per-task gradients below must not be scaled by the last step's
        flat = torch.stack([self._task_gradient(loss, shared) for loss in losses])  # (T, P)
        task_losses = torch.stack([loss.detach() for loss in losses]).to(flat.dtype)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            both = torch.cat([flat.flatten(), task_losses])
            dist.all_reduce(both)
            both /= dist.get_world_size()
            flat, task_losses = both[: flat.numel()].view_as(flat), both[flat.numel() :]
        gram = flat @ flat.T  # (T, T)
        norms = gram.diagonal().clamp_min(0).sqrt()
        cosine = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
        upper = torch.triu_indices(len(losses), len(losses), offset=1)
        pair_cosines = cosine[upper[0], upper[1]]
        stats = {
            "balance/grad_cosine": pair_cosines.min() if pair_cosines.numel() else torch.tensor(1.0),
            "balance/conflicts": (pair_cosines < 0).sum().float(),
        }
        stats.update({f"balance/{n}/grad_norm": norms[t].detach() for t, n in enumerate(self.names)})
        if self.method == "pcgrad":
            orders = random.Random(self.steps)
            self.grad_scales.copy_(pcgrad_coefficients(gram.detach(), rng=orders).to(self.grad_scales))
            stats.update(
                {f"balance/{n}/pcgrad_scale": self.grad_scales[t].clone() for t, n in enumerate(self.names)}
            )
        else:
            self._gradnorm_step(norms.detach(), task_losses)
        return stats

    def _task_gradient(self, loss: torch.Tensor, shared: Sequence[nn.Parameter]) -> torch.Tensor:
        grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        parts = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, shared, strict=True)]
        return torch.cat([g.flatten() for g in parts])

    def _gradnorm_step(self, norms: torch.Tensor, losses: torch.Tensor) -> None:
        """One step of GradNorm's weights from the task gradients' norms ``|grad L_t|`` and the losses."""
        w = self.gradnorm_weights
        if torch.isnan(self.initial_losses).any():
            self.initial_losses.copy_(losses.to(self.initial_losses))
        ratios = losses.to(w) / self.initial_losses.clamp_min(1e-12)
        relative = ratios / ratios.mean()
        g = w.detach() * norms.to(w)  # G_t
        target = g.mean() * relative**self.alpha
        if self._weights_optimizer is None:
            self._weights_optimizer = torch.optim.Adam([w], lr=self.gradnorm_lr)
        w.grad = torch.sign(g - target) * norms.to(w)
        self._weights_optimizer.step()
        w.grad = None
        with torch.no_grad():
            w.clamp_(min=1e-3)
            w.mul_(len(self.names) / w.sum())
