"""The modules on tiny hand-written inputs: embeddings, stacked experts, multi-task architectures."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import FeatureLayout, SparseFeature
from recsys.modules.embedding import SparseArch, embedding_bag_collection, enable_sparse_gradients
from recsys.modules.experts import MLP, StackedExperts
from recsys.modules.gates import NoisyTopKGate, SoftmaxGate
from recsys.modules.multitask import PLE, MMoE, OMoE, SharedBottom, SingleTask

TASKS = ["click", "purchase"]


def softmax_gates(d: int, e: int) -> SoftmaxGate:
    return SoftmaxGate(d, e)


def top2_gates(d: int, e: int) -> NoisyTopKGate:
    return NoisyTopKGate(d, e, k=2)


# ------------------------------------------------------------------------------------ embeddings


LAYOUT = FeatureLayout(
    sparse=(
        SparseFeature("item", 5),
        SparseFeature("user", 3),
        SparseFeature("hist", 5, multi_hot=True, table="item"),
    ),
    dense=("price",),
)
# 2 rows; hist: row 0 is the bag [1, 2, 4], row 1 is empty.
KJT = KeyedJaggedTensor(
    keys=["item", "user", "hist"],
    values=torch.tensor([1, 3, 2, 0, 1, 2, 4]),
    lengths=torch.tensor([1, 1, 1, 1, 3, 0]),
)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_sparse_arch_pools_shared_tables_in_key_order(pooling):
    torch.manual_seed(0)
    ebc = embedding_bag_collection(LAYOUT, dim=2, pooling=pooling)
    assert [c.name for c in ebc.embedding_bag_configs()] == ["t_item", "t_user"]
    arch = SparseArch(ebc, LAYOUT.keys)
    out = arch(KJT)  # (B, F, D)
    assert out.shape == (2, 3, 2)
    item = ebc.embedding_bags["t_item"].weight
    user = ebc.embedding_bags["t_user"].weight
    torch.testing.assert_close(out[:, 0], item[[1, 3]])
    torch.testing.assert_close(out[:, 1], user[[2, 0]])
    bag = item[[1, 2, 4]].sum(0)
    torch.testing.assert_close(out[0, 2], bag if pooling == "sum" else bag / 3)
    torch.testing.assert_close(out[1, 2], torch.zeros(2))  # an empty bag pools to zeros


def test_sparse_gradients_touch_only_looked_up_rows():
    torch.manual_seed(0)
    ebc = embedding_bag_collection(LAYOUT, dim=2)
    params = enable_sparse_gradients(ebc)
    SparseArch(ebc, LAYOUT.keys)(KJT).sum().backward()
    grad = params[0].grad
    assert grad.is_sparse and set(grad.coalesce().indices()[0].tolist()) == {1, 2, 3, 4}


# --------------------------------------------------------------------------------------- experts


def test_stacked_experts_equal_separate_mlps():
    torch.manual_seed(0)
    experts = StackedExperts(num_experts=3, in_dim=4, hidden=[5, 2])
    x = torch.randn(6, 4)
    out = experts(x)  # (E, B, H)
    assert out.shape == (3, 6, 2)
    w0 = experts.first_weight.view(4, 3, 5)
    b0 = experts.first_bias.view(3, 5)
    for e in range(3):  # the reference: each expert as its own MLP
        mlp = MLP(4, [5, 2])
        with torch.no_grad():
            mlp.layers[0].weight.copy_(w0[:, e].T)
            mlp.layers[0].bias.copy_(b0[e])
            mlp.layers[1].weight.copy_(experts.weights[0][e].T)
            mlp.layers[1].bias.copy_(experts.biases[0][e, 0])
        torch.testing.assert_close(out[e], mlp(x))
    torch.testing.assert_close(experts.forward_per_expert(x.expand(3, 6, 4)), out)


# -------------------------------------------------------------------------------- architectures


def test_architecture_shapes():
    torch.manual_seed(0)
    x = torch.randn(5, 7)
    archs = [
        MMoE(7, TASKS, num_experts=4, expert_hidden=[8, 6], make_gate=softmax_gates),
        PLE(
            7,
            TASKS,
            num_shared_experts=2,
            num_task_experts=1,
            num_levels=2,
            expert_hidden=[8, 6],
            make_gate=softmax_gates,
        ),
        SharedBottom(7, 2, [8, 6]),
        SingleTask(7, 2, [8, 6]),
    ]
    for arch in archs:
        reps, stats = arch(x)
        assert [r.shape for r in reps] == [(5, 6), (5, 6)] and arch.out_dim == 6
    _, stats = archs[0](x)
    assert stats["moe/click/load"].shape == (4,) and stats["moe/aux_loss"].dim() == 0
    _, stats = archs[1](x)
    assert stats["moe/level0/shared/load"].shape == (2 + 2 * 1,)  # the shared gate mixes all 4 experts
    assert stats["moe/level1/click/load"].shape == (3,)  # a task gate: 2 shared + 1 own
    assert "moe/level1/shared/load" not in stats  # no shared gate after the last level


def test_task_experts_per_task_and_one_gate_for_all():
    torch.manual_seed(0)
    x = torch.randn(5, 7)
    mixed = MMoE(7, TASKS, num_experts=2, expert_hidden=[8], make_gate=softmax_gates, num_task_experts=[3, 1])
    reps, stats = mixed(x)
    assert mixed.layer.num_experts == 2 + 3 + 1
    assert stats["moe/click/load"].shape == (5,) and stats["moe/purchase/load"].shape == (3,)
    assert mixed.layer.gate_experts[1, :3].tolist() == [0, 1, 5]  # shared 0-1, then purchase's own expert 5
    ple = PLE(7, TASKS, 1, [2, 0], num_levels=2, expert_hidden=[8, 6], make_gate=softmax_gates)
    _, stats = ple(x)
    assert stats["moe/level1/click/load"].shape == (3,) and stats["moe/level1/purchase/load"].shape == (1,)
    assert stats["moe/level0/shared/load"].shape == (3,)
    with pytest.raises(ValueError, match=r"model\.arch\.num_task_experts: expected one number per task"):
        PLE(7, TASKS, 0, [1, 0], num_levels=1, expert_hidden=[8], make_gate=softmax_gates)
    omoe = OMoE(7, 2, num_experts=4, expert_hidden=[8], make_gate=softmax_gates)
    reps, stats = omoe(x)
    assert reps[0] is reps[1] and stats["moe/shared/load"].shape == (4,)
    assert len(omoe.layer.gates) == 1


def assert_every_expert_and_gate_has_gradient(module: torch.nn.Module) -> None:
    """Every expert's slice of the stacked weights, and every gate row, has a non-zero gradient."""
    checked = 0
    for m in module.modules():
        if isinstance(m, StackedExperts):
            e, h1 = m.num_experts, m.hidden[0]
            per_expert = [
                m.first_weight.grad.view(m.in_dim, e, h1).abs().sum(dim=(0, 2)),
                m.first_bias.grad.view(e, h1).abs().sum(dim=1),
            ]
            per_expert += [p.grad.abs().sum(dim=(1, 2)) for p in [*m.weights, *m.biases]]
            assert all((g > 0).all() for g in per_expert), per_expert
            checked += 1
        if isinstance(m, SoftmaxGate | NoisyTopKGate):
            assert (m.linear.weight.grad.abs().sum(dim=1) > 0).all()  # (E, D): a row per expert
            if isinstance(m, NoisyTopKGate):
                assert m.noise_linear.weight.grad.abs().sum() > 0
            checked += 1
    assert checked


