"""Losses, kept out of the model: per-task losses, ESMM labels and the load-balancing term.

:class:`RankingTrain` wraps a :class:`~recsys.model.RankingModel` as TorchRec's ``DLRMTrain`` wraps
``DLRM``: ``forward(batch)`` returns the total loss and, for logging, the detached per-task losses, the
logits and the statistics.

Example:
    >>> from recsys.config import TaskConfig
    >>> loss_fn = MultiTaskLoss([TaskConfig("click"), TaskConfig("purchase", given="click")])
    >>> logits = {"click": torch.zeros(2), "purchase": torch.zeros(2)}
    >>> labels = {"click": torch.tensor([1.0, 0.0]), "purchase": torch.tensor([1.0, 1.0])}
    >>> total, losses = loss_fn(logits, labels, {})
    >>> sorted(losses)
    ['click', 'loss', 'purchase']
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recsys.balancing import TaskBalancer
from recsys.config import ModelConfig, TaskConfig
from recsys.data.batch import Batch
from recsys.model import RankingModel


class MultiTaskLoss(nn.Module):
    """Weighted sum of the task losses, plus the weighted load-balancing loss.

    * binary: binary cross-entropy on the logit;
    * regression: mean squared error of the output;
    * entire-space (``given``): binary cross-entropy of the model's p(given and task) logit against
      ``label * given's label``, on every row (ESMM: the click-and-purchase label on all impressions).

    The task losses are combined by a :class:`~recsys.balancing.TaskBalancer` (default: fixed weights, the
    tasks' ``weight``).

    Args:
        tasks: the tasks.
        load_balance_weight: weight of ``stats["moe/aux_loss"]`` (ignored when the stats have none).
        balancer: how the task losses are combined (default ``TaskBalancer(tasks)``: fixed weights).
    """

    def __init__(
        self,
        tasks: Sequence[TaskConfig],
        load_balance_weight: float = 0.0,
        balancer: TaskBalancer | None = None,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.by_name = {t.name: t for t in self.tasks}
        self.load_balance_weight = load_balance_weight
        self.balancer = balancer if balancer is not None else TaskBalancer(self.tasks)
        self.task_losses: list[torch.Tensor] = []  # the last forward's, with their graph (GradNorm, PCGrad)

    def forward(
        self, logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss, and the detached parts by name (``loss`` the total, ``aux_loss`` if any).

        The balancer's task weights are added to ``stats`` (``balance/<task>/weight``).

        Args:
            logits: per task ``(B,)``, as returned by the model.
            labels: per label ``(B,)`` floats.
            stats: the model's statistics.
        """
        parts: dict[str, torch.Tensor] = {}
        losses: list[torch.Tensor] = []
        for task in self.tasks:
            if task.label not in labels:
                raise ValueError(
                    f"model.tasks[{task.name}].label: no label {task.label!r} in the batch, which "
                    f"has {sorted(labels)}"
                )
            logit = logits[task.name].float()  # fp32 losses, also under bf16 autocast
            target = labels[task.label].to(logit.dtype)
            if task.given:
                target = target * labels[self.by_name[task.given].label]  # clicked and purchased
            if task.kind == "binary":
                loss = F.binary_cross_entropy_with_logits(logit, target)
            else:
                loss = F.mse_loss(logit, target)
            parts[task.name] = loss.detach()
            losses.append(loss)
        total, weights = self.balancer.combine(losses)
        self.task_losses = losses
        stats.update(weights)
        if self.load_balance_weight and "moe/aux_loss" in stats:
            parts["aux_loss"] = stats["moe/aux_loss"].detach()
            total = total + self.load_balance_weight * stats["moe/aux_loss"]
        parts["loss"] = total.detach()
        return total, parts


class RankingTrain(nn.Module):
    """The model with its loss, for training.

    Args:
        model: the ranking model.
        loss: the multi-task loss.
    """

    def __init__(self, model: RankingModel, loss: MultiTaskLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    @classmethod
    def from_config(
        cls, model: RankingModel, config: ModelConfig, balancer: TaskBalancer | None = None
    ) -> RankingTrain:
        """Wraps ``model`` with the tasks and load-balancing weight of ``config``, and a task balancer."""
        return cls(model, MultiTaskLoss(config.tasks, config.gate.load_balance_weight, balancer))

    def before_backward(self) -> dict[str, torch.Tensor]:
        """The balancer's look at the last forward pass's task gradients (GradNorm, PCGrad).

        See :meth:`recsys.balancing.TaskBalancer.before_backward`; call between the forward and ``backward``.
        """
        shared = getattr(self.model.multitask, "shared_parameters", list)()
        return self.loss.balancer.before_backward(self.loss.task_losses, shared)

    def forward(
        self, batch: Batch
    ) -> tuple[
        torch.Tensor, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]
    ]:
        """``(loss, (losses, logits, stats))``: the loss to backpropagate, then detached values to log."""
        balancer = self.loss.balancer
        # PCGrad scales each tower input's gradient by its task's coefficient (set before backward).
        self.model.grad_scales = balancer.grad_scales if balancer.method == "pcgrad" else None
        logits, stats = self.model(batch.dense, batch.sparse)
        total, parts = self.loss(logits, batch.labels, stats)
        detached = {k: v.detach() for k, v in logits.items()}
        return total, (parts, detached, {k: v.detach() for k, v in stats.items()})
