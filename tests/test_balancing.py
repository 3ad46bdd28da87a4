"""Task balancing: uncertainty weighting, GradNorm and PCGrad against references on hand-made problems."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recsys.balancing import TaskBalancer, pcgrad_coefficients, scale_grad
from recsys.config import ModelConfig, TaskConfig
from recsys.data.batch import FeatureLayout
from recsys.losses import MultiTaskLoss
from recsys.model import build_model

REGRESSION = [TaskConfig("y1", kind="regression"), TaskConfig("y2", kind="regression")]


def reference_pcgrad(grads: list[torch.Tensor], order: list[list[int]]) -> torch.Tensor:
    """PCGrad as the paper writes it, on explicit vectors."""
    projected = []
    for i, g in enumerate(grads):
        g = g.clone()
        for j in order[i]:
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        projected.append(g)
    return torch.stack(projected).sum(dim=0)


@pytest.mark.parametrize("tasks", [2, 3, 4])
def test_pcgrad_coefficients_give_the_papers_projected_sum(tasks):
    generator = torch.Generator().manual_seed(tasks)
    for _ in range(20):
        grads = [torch.randn(7, generator=generator, dtype=torch.float64) for _ in range(tasks)]
        order = [
            [j for j in torch.randperm(tasks, generator=generator).tolist() if j != i] for i in range(tasks)
        ]
        gram = torch.stack(grads) @ torch.stack(grads).T
        c = pcgrad_coefficients(gram, order)
        combined = (c[:, None] * torch.stack(grads)).sum(dim=0)
        torch.testing.assert_close(combined, reference_pcgrad(grads, order))


def test_pcgrad_leaves_agreeing_gradients_alone_and_removes_a_direct_conflict():
    agree = torch.tensor([[1.0, 0.5], [0.5, 2.0]])  # positive dot product
    torch.testing.assert_close(pcgrad_coefficients(agree).float(), torch.ones(2))
    # g1 = (1, 0), g2 = (-1, 1): each projected off the other.
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    c = pcgrad_coefficients(g @ g.T, [[1], [0]])
    combined = c @ g
    torch.testing.assert_close(combined, reference_pcgrad(list(g), [[1], [0]]))
    assert combined @ g[0] >= -1e-12 and combined @ g[1] >= -1e-12  # conflicts with neither task


def test_uncertainty_weighting_is_kendalls_likelihood_and_learns_the_inverse_loss():
    tasks = [TaskConfig("y", kind="regression"), TaskConfig("click")]
    balancer = TaskBalancer(tasks, "uncertainty")
    with torch.no_grad():
        balancer.log_vars.copy_(torch.tensor([0.3, -0.2]))
    losses = [torch.tensor(2.0), torch.tensor(0.7)]
    total, stats = balancer.combine(losses)
    expected = 0.5 * math.exp(-0.3) * 2.0 + 0.15 + math.exp(0.2) * 0.7 - 0.1
    assert float(total) == pytest.approx(expected, rel=1e-6)
    assert float(stats["balance/click/weight"]) == pytest.approx(math.exp(0.2), rel=1e-6)
    # Minimising over s alone: the optimum is exp(s) = 2 k L (variance = the loss for regression).
    optimizer = torch.optim.Adam(balancer.parameters(), lr=0.05)
    for _ in range(2000):
        optimizer.zero_grad()
        balancer.combine(losses)[0].backward()
        optimizer.step()
    optimum = torch.log(torch.tensor([2 * 0.5 * 2.0, 2 * 1.0 * 0.7]))
    torch.testing.assert_close(balancer.log_vars.detach(), optimum, atol=1e-3, rtol=0)


def test_gradnorm_moves_the_weights_as_the_papers_rule_and_keeps_their_sum():
    # Shared parameter w, losses L1 = (3 w)^2 / 2 and L2 = w^2 / 2 at w = 1: |grad L1| = 9, |grad L2| = 1.
    w = torch.nn.Parameter(torch.tensor(1.0))
    balancer = TaskBalancer(REGRESSION, "gradnorm", gradnorm_alpha=1.5, gradnorm_lr=0.1)

    def losses():
        return [(3 * w) ** 2 / 2, w**2 / 2]

    stats = balancer.before_backward(losses(), [w])
    assert float(stats["balance/y1/grad_norm"]) == pytest.approx(9.0)
    # First step: the loss ratios are 1, the target is the mean G = 5; G1 = 9 > 5 and G2 = 1 < 5, so
    # Adam's first step (of size lr, whatever the gradient's scale) moves w1 down and w2 up by 0.1.
    torch.testing.assert_close(balancer.gradnorm_weights, torch.tensor([0.9, 1.1]))
    for _ in range(200):
        balancer.before_backward(losses(), [w])
    weights = balancer.gradnorm_weights
    assert float(weights.sum()) == pytest.approx(2.0)
    g = weights * torch.tensor([9.0, 1.0])  # equal loss ratios: GradNorm equalises the weighted norms
    assert float(g[0] / g[1]) == pytest.approx(1.0, abs=0.1)


def test_a_step_with_pcgrad_gives_shared_layers_the_projected_sum_and_towers_their_own_gradient():
    layout = FeatureLayout(sparse=(), dense=("a", "b", "c"), labels=("y1", "y2"))
    config = ModelConfig.from_dict(
        {
            "tasks": [{"name": "y1", "kind": "regression"}, {"name": "y2", "kind": "regression"}],
            "arch": {"type": "shared_bottom", "expert_hidden": [5], "tower_hidden": [3]},
        }
    )
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    labels = {"y1": x[:, 0] * 3, "y2": -x[:, 0] * 3 + x[:, 1]}  # conflicting targets
    names = None
    for seed in range(50):  # the first initialisation whose task gradients conflict
        torch.manual_seed(seed)
        model = build_model(config, layout)
        logits, _ = model.heads(x)
        params = list(model.parameters())
        per_task = [
            [
                torch.zeros_like(p) if g is None else g
                for g, p in zip(
                    torch.autograd.grad(
                        F.mse_loss(logits[t], labels[t]), params, retain_graph=True, allow_unused=True
                    ),
                    params,
                    strict=True,
                )
            ]
            for t in ("y1", "y2")
        ]
        names = [n for n, _ in model.named_parameters()]
        shared_names = [n.startswith("multitask") for n in names]
        flat = [
            torch.cat([g.flatten() for g, s in zip(grads, shared_names, strict=True) if s])
            for grads in per_task
        ]
        gram = torch.stack(flat) @ torch.stack(flat).T
        if gram[0, 1] < 0:
            break
    assert gram[0, 1] < 0, "no initialisation with conflicting task gradients"
    shared = model.multitask.shared_parameters()
    c = pcgrad_coefficients(gram, [[1], [0]])  # with two tasks the order is forced

    balancer = TaskBalancer(REGRESSION, "pcgrad")
    loss = MultiTaskLoss(REGRESSION, balancer=balancer)
    model.grad_scales = balancer.grad_scales
    logits, stats = model.heads(x)
    total, _ = loss(logits, labels, stats)
    out = balancer.before_backward(loss.task_losses, shared)
    assert float(out["balance/conflicts"]) == 1.0
    total.backward()
    for (name, p), g1, g2 in zip(model.named_parameters(), *per_task, strict=True):
        if name.startswith("multitask"):
            expected = c[0] * g1 + c[1] * g2
        else:
            expected = g1 if name.startswith("towers.y1") else g2
        torch.testing.assert_close(p.grad, expected.to(p.grad.dtype), msg=name)


def test_scale_grad_reads_the_scale_when_backward_runs():
    scales = torch.ones(2)
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = scale_grad(x, scales, 1) * 3
    scales[1] = 0.25  # set after the forward pass, as PCGrad does
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.75, 0.75]))


def test_balancing_that_needs_shared_layers_names_the_setting():
    balancer = TaskBalancer(REGRESSION, "pcgrad")
    with pytest.raises(ValueError, match=r"training\.task_balancing: pcgrad .*\(single_task\)"):
        balancer.before_backward([torch.tensor(1.0, requires_grad=True)] * 2, [])
    with pytest.raises(ValueError, match=r"training\.task_balancing: expected one of .* got 'magic'"):
        TaskBalancer(REGRESSION, "magic")


@pytest.mark.parametrize("method", ["uncertainty", "gradnorm", "pcgrad"])
def test_each_balancing_trains_in_the_sharded_step_and_reports_its_weights(tmp_path, world_of_one, method):
    from recsys.train.config import TrainConfig
    from recsys.train.sharding import shard_model
    from recsys.train.worker import train_step
    from tests.test_model_model import LAYOUT, tiny_batch

    model = {
        "tasks": [{"name": "click"}, {"name": "purchase", "given": "click"}],
        "embedding": {"dim": 4},
        "arch": {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]},
    }
    training = {"task_balancing": method, "gradnorm_lr": 0.05}
    config = TrainConfig.from_dict({"features": str(tmp_path), "model": model, "training": training})
    sharded = shard_model(config, LAYOUT, torch.device("cpu"))
    before = {k: v.detach().clone() for k, v in sharded.dmp.state_dict().items() if "towers" in k}
    weights = []
    for _ in range(3):
        losses, stats = train_step(sharded, tiny_batch())
        weights.append([float(stats[f"balance/{t}/weight"]) for t in ("click", "purchase")])
        assert all(math.isfinite(float(v)) for v in losses.values())
    after = sharded.dmp.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step trained
    if method == "pcgrad":
        assert "balance/grad_cosine" in stats and "balance/click/pcgrad_scale" in stats
    else:
        assert weights[0] != weights[-1]  # learned or moved weights
    if method == "gradnorm":
        assert sum(weights[-1]) == pytest.approx(2.0, rel=1e-5)
        assert any(k.endswith("balancer.gradnorm_weights") for k in after)  # kept in checkpoints