@pytest.mark.parametrize("gates", [softmax_gates, top2_gates])
def test_gradients_reach_every_expert_and_gate(gates):
    torch.manual_seed(0)
    x = torch.randn(64, 7)
    for arch in (
        MMoE(7, TASKS, num_experts=4, expert_hidden=[8, 6], make_gate=gates),
        MMoE(7, TASKS, num_experts=2, expert_hidden=[8, 6], make_gate=gates, num_task_experts=[2, 1]),
        OMoE(7, 2, num_experts=4, expert_hidden=[8, 6], make_gate=gates),
        PLE(
            7,
            TASKS,
            num_shared_experts=2,
            num_task_experts=2,
            num_levels=2,
            expert_hidden=[8, 6],
            make_gate=gates,
        ),
    ):
        reps, stats = arch(x)  # training mode: noisy gates
        (sum(r.sum() for r in reps) + stats["moe/aux_loss"]).backward()
        assert_every_expert_and_gate_has_gradient(arch)


def dispatch_pair(arch: str, overflow: str = "fallback", capacity_factor: float = 100.0):
    """The same module twice: dense top-k, and top-k dispatch (same parameters)."""

    def build(cf):
        torch.manual_seed(0)
        if arch == "mmoe":
            return MMoE(
                7,
                TASKS,
                num_experts=6,
                expert_hidden=[8, 6],
                make_gate=top2_gates,
                capacity_factor=cf,
                overflow=overflow,
            )
        return PLE(
            7,
            TASKS,
            num_shared_experts=3,
            num_task_experts=2,
            num_levels=2,
            expert_hidden=[8, 6],
            make_gate=top2_gates,
            capacity_factor=cf,
            overflow=overflow,
        )

    return build(None).eval(), build(capacity_factor).eval()


