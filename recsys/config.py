"""Model configuration: typed dataclasses loaded from YAML and validated on construction.

A model config says how the inputs of a :class:`~features.spec.FeatureSpec` are embedded, which
multi-task architecture mixes them, how its gates route, and which tasks it predicts:

* ``embedding``: the embedding dimension, the pooling of multi-hot bags and which features share tables;
* ``arch``: ``mmoe``, ``omoe`` (one gate for every task), ``ple`` (``num_levels: 1`` is CGC),
  ``shared_bottom`` or ``single_task``;
* ``gate``: ``softmax`` (dense, as in MMoE) or ``noisy_topk`` (Shazeer et al. 2017), with the
  load-balancing loss weight and the capacity-limited dispatch mode;
* ``tasks``: ``binary`` or ``regression`` heads with loss weights; ``given: other_task`` makes a binary
  task entire-space (ESMM): its tower models p(task | other) and the model outputs p(other and task).

A bad value raises ``ValueError`` whose message names the field and the value.

Example:
    >>> cfg = ModelConfig.from_dict({
    ...     "tasks": [{"name": "click"}, {"name": "purchase", "given": "click"}],
    ...     "arch": {"type": "mmoe", "num_experts": 4, "expert_hidden": [32]},
    ... })
    >>> cfg.arch.num_experts, cfg.tasks[1].label
    (4, 'purchase')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from features.checks import (
    check_choice,
    check_int,
    check_number,
    from_mapping,
    invalid,
    is_int,
    is_number,
    shipped_config,
)

POOLINGS = ("sum", "mean")
HISTORY_POOLINGS = ("mean", "attention")
ARCHS = ("mmoe", "omoe", "ple", "shared_bottom", "single_task")
GATES = ("softmax", "noisy_topk")
OVERFLOWS = ("fallback", "drop")
TASK_KINDS = ("binary", "regression")
INTERACTIONS = ("none", "dot")


def _check_sizes(where: str, name: str, value: Any, allow_empty: bool) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or (not value and not allow_empty):
        raise invalid(
            where, name, value, "expected a list of layer sizes" + ("" if allow_empty else " (non-empty)")
        )
    if not all(is_int(v) and v >= 1 for v in value):
        raise invalid(where, name, list(value), "expected layer sizes that are integers >= 1")
    return tuple(value)


@dataclass(frozen=True)
class EmbeddingConfig:
    """How sparse features are embedded.

    Attributes:
        dim: embedding dimension of every table.
        pooling: ``sum`` or ``mean`` over the ids of a bag (a single id pools to itself either way; an
            empty bag pools to zeros).
        share_vocab_tables: a multi-hot feature with ``vocab_of: other`` looks up ``other``'s table
            (history items share the item embeddings).
        shared_tables: further groups of features that share one table; each group's features must have
            the same number of embeddings.
        history_pooling: ``mean`` (a history bag is pooled as any bag, by ``pooling``) or ``attention``
            (DIN target attention: a multi-hot feature that shares its table with a single-id feature, such
            as ``hist_items`` with ``item``, is the weighted sum of its ids' embeddings, weighted by an MLP
            of the candidate's embedding and each id's; see :mod:`recsys.modules.attention`).
        attention_hidden: attention: the hidden layer sizes of the attention MLP (may be empty).
    """

    dim: int = 16
    pooling: str = "mean"
    share_vocab_tables: bool = True
    shared_tables: tuple[tuple[str, ...], ...] = ()
    history_pooling: str = "mean"
    attention_hidden: tuple[int, ...] = (64, 32)

    def __post_init__(self) -> None:
        where = "model.embedding"
        check_int(where, "dim", self.dim, minimum=1)
        check_choice(where, "pooling", self.pooling, POOLINGS)
        check_choice(where, "history_pooling", self.history_pooling, HISTORY_POOLINGS)
        object.__setattr__(
            self, "attention_hidden", _check_sizes(where, "attention_hidden", self.attention_hidden, True)
        )
        if not isinstance(self.share_vocab_tables, bool):
            raise invalid(where, "share_vocab_tables", self.share_vocab_tables, "expected true or false")
        groups = self.shared_tables
        if not isinstance(groups, list | tuple) or not all(
            isinstance(g, list | tuple) and len(g) >= 2 and all(isinstance(n, str) for n in g) for g in groups
        ):
            raise invalid(where, "shared_tables", groups, "expected a list of lists of >= 2 feature names")
        object.__setattr__(self, "shared_tables", tuple(tuple(g) for g in groups))
        seen = [n for g in self.shared_tables for n in g]
        if len(seen) != len(set(seen)):
            raise invalid(
                where, "shared_tables", [list(g) for g in groups], "a feature may be in one group only"
            )


@dataclass(frozen=True)
class TaskConfig:
    """One prediction task.

    Attributes:
        name: the task's name: the key of its logit and of its loss.
        kind: ``binary`` (BCE on the logit) or ``regression`` (MSE on the output).
        label: the label column (defaults to ``name``).
        weight: the task's weight in the total loss.
        given: entire-space (ESMM) conditioning on another binary task: this task's tower models
            p(task | given), the model's logit for the task is that of p(given) * p(task | given), and
            its training label is label * given's label, on all rows (no sample-selection bias).
    """

    name: str
    kind: str = "binary"
    label: str = ""
    weight: float = 1.0
    given: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise invalid("model.tasks", "name", self.name, "expected a non-empty string")
        where = f"model.tasks[{self.name}]"
        check_choice(where, "kind", self.kind, TASK_KINDS)
        if not self.label:
            object.__setattr__(self, "label", self.name)
        check_number(where, "weight", self.weight, low=0.0, low_open=False)
        if not isinstance(self.given, str):
            raise invalid(where, "given", self.given, "expected a task name")
        if self.given and self.kind != "binary":
            raise invalid(where, "given", self.given, "entire-space conditioning needs kind 'binary'")
        if self.given == self.name:
            raise invalid(where, "given", self.given, "a task cannot be conditioned on itself")


@dataclass(frozen=True)
class GateConfig:
    """How gates mix experts (MMoE and PLE only).

    Attributes:
        type: ``softmax`` (dense: every expert, softmax weights) or ``noisy_topk`` (Shazeer et al. 2017:
            trainable Gaussian noise while training, the k best experts, weights renormalized over them).
        k: noisy_topk: experts per row.
        temperature: logits are divided by it before softmax and top-k (< 1 sharpens, > 1 flattens).
        noise: noisy_topk: add the trainable noise while training.
        load_balance_weight: weight of the auxiliary load-balancing loss (Switch Transformer form,
            E * sum_e fraction_routed_e * mean_gate_prob_e, averaged over gates); 0 turns it off.
        dispatch: noisy_topk: compute only the selected experts, each on at most
            ``capacity_factor * B * k / E`` rows per gate, instead of every expert on every row.
        capacity_factor: dispatch: the capacity's slack over a perfectly balanced load.
        overflow: dispatch: a row over an expert's capacity goes to its next-best expert with room
            (``fallback``) or goes on without that expert (``drop``, as Switch Transformer).
    """

    type: str = "softmax"
    k: int = 2
    temperature: float = 1.0
    noise: bool = True
    load_balance_weight: float = 0.0
    dispatch: bool = False
    capacity_factor: float = 1.25
    overflow: str = "fallback"

    def __post_init__(self) -> None:
        where = "model.gate"
        check_choice(where, "type", self.type, GATES)
        check_int(where, "k", self.k, minimum=1)
        check_number(where, "temperature", self.temperature)
        for name in ("noise", "dispatch"):
            if not isinstance(getattr(self, name), bool):
                raise invalid(where, name, getattr(self, name), "expected true or false")
        check_number(where, "load_balance_weight", self.load_balance_weight, low=0.0, low_open=False)
        check_number(where, "capacity_factor", self.capacity_factor)
        check_choice(where, "overflow", self.overflow, OVERFLOWS)
        if self.dispatch and self.type != "noisy_topk":
            raise invalid(where, "dispatch", self.dispatch, "dispatch needs type 'noisy_topk'")


@dataclass(frozen=True)
class ArchConfig:
    """The multi-task architecture between the embeddings and the task towers.

    Attributes:
        type: ``mmoe`` (shared experts, one gate per task), ``omoe`` (shared experts and one gate whose
            mixture every task's tower reads: the one-gate MoE baseline of the MMoE paper), ``ple`` (shared
            and task-specific experts in ``num_levels`` extraction levels; 1 level is CGC),
            ``shared_bottom`` (one MLP for all tasks) or ``single_task`` (one MLP per task; the tasks share
            only the embeddings).
        num_experts: mmoe and omoe: number of shared experts.
        num_shared_experts: ple: shared experts per level.
        num_task_experts: ple: experts per task per level (default 2); mmoe: each task's own experts,
            which only its gate mixes, beside the shared ones (default 0). One number for every task, or a
            list with one number per task, in task order (a task may have more experts than another).
        num_levels: ple: extraction levels.
        expert_hidden: layer sizes of each expert (of the bottom MLP for shared_bottom and single_task).
        tower_hidden: hidden layer sizes of each task tower (a final linear layer gives the logit).
        dropout: dropout after every hidden activation while training.
        interaction: ``none`` (the experts read the concatenated embeddings and dense features) or ``dot``
            (DLRM: the pairwise dot products of the embeddings and of the projected dense features are
            appended; see :mod:`recsys.modules.interaction`).
    """

    type: str = "mmoe"
    num_experts: int = 8
    num_shared_experts: int = 2
    num_task_experts: int | tuple[int, ...] | None = None
    num_levels: int = 1
    expert_hidden: tuple[int, ...] = (256, 128)
    tower_hidden: tuple[int, ...] = (64,)
    dropout: float = 0.0
    interaction: str = "none"

    def __post_init__(self) -> None:
        where = "model.arch"
        check_choice(where, "interaction", self.interaction, INTERACTIONS)
        check_choice(where, "type", self.type, ARCHS)
        check_int(where, "num_experts", self.num_experts, minimum=1)
        check_int(where, "num_shared_experts", self.num_shared_experts, minimum=0)
        check_int(where, "num_levels", self.num_levels, minimum=1)
        counts = self.num_task_experts
        if counts is None:
            counts = 2 if self.type == "ple" else 0
        if isinstance(counts, list | tuple):
            if not counts or not all(is_int(n) and n >= 0 for n in counts):
                raise invalid(where, "num_task_experts", list(counts), "expected integers >= 0, one per task")
            counts = tuple(counts)
        else:
            check_int(where, "num_task_experts", counts, minimum=0)
        object.__setattr__(self, "num_task_experts", counts)
        has_own = any(counts) if isinstance(counts, tuple) else bool(counts)
        if has_own and self.type not in ("mmoe", "ple"):
            raise invalid(
                where, "num_task_experts", counts, f"task experts need mmoe or ple, not {self.type}"
            )
        if self.type == "ple" and self.num_shared_experts + min(self.task_expert_counts(1)) == 0:
            shown = list(counts) if isinstance(counts, tuple) else counts
            raise invalid(where, "num_task_experts", shown, "ple needs at least one expert per gate")
        object.__setattr__(
            self, "expert_hidden", _check_sizes(where, "expert_hidden", self.expert_hidden, False)
        )
        object.__setattr__(self, "tower_hidden", _check_sizes(where, "tower_hidden", self.tower_hidden, True))
        if not is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise invalid(where, "dropout", self.dropout, "expected a number in [0, 1)")

    def task_expert_counts(self, num_tasks: int) -> tuple[int, ...]:
        """Each task's own experts (per level for ple): the list as given, or the one number repeated."""
        counts = self.num_task_experts
        return tuple(counts) if isinstance(counts, tuple) else (int(counts or 0),) * num_tasks

    def experts_per_gate(self, num_tasks: int = 1) -> int:
        """The fewest experts any gate mixes (the bound on top-k's k)."""
        fewest = min(self.task_expert_counts(num_tasks))
        if self.type == "ple":
            return self.num_shared_experts + fewest
        return self.num_experts + (fewest if self.type == "mmoe" else 0)


