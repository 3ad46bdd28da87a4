"""A training loss that goes non-finite stops the run at once, on every worker, with the step and task named.

Each worker checks its loss parts after a step (every step on a CPU, where reading them costs nothing; every
``log_every_steps`` steps on a GPU, where it would wait for the device). A worker that finds one raises no
error of its own: that would be a worker failure, which Ray Train retries from the last checkpoint, the
same deterministic failure again. Instead it asks to stop at the next lockstep vote
(:func:`recsys.data.shard.lockstep_batches` ``stop=``), so all workers leave the epoch together; then they
gather what each found (:meth:`LossWatch.raise_if_found`) and all raise :class:`TrainingDivergedError`. The
worker function reports it (:class:`~recsys.train.reports.DivergedReport`) and returns; the driver's recorder
raises :class:`~recsys.train.reports.NonFiniteLossError`, which ends the run ``FAILED`` before anything is
logged as a model.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from recsys.train.reports import DivergedReport

TOTAL = "loss"  # the loss part that sums the tasks' (named only when no task's part is non-finite)


class TrainingDivergedError(Exception):
    """Raised on every worker once any worker's loss went non-finite; carries the first finding."""

    def __init__(self, report: DivergedReport) -> None:
        super().__init__(f"the {report.task} loss is {report.value} at step {report.step}")
        self.report = report


class LossWatch:
    """Checks one worker's loss parts step by step (see the module docstring).

    Args:
        rank: this worker's rank.
        every: check every this many steps (1 on a CPU).
    """

    def __init__(self, rank: int, every: int = 1) -> None:
        self.rank, self.every = rank, max(1, every)
        self.found: DivergedReport | None = None

    def check(self, epoch: int, step: int, losses: dict[str, torch.Tensor]) -> None:
        """Looks at the step's loss parts; remembers the first non-finite one (a task's before the total)."""
        if self.found is not None or step % self.every:
            return
        names = sorted(losses, key=lambda name: name == TOTAL)  # tasks first
        for name in names:
            value = float(losses[name])
            if not math.isfinite(value):
                self.found = DivergedReport(epoch, step, name, str(value), self.rank)
                return

    def tripped(self) -> bool:
        """Whether this worker found a non-finite loss (its vote to stop)."""
        return self.found is not None

    def any_worker(self) -> bool:
        """Whether any worker found one (a collective: every worker calls it at the same point)."""
        flag = torch.tensor([1 if self.found is not None else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def raise_if_found(self) -> None:
        """Raises :class:`TrainingDivergedError` on every worker if any found one (a collective)."""
        if not self.any_worker():
            return
        found: list[DivergedReport | None] = [None] * dist.get_world_size()
        dist.all_gather_object(found, self.found)
        first = min((f for f in found if f is not None), key=lambda f: (f.step, f.rank))
        raise TrainingDivergedError(first)
