"""Gates, the load-balancing loss, routing statistics and capacity-limited routing."""

from __future__ import annotations

import math

import pytest
import torch

from recsys.modules.gates import (
    GateOutput,
    NoisyTopKGate,
    SoftmaxGate,
    expert_capacity,
    load_balancing_loss,
    route_with_capacity,
    routing_stats,
)


def fixed_gate(logits: list[list[float]], k: int) -> GateOutput:
    """The output of a noise-free top-k gate whose logits are these."""
    gate = NoisyTopKGate(in_dim=len(logits[0]), num_experts=len(logits[0]), k=k, noise=False)
    with torch.no_grad():
        gate.linear.weight.copy_(torch.eye(len(logits[0])))
    return gate(torch.tensor(logits))


@pytest.mark.parametrize("training", [True, False])
def test_noisy_topk_has_exactly_k_weights_summing_to_one(training):
    torch.manual_seed(0)
    gate = NoisyTopKGate(in_dim=6, num_experts=8, k=3).train(training)
    out = gate(torch.randn(64, 6))
    assert out.weights.shape == out.probs.shape == (64, 8) and out.indices.shape == (64, 3)
    assert ((out.weights > 0).sum(dim=1) == 3).all()
    torch.testing.assert_close(out.weights.sum(dim=1), torch.ones(64))
    torch.testing.assert_close(out.probs.sum(dim=1), torch.ones(64))
    # The non-zero weights sit at the routed indices, best first.
    picked = out.weights.gather(1, out.indices)
    assert (picked > 0).all() and (picked[:, :-1] >= picked[:, 1:]).all()


def test_noise_only_while_training_and_it_is_trainable():
    torch.manual_seed(0)
    gate = NoisyTopKGate(in_dim=4, num_experts=4, k=2)
    x = torch.randn(32, 4)
    a, b = gate(x).logits, gate(x).logits
    assert not torch.equal(a, b)  # noisy while training
    gate.eval()
    torch.testing.assert_close(gate(x).logits, x @ gate.linear.weight.T)
    gate.train()
    gate(x).weights.pow(2).sum().backward()
    assert gate.noise_linear.weight.grad.abs().sum() > 0 and gate.linear.weight.grad.abs().sum() > 0


def test_top1_gate_weight_is_the_softmax_probability_so_the_gate_learns():
    torch.manual_seed(0)
    gate = NoisyTopKGate(in_dim=4, num_experts=4, k=1, noise=False)
    out = gate(torch.randn(16, 4))
    torch.testing.assert_close(out.weights.sum(dim=1), out.probs.max(dim=1).values)
    out.weights.sum().backward()
    assert gate.linear.weight.grad.abs().sum() > 0


def test_softmax_gate_is_dense_and_temperature_scales_logits():
    torch.manual_seed(0)
    gate = SoftmaxGate(in_dim=4, num_experts=5, temperature=0.5)
    x = torch.randn(7, 4)
    out = gate(x)
    torch.testing.assert_close(out.logits, 2 * (x @ gate.linear.weight.T))
    torch.testing.assert_close(out.weights, torch.softmax(out.logits, dim=1))
    assert (out.weights > 0).all() and out.indices.shape == (7, 1)


def test_load_balancing_loss_is_one_for_uniform_and_num_experts_for_collapse():
    e, b = 4, 8
    uniform = GateOutput(
        torch.full((b, e), 1 / e),
        torch.full((b, e), 1 / e),
        torch.zeros(b, e),
        torch.arange(b).remainder(e).unsqueeze(1),
    )
    collapsed_probs = torch.zeros(b, e).index_fill(1, torch.tensor([0]), 1.0)
    collapsed = GateOutput(
        collapsed_probs, collapsed_probs, torch.zeros(b, e), torch.zeros(b, 1, dtype=torch.long)
    )
    assert load_balancing_loss(uniform).item() == pytest.approx(1.0)
    assert load_balancing_loss(collapsed).item() == pytest.approx(float(e))
    torch.manual_seed(0)
    random_gate = SoftmaxGate(6, e)(torch.randn(256, 6))
    assert 1.0 <= load_balancing_loss(random_gate).item() < e


