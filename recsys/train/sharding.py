"""A worker's share of the model: TorchRec-sharded embedding tables and the optimizers that train them.

:func:`build_sharded_model` builds the model with its tables on the ``meta`` device, asks TorchRec's
planner for a plan over all workers (table-wise by default: whole tables live on one worker each) and wraps
it in ``DistributedModelParallel``. Tables train with a fused sparse optimizer (only the rows a batch
touches are updated), dense parameters with Adam.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from recsys.balancing import TaskBalancer
from recsys.data.batch import FeatureLayout
from recsys.losses import RankingTrain
from recsys.model import build_model
from recsys.precision import resolve_precision
from recsys.train.config import TrainConfig, TrainingSettings

if TYPE_CHECKING:  # polars, which features.spec needs, is not needed to shard or step the model
    from features.spec import FeatureSpec


@dataclass
class ShardedModel:
    """A worker's share of the model and everything that trains it."""

    dmp: torch.nn.Module  # DistributedModelParallel(RankingTrain)
    optimizer: Any  # CombinedOptimizer(fused sparse, Adam dense)
    dense_optimizer: Any  # the Adam part, whose state is created lazily
    plan: Any
    layout: FeatureLayout
    device: torch.device
    train_module: Any = None  # the RankingTrain inside dmp (its balancer looks at the task gradients)
    autocast_dtype: Any = None  # bf16 under training.precision bf16 (or auto with bf16 units); None: fp32
    precision_line: str = "precision fp32"


def _fused_optimizer(name: str) -> type:
    from torchrec.optim import RowWiseAdagrad

    return {"rowwise_adagrad": RowWiseAdagrad, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]


def _fused_params(t: TrainingSettings) -> dict[str, Any]:
    """The tables' fused optimizer settings: learning rate, and decay of the rows a batch touches."""
    params: dict[str, Any] = {"lr": t.embedding_lr}
    if t.embedding_weight_decay:
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode

        params |= {"weight_decay": t.embedding_weight_decay, "weight_decay_mode": WeightDecayMode.DECOUPLE}
    return params


def set_epoch_lr(sharded: ShardedModel, t: TrainingSettings, epoch: int) -> float:
    """Sets the epoch's learning rates (``training.lr_decay``); returns the factor on the first epoch's.

    From epoch ``training.embedding_epochs`` on (when set), the tables' rate is 0: they are frozen. With
    ``training.embedding_reinit`` the tables keep the first epoch's rate (they start afresh every epoch);
    the decay then applies to the dense layers only.

    The fused table optimizers pass the rate of their parameter groups to their kernels at ``step`` and
    ``zero_grad`` (TorchRec's ``EmbeddingFusedOptimizer``); ``zero_grad`` here makes the epoch's first
    batch use it already.
    """
    factor = t.lr_decay**epoch
    frozen = bool(t.embedding_epochs) and epoch >= t.embedding_epochs
    # Tables drawn anew each epoch (embedding_reinit) train as in the first epoch: at its rate.
    table_rate = 0.0 if frozen else t.embedding_lr * (1.0 if t.embedding_reinit else factor)
    for group in sharded.dmp.fused_optimizer.param_groups:
        group["lr"] = table_rate
    sharded.dmp.fused_optimizer.zero_grad()
    for group in sharded.dense_optimizer.param_groups:
        group["lr"] = t.dense_lr * factor
    return factor