@dataclass(frozen=True)
class ModelConfig:
    """A ranking model: embeddings, multi-task architecture, gates and tasks.

    Attributes:
        tasks: the tasks, in output order.
        embedding: the sparse embedding config.
        arch: the multi-task architecture.
        gate: the gates (MMoE and PLE).
    """

    tasks: tuple[TaskConfig, ...]
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        where = "model"
        if not self.tasks:
            raise invalid(where, "tasks", self.tasks, "expected at least one task")
        names = [t.name for t in self.tasks]
        if len(names) != len(set(names)):
            raise invalid(where, "tasks", names, "task names must be unique")
        by_name = {t.name: t for t in self.tasks}
        for t in self.tasks:
            if not t.given:
                continue
            parent = by_name.get(t.given)
            if parent is None:
                where = f"model.tasks[{t.name}]"
                raise invalid(where, "given", t.given, f"expected one of the tasks {names}")
            if parent.kind != "binary" or parent.given:
                raise invalid(
                    f"model.tasks[{t.name}]",
                    "given",
                    t.given,
                    "the conditioning task must be binary and not conditioned itself",
                )
        counts = self.arch.num_task_experts
        if isinstance(counts, tuple) and len(counts) != len(self.tasks):
            raise invalid(
                "model.arch", "num_task_experts", list(counts), f"expected one number per task of {names}"
            )
        if self.arch.type == "ple" and self.arch.experts_per_gate(len(self.tasks)) == 0:
            raise invalid(
                "model.arch", "num_task_experts", list(counts), "ple needs at least one expert per gate"
            )
        if self.arch.type in ("mmoe", "omoe", "ple") and self.gate.type == "noisy_topk":
            n = self.arch.experts_per_gate(len(self.tasks))
            if self.gate.k > n:
                raise invalid("model.gate", "k", self.gate.k, f"expected at most the {n} experts of a gate")

    @classmethod
    def from_dict(cls, data: Any) -> ModelConfig:
        """Builds a config from plain data (as loaded from YAML)."""
        if not isinstance(data, dict):
            raise ValueError(f"model: expected a mapping, got {data!r}")
        data = dict(data)
        if "tasks" not in data:
            raise ValueError("model.tasks: missing required field")
        if not isinstance(data["tasks"], list | tuple):
            raise invalid("model", "tasks", data["tasks"], "expected a list of tasks")
        data["tasks"] = tuple(
            from_mapping(TaskConfig, t, f"model.tasks[{i}]") for i, t in enumerate(data["tasks"])
        )
        data["embedding"] = from_mapping(EmbeddingConfig, data.get("embedding") or {}, "model.embedding")
        data["arch"] = from_mapping(ArchConfig, data.get("arch") or {}, "model.arch")
        data["gate"] = from_mapping(GateConfig, data.get("gate") or {}, "model.gate")
        return from_mapping(cls, data, "model")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """Loads and validates a YAML model config."""
        with open(path) as fh:
            return cls.from_dict(yaml.safe_load(fh))


CONFIG_DIR = Path(__file__).parent / "configs"


def builtin_config(name: str) -> Path:
    """Path of a model config shipped with the package (``ecommerce_mmoe``, ``benchmark_mmoe``, ...)."""
    return shipped_config(CONFIG_DIR, name, "model config")