def test_load_balancing_gradient_moves_probability_off_the_busiest_expert():
    logits = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    probs = torch.softmax(logits, dim=1)
    load_balancing_loss(GateOutput(probs, probs, logits, logits.argmax(1, keepdim=True))).backward()
    assert logits.grad[0, 0] > 0 and logits.grad[0, 2] < 0  # gradient descent lowers expert 0's logit


def test_routing_stats():
    gate = fixed_gate([[3.0, 2.0, 1.0, 0.0]] * 3 + [[0.0, 1.0, 2.0, 3.0]], k=2)
    stats = routing_stats(gate, "moe/click")
    torch.testing.assert_close(stats["moe/click/load"], torch.tensor([3, 3, 1, 1]) / 8.0)
    assert stats["moe/click/top_share"].item() == pytest.approx(3 / 8)
    p = torch.softmax(torch.tensor([3.0, 2.0, 1.0, 0.0]), 0)
    assert stats["moe/click/entropy"].item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-5)
    uniform = GateOutput(
        torch.full((2, 4), 0.25), torch.full((2, 4), 0.25), torch.zeros(2, 4), torch.tensor([[0], [1]])
    )
    assert routing_stats(uniform, "g")["g/entropy"].item() == pytest.approx(math.log(4))


def test_capacity():
    assert expert_capacity(1.0, 2048, 2, 8) == 512
    assert expert_capacity(1.25, 10, 1, 4) == 4  # ceil(3.125)
    assert expert_capacity(0.01, 10, 1, 4) == 1


PREFER_0_1_2 = [[3.0, 2.0, 1.0]]


@pytest.mark.parametrize(
    ("capacity", "fallback", "experts", "overflow", "dropped"),
    [
        (2, False, [0, 0, -1, -1, -1, -1], 4, 4),  # drop: rows 2-5 go on without expert 0
        (2, True, [0, 0, 1, 1, 2, 2], 4, 0),  # fall back to the next-best expert with room
        (1, True, [0, 1, 2, -1, -1, -1], 5, 3),  # three rows fit nowhere
        (6, True, [0] * 6, 0, 0),
    ],
)
def test_top1_overflow_counting(capacity, fallback, experts, overflow, dropped):
    gate = fixed_gate(PREFER_0_1_2 * 6, k=1)
    routing = route_with_capacity(gate, capacity, fallback)
    assert routing.experts.squeeze(1).tolist() == experts
    assert routing.overflow.item() == overflow and routing.dropped.item() == dropped
    # Top-1 weights are the served expert's softmax probability (the gate's own weight when not moved).
    p = torch.softmax(torch.tensor(PREFER_0_1_2[0]), 0)
    torch.testing.assert_close(
        routing.weights.squeeze(1), torch.stack([p[e] if e >= 0 else p[0] * 0 for e in experts])
    )
    for e in range(3):  # positions in each expert's queue are 0, 1, ... in row order
        assert routing.positions.squeeze(1)[routing.experts.squeeze(1) == e].tolist() == list(
            range(experts.count(e))
        )


def test_top2_slot_major_priority_and_fallback_weights():
    gate = fixed_gate(PREFER_0_1_2 * 3, k=2)
    routing = route_with_capacity(gate, capacity=2, fallback=True)
    # First choices (all expert 0) are placed before second choices; row 2 overflows both slots, and has
    # one unused expert left: slot 0 falls back to expert 2, slot 1 is dropped.
    assert routing.experts.tolist() == [[0, 1], [0, 1], [2, -1]]
    assert routing.positions.tolist() == [[0, 0], [1, 1], [0, 0]]
    assert routing.overflow.item() == 2 and routing.dropped.item() == 1
    torch.testing.assert_close(routing.weights[:2], gate.weights.gather(1, gate.indices)[:2])
    torch.testing.assert_close(routing.weights[2], torch.tensor([1.0, 0.0]))
    dropped = route_with_capacity(gate, capacity=2, fallback=False)
    assert dropped.experts.tolist() == [[0, 1], [0, 1], [-1, -1]]
    assert dropped.weights[2].tolist() == [0.0, 0.0]
