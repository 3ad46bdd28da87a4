"""The ranking model: sparse arch, multi-task arch and task towers, returning per-task logits.

:class:`RankingModel` is pure: it returns ``(logits, stats)`` and computes no loss (the training wrapper
is :class:`recsys.losses.RankingTrain`, as TorchRec's ``DLRM`` / ``DLRMTrain``). :func:`build_model` is the
adapter from a :class:`~recsys.config.ModelConfig` and a :class:`~recsys.data.batch.FeatureLayout` to modules.

For batch scoring, :func:`export_model` gives a ``torch.export`` program of the whole unsharded model,
embedding lookups included, taking ``(dense, values, lengths)``: plain tensors with a dynamic batch size,
that can be saved with ``torch.export.save`` and run without this package's Python classes.
``torch.export`` rather than ``torch.jit.script``: TorchScript is deprecated in PyTorch and would restrict
this code to its Python subset, whereas non-strict export traces the eager code as written, including
TorchRec's ``EmbeddingBagCollection`` on CPU.

Example:
    >>> from recsys.config import ModelConfig
    >>> from recsys.data.batch import FeatureLayout, SparseFeature
    >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    >>> layout = FeatureLayout(sparse=(SparseFeature("item", 10),), dense=("price",), labels=("click",))
    >>> cfg = ModelConfig.from_dict({"tasks": [{"name": "click"}], "embedding": {"dim": 4},
    ...                              "arch": {"num_experts": 2, "expert_hidden": [8], "tower_hidden": []}})
    >>> model = build_model(cfg, layout)
    >>> kjt = KeyedJaggedTensor(keys=["item"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    >>> logits, stats = model(torch.zeros(2, 1), kjt)
    >>> logits["click"].shape
    torch.Size([2])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.balancing import scale_grad
from recsys.config import ModelConfig
from recsys.data.batch import Batch, FeatureLayout
from recsys.modules.attention import HistoryArch, history_queries
from recsys.modules.embedding import SparseArch, embedding_bag_collection, embedding_collection
from recsys.modules.experts import MLP
from recsys.modules.gates import NoisyTopKGate, SoftmaxGate
from recsys.modules.interaction import DotInteraction
from recsys.modules.multitask import PLE, GatedExperts, MMoE, OMoE, SharedBottom, SingleTask

_LN2 = math.log(2.0)


def entire_space_logit(parent: torch.Tensor, conditional: torch.Tensor) -> torch.Tensor:
    """The logit of ``sigmoid(parent) * sigmoid(conditional)``, computed in log space (ESMM).

    Args:
        parent: ``(B,)`` logits of p(parent), e.g. p(click).
        conditional: ``(B,)`` logits of p(task | parent), e.g. p(purchase | click).

    Returns:
        ``(B,)`` logits of p(parent and task); its sigmoid never exceeds ``sigmoid(parent)``.
    """
    # log p < 0 strictly, so that log(1 - p) stays finite even when both probabilities round to 1.
    log_p = (F.logsigmoid(parent) + F.logsigmoid(conditional)).clamp(max=-1e-30)
    # log(1 - exp(x)) by the stable branch for each range (Maechler 2012); both branches get safe inputs so
    # that the unused one cannot put NaN into the gradient.
    near_zero = torch.log(-torch.expm1(log_p.clamp(min=-_LN2)))
    far = torch.log1p(-torch.exp(log_p.clamp(max=-_LN2)))
    return log_p - torch.where(log_p > -_LN2, near_zero, far)


class Tower(nn.Module):
    """A task head: an MLP and a final linear layer to one output.

    Args:
        in_dim: the representation size.
        hidden: hidden layer sizes (may be empty).
        dropout: dropout after each hidden activation.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, hidden, dropout)
        self.out = nn.Linear(self.mlp.out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H)`` -> ``(B,)`` logit (or regression output)."""
        return self.out(self.mlp(x)).squeeze(-1)


class RankingModel(nn.Module):
    """Embeddings, a multi-task architecture and one tower per task.

    The multi-task architecture reads the pooled embeddings of every sparse feature and the dense
    features, concatenated: ``(B, F * D + n_dense)``, followed by their pairwise dot products when an
    interaction module is given. With target attention, the history features and their candidates come
    from ``history_arch``, after the pooled ones.

    A model without sparse features (``sparse_arch`` and ``history_arch`` both ``None``) reads the dense
    features only: ``(B, n_dense)``.

    Args:
        sparse_arch: pools the sparse features to ``(B, F, D)`` (``None`` when ``history_arch`` has them
            all, or when there are none).
        multitask: maps the ``(B, in_dim)`` inputs to one representation per task and statistics.
        towers: one tower per task, in task order.
        given: entire-space (ESMM) tasks: task -> the binary task it is conditioned on.
        interaction: maps ``(B, F, D)`` and ``(B, n_dense)`` to the ``(B, in_dim)`` inputs; ``None``
            concatenates them.
        history_arch: the attended histories and their candidates, ``(B, F_h, D)``; ``None`` pools every
            feature in ``sparse_arch``.

    Returns of ``forward``: ``(logits, stats)``. ``logits[task]`` is ``(B,)``; for an entire-space task it is
    the logit of p(given and task), and ``logits[f"{task}_given_{given}"]`` is the conditional tower's.
    ``stats`` holds the routing statistics (``moe/...``; empty without gates), ``moe/aux_loss`` with gradient.
    """

    def __init__(
        self,
        sparse_arch: SparseArch | None,
        multitask: nn.Module,
        towers: nn.ModuleDict,
        given: Mapping[str, str],
        interaction: nn.Module | None = None,
        history_arch: HistoryArch | None = None,
    ) -> None:
        super().__init__()
        self.sparse_arch = sparse_arch
        self.history_arch = history_arch
        self.interaction = interaction
        self.multitask = multitask
        self.towers = towers
        self.task_names = list(towers.keys())
        self.given = dict(given)
        # Set by the training wrapper for PCGrad: each tower input's gradient is scaled by its task's entry.
        self.grad_scales: torch.Tensor | None = None

    @property
    def keys(self) -> list[str]:
        """The sparse features the model reads, in the order of its embedded features."""
        return [
            *(self.sparse_arch.keys if self.sparse_arch else []),
            *(self.history_arch.keys if self.history_arch else []),
        ]

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The embedding tables' weights (trained by a sparse optimizer; the rest is dense)."""
        params = list(self.sparse_arch.parameters()) if self.sparse_arch else []
        if self.history_arch:
            params += self.history_arch.embedding_collection.parameters()
        return params

    def forward(
        self, dense: torch.Tensor, sparse: KeyedJaggedTensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Scores a batch.

        Args:
            dense: ``(B, n_dense)`` float features.
            sparse: the id features, keys in layout order.

        Returns:
            ``(logits, stats)``, see the class docstring.
        """
        return self.heads(self.inputs(dense, sparse))

    def inputs(self, dense: torch.Tensor, sparse: KeyedJaggedTensor | None) -> torch.Tensor:
        """The multi-task architecture's ``(B, in_dim)`` input: embeddings and dense features."""
        parts = [arch(sparse) for arch in (self.sparse_arch, self.history_arch) if arch is not None]
        if not parts:
            return dense  # a dense-only model
        embedded = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, F, D)
        if self.interaction is None:
            return torch.cat([embedded.flatten(1), dense], dim=1)  # (B, F * D + n_dense)
        return self.interaction(embedded, dense)  # (B, in_dim)

    def heads(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """From the ``(B, in_dim)`` input to ``(logits, stats)``: the multi-task architecture and towers."""
        representations, stats = self.multitask(x)  # T x (B, H)
        if self.grad_scales is not None:
            representations = [scale_grad(h, self.grad_scales, t) for t, h in enumerate(representations)]
        logits = {
            name: tower(h) for (name, tower), h in zip(self.towers.items(), representations, strict=True)
        }
        for task, parent in self.given.items():
            logits[f"{task}_given_{parent}"] = logits[task]
            logits[task] = entire_space_logit(logits[parent], logits[task])
        return logits, stats


def build_model(
    config: ModelConfig, layout: FeatureLayout, embedding_device: torch.device | str | None = None
) -> RankingModel:
    """Builds the model a config describes for the inputs of a layout.

    Args:
        config: the model config.
        layout: the feature layout (its table sharing must come from ``config.embedding``).
        embedding_device: where to allocate the embedding tables; ``"meta"`` defers them, for sharding
            with TorchRec's ``DistributedModelParallel``.

    A layout without sparse features gives a dense-only model (no tables; e.g. the MMoE paper's
    synthetic regression).

    Raises:
        ValueError: a task's label is not among the layout's labels, or the layout has no input at all.
    """
    for task in config.tasks:
        if layout.labels and task.label not in layout.labels:
            raise ValueError(
                f"model.tasks[{task.name}].label: expected one of the spec's labels "
                f"{list(layout.labels)}, got {task.label!r}"
            )
    if not layout.sparse and not layout.dense:
        raise ValueError("layout: the model needs at least one sparse or dense feature, got none")
    emb, arch, gate = config.embedding, config.arch, config.gate
    device = torch.device(embedding_device) if embedding_device else None
    sparse_arch, history_arch = _embedding_archs(config, layout, device) if layout.sparse else (None, None)
    if arch.interaction == "dot" and not layout.sparse:
        raise ValueError("model.arch.interaction: 'dot' needs sparse features, the layout has none")
    interaction = (
        DotInteraction(len(layout.sparse), emb.dim, len(layout.dense)) if arch.interaction == "dot" else None
    )
    in_dim = interaction.out_dim if interaction else len(layout.sparse) * emb.dim + len(layout.dense)
    names = [t.name for t in config.tasks]

    def make_gate(gate_in: int, num_experts: int) -> nn.Module:
        if gate.type == "softmax":
            return SoftmaxGate(gate_in, num_experts, gate.temperature)
        return NoisyTopKGate(gate_in, num_experts, gate.k, gate.temperature, gate.noise)

    # Dispatch settings; None computes every expert on every row.
    routing = {"capacity_factor": gate.capacity_factor if gate.dispatch else None, "overflow": gate.overflow}
    experts = {"expert_hidden": arch.expert_hidden, "make_gate": make_gate, "dropout": arch.dropout}
    own = arch.task_expert_counts(len(names))
    if arch.type == "mmoe":
        multitask: nn.Module = MMoE(
            in_dim, names, num_experts=arch.num_experts, **experts, **routing, num_task_experts=own
        )
    elif arch.type == "omoe":
        multitask = OMoE(in_dim, len(names), num_experts=arch.num_experts, **experts, **routing)
    elif arch.type == "ple":
        multitask = PLE(
            in_dim,
            names,
            num_shared_experts=arch.num_shared_experts,
            num_task_experts=own,
            num_levels=arch.num_levels,
            **experts,
            **routing,
        )
    elif arch.type == "shared_bottom":
        multitask = SharedBottom(in_dim, len(names), arch.expert_hidden, arch.dropout)
    else:
        multitask = SingleTask(in_dim, len(names), arch.expert_hidden, arch.dropout)
    towers = nn.ModuleDict({n: Tower(multitask.out_dim, arch.tower_hidden, arch.dropout) for n in names})
    given = {t.name: t.given for t in config.tasks if t.given}
    return RankingModel(sparse_arch, multitask, towers, given, interaction, history_arch)


def _embedding_archs(
    config: ModelConfig, layout: FeatureLayout, device: torch.device | None
) -> tuple[SparseArch | None, HistoryArch | None]:
    """The pooled tables and, with ``history_pooling: attention``, the attended ones."""
    emb = config.embedding
    if emb.history_pooling == "mean":
        return SparseArch(embedding_bag_collection(layout, emb.dim, emb.pooling, device), layout.keys), None
    queries = history_queries(layout)
    if not queries:
        raise ValueError(
            "model.embedding.history_pooling: attention needs a multi-hot feature sharing its table with a "
            f"single-id feature (share_vocab_tables or shared_tables), got {emb.history_pooling!r} and "
            f"tables { ({t: list(f) for t, (_, f) in layout.tables.items()}) }"
        )
    # Every feature of an attended table moves to the EmbeddingCollection (a table is in one collection).
    attended = {f.table for f in layout.sparse if f.name in queries}
    history_keys = [f.name for f in layout.sparse if f.table in attended]
    history_arch = HistoryArch(
        embedding_collection(layout, emb.dim, attended, device), history_keys, queries, emb.attention_hidden
    )
    pooled_keys = [k for k in layout.keys if k not in history_keys]
    if not pooled_keys:
        return None, history_arch
    bags = embedding_bag_collection(layout, emb.dim, emb.pooling, device, exclude=attended)
    return SparseArch(bags, pooled_keys), history_arch


class FlatInputs(nn.Module):
    """The model with its ``KeyedJaggedTensor`` input taken apart into plain tensors, for export.

    Args:
        model: the ranking model.
        keys: the sparse keys, in layout order.
    """

    def __init__(self, model: RankingModel, keys: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.keys = list(keys)

    def forward(
        self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Runs the model on a KJT rebuilt from its parts.

        Args:
            dense: ``(B, n_dense)``.
            values: ``(N,)`` the ids of every key, key-major.
            lengths: ``(F * B,)`` ids per (key, row).
        """
        return self.model(dense, KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths))


def export_model(model: RankingModel, example: Batch) -> torch.export.ExportedProgram:
    """Exports the model in eval mode for batch scoring, with a dynamic batch size.

    The program takes ``(dense, values, lengths)`` = ``(batch.dense, batch.sparse.values(),
    batch.sparse.lengths())`` and returns ``(logits, stats)`` as the eager model in eval mode. Save it
    with ``torch.export.save`` and run ``torch.export.load(path).module()(dense, values, lengths)``.

    Args:
        model: the model (its training mode is restored afterwards).
        example: a batch of at least 2 rows with the model's layout.

    Raises:
        ValueError: the model uses top-k dispatch (data-dependent routing that export cannot trace); export
            a copy built with ``gate.dispatch: false``, which has the same parameters; or the model uses
            target attention (history lengths are data-dependent shapes); score it eagerly, as the model
            package does.
    """
    if any(isinstance(m, GatedExperts) and m.capacity_factor is not None for m in model.modules()):
        raise ValueError("model.gate.dispatch: export traces the dense path only, got dispatch true")
    if model.history_arch is not None:
        raise ValueError("model.embedding.history_pooling: export supports mean only, got 'attention'")
    keys = example.sparse.keys()
    if sorted(keys) != sorted(model.keys):
        raise ValueError(f"batch.sparse: expected keys {model.keys}, got {keys}")
    batch = torch.export.Dim("batch", min=1)
    ids = torch.export.Dim("ids", min=1)
    dynamic = {"dense": {0: batch}, "values": {0: ids}, "lengths": {0: len(keys) * batch}}
    was_training = model.training
    model.eval()
    args = (example.dense, example.sparse.values(), example.sparse.lengths())
    try:
        # Size-oblivious reasoning for the batch size: without it, a view in TorchRec's KJT.to_dict makes
        # export specialise on B != 1 and the program would refuse one-row batches.
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            return torch.export.export(FlatInputs(model, keys), args, dynamic_shapes=dynamic, strict=False)
    finally:
        model.train(was_training)