@pytest.mark.parametrize("arch", ["mmoe", "ple"])
def test_dense_and_dispatch_top_k_agree_without_overflow(arch):
    dense, dispatch = dispatch_pair(arch)
    x = torch.randn(40, 7, requires_grad=True)
    want, want_stats = dense(x)
    got, got_stats = dispatch(x)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b)
    assert got_stats["moe/overflow"].item() == 0
    for key, value in want_stats.items():
        torch.testing.assert_close(got_stats[key], value)
    # Gradients agree as well.
    grads = []
    for module in (dense, dispatch):
        x.grad = None
        sum((r * torch.arange(6.0)).sum() for r in module(x)[0]).backward()
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_dispatch_with_small_capacity_counts_overflow():
    torch.manual_seed(1)
    x = torch.randn(48, 7)
    dense, drop = dispatch_pair("mmoe", "drop", capacity_factor=0.5)
    _, fallback = dispatch_pair("mmoe", "fallback", capacity_factor=0.5)
    _, stats = dense(x)
    out_drop, stats_drop = drop(x)
    out_fallback, stats_fallback = fallback(x)
    cap = stats_drop["moe/click/capacity"].item()
    assert cap == 8  # ceil(0.5 * 48 * 2 / 6)
    for task in TASKS:
        # Expected overflow from the dense routing: per expert, the assignments beyond its capacity.
        counts = (stats[f"moe/{task}/load"] * 48 * 2).round().long()
        expected = (counts - cap).clamp(min=0).sum().item()
        assert stats_drop[f"moe/{task}/overflow"].item() == expected > 0
        assert stats_fallback[f"moe/{task}/overflow"].item() == expected
        assert stats_drop[f"moe/{task}/dropped"].item() == expected
        # Fallback fills every expert: 6 experts x 8 slots hold 48 of the 96 assignments.
        assert stats_fallback[f"moe/{task}/dropped"].item() == 96 - 48
    assert stats_drop["moe/overflow"].item() == sum(stats_drop[f"moe/{t}/overflow"].item() for t in TASKS)
    assert all(torch.isfinite(o).all() for o in out_drop + out_fallback)


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_quantized_bags_pool_as_the_float_tables_do_within_their_precision(pooling):
    from recsys.modules.quantized import QuantizedBags

    torch.manual_seed(0)
    layout = FeatureLayout(
        sparse=(
            SparseFeature("item", 50),
            SparseFeature("user", 7),
            SparseFeature("hist", 50, multi_hot=True, table="item"),
        )
    )
    bags = embedding_bag_collection(layout, dim=8, pooling=pooling)
    for bag in bags.embedding_bags.values():
        torch.nn.init.normal_(bag.weight, std=1.0)
    # 3 rows; the second row's history is empty (pools to zeros).
    kjt = KeyedJaggedTensor(
        keys=["item", "user", "hist"],
        values=torch.tensor([1, 2, 3, 4, 5, 6, 10, 11, 12, 13]),
        lengths=torch.tensor([1, 1, 1, 1, 1, 1, 3, 0, 1]),
    )
    expected = bags(kjt)
    for dtype, atol in {"fp16": 1e-2, "int8": 5e-2, "int4": 0.6}.items():
        got = QuantizedBags(bags, dtype)(kjt)
        assert got.keys() == expected.keys() and got.values().dtype == torch.float32
        error = (got.values() - expected.values()).abs()
        assert 0 < error.max() < atol, (dtype, error.max())
        assert got["hist"][1].abs().max() == 0  # the empty bag