def reinit_tables(sharded: ShardedModel, seed: int) -> None:
    """Draws every table anew, as TorchRec initialises it, and clears the tables' optimizer state.

    ``training.embedding_reinit`` calls it at the start of each epoch after the first: the dense layers
    keep what they learnt, the rows start again (MEDA, Fan et al. 2024, "Multi-Epoch learning with Data
    Augmentation for deep CTR models"). A later pass then never shows the dense layers rows that were
    trained on the very impressions of the batch, which is what makes deep CTR models overfit from their
    second epoch on (Zhang et al. 2022, "Towards understanding the overfitting phenomenon of deep
    click-through rate models").

    A table's values depend on ``seed`` and its name only, never on the sharding plan or the number of
    workers (:func:`_drawn`): each worker fills its shards with their part of the whole table, so a run
    resumed on other workers draws the tables the uninterrupted run drew. The values are written into the
    tables' storage in place: the shards of TorchRec's state dict are views of the fused kernels' weights.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    with torch.no_grad():
        for key, value in sorted(sharded.dmp.state_dict().items()):
            if isinstance(value, ShardedTensor):
                parts = [(s.tensor, s.metadata.shard_offsets) for s in value.local_shards()]
            elif key.endswith(".weight") and (".embedding_bags." in key or ".embeddings." in key):
                parts = [(value, [0, 0])]  # a replicated table (data-parallel sharding): drawn whole
            else:
                continue
            for part, offsets in parts:
                part.copy_(_drawn(key, tuple(value.size()), offsets, tuple(part.size()), seed))
        for state in sharded.dmp.fused_optimizer.state.values():
            for value in state.values():
                parts = (
                    [shard.tensor for shard in value.local_shards()]
                    if isinstance(value, ShardedTensor)
                    else [value]
                )
                for part in parts:
                    part.zero_()


_DRAW_ROWS = 65_536  # a table is drawn in blocks of rows, each from its own generator


def _drawn(
    key: str, size: tuple[int, int], offsets: list[int], part: tuple[int, int], seed: int
) -> torch.Tensor:
    """Rows and columns ``offsets : offsets + part`` of the table ``key`` of ``size`` drawn whole.

    TorchRec's initialisation, ``U(-1/sqrt(rows), 1/sqrt(rows))``, drawn in blocks of :data:`_DRAW_ROWS`
    rows from generators seeded by ``seed``, the table's name and the block: a worker draws only the
    blocks its part overlaps (at their full width), whatever the plan cut the table into.
    """
    import zlib

    rows, dim = size
    (r0, c0), (nr, nc) = offsets, part
    bound = (1.0 / rows) ** 0.5
    out = torch.empty(nr, nc)
    salt = zlib.crc32(key.encode())
    for block in range(r0 // _DRAW_ROWS, (r0 + nr - 1) // _DRAW_ROWS + 1):
        lo, hi = block * _DRAW_ROWS, min(rows, (block + 1) * _DRAW_ROWS)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + salt * 1009 + block)
        values = torch.empty(hi - lo, dim).uniform_(-bound, bound, generator=generator)
        a, b = max(lo, r0), min(hi, r0 + nr)
        out[a - r0 : b - r0] = values[a - lo : b - lo, c0 : c0 + nc]
    return out


def _dense_optimizer(params: Any, t: TrainingSettings) -> torch.optim.Optimizer:
    """Adam over the dense parameters; AdamW with ``dense_weight_decay``.

    Fused: one kernel over all parameters instead of ~6 elementwise ops per parameter (CPU and CUDA).
    """
    if t.dense_weight_decay:
        return torch.optim.AdamW(params, lr=t.dense_lr, weight_decay=t.dense_weight_decay, fused=True)
    return torch.optim.Adam(params, lr=t.dense_lr, fused=True)


def build_sharded_model(config: TrainConfig, spec: FeatureSpec, device: torch.device) -> ShardedModel:
    """Builds the model on the meta device, plans its tables over all workers and shards it.

    Must run in every worker of an initialised process group, with the same seed: dense parameters are
    created identically everywhere (DDP also broadcasts them), tables are materialised by their owners.
    """
    return shard_model(config, FeatureLayout.from_spec(spec, config.model.embedding), device)


def shard_model(config: TrainConfig, layout: FeatureLayout, device: torch.device) -> ShardedModel:
    """:func:`build_sharded_model` for a layout given directly (benchmarks build one without a spec)."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    t = config.training
    torch.manual_seed(t.seed)
    model = build_model(config.model, layout, embedding_device="meta")
    train_module = RankingTrain.from_config(model, config.model, task_balancer(config))
    apply_optimizer_in_backward(
        _fused_optimizer(t.embedding_optimizer), model.embedding_parameters(), _fused_params(t)
    )
    world = dist.get_world_size()
    constraints = None
    if t.sharding != "auto":
        tables = [f"t_{name}" for name in layout.tables]
        constraints = {name: ParameterConstraints(sharding_types=[t.sharding]) for name in tables}
    topology = Topology(world_size=world, compute_device=device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    # EmbeddingCollection: the unpooled tables of target attention (recsys.modules.attention).
    sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
    plan = planner.collective_plan(train_module, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(train_module, device=device, plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: _dense_optimizer(params, t),
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    dtype, line = resolve_precision(t.precision, device)
    return ShardedModel(dmp, optimizer, dense, plan, layout, device, train_module, dtype, line)


def task_balancer(config: TrainConfig) -> TaskBalancer:
    """The run's task balancer (``training.task_balancing``)."""
    t = config.training
    return TaskBalancer(config.model.tasks, t.task_balancing, t.gradnorm_alpha, t.gradnorm_lr)


def plan_ranks(plan: Any) -> str:
    """``table:ranks`` for every table of a sharding plan, e.g. ``t_item:[0] t_user:[1]``."""
    parts = []
    for module_plan in plan.plan.values():
        for table, sharding in module_plan.items():
            parts.append(f"{table}:{sharding.ranks}")
    return " ".join(sorted(parts))
