"""The ranking model: golden outputs, ESMM, the training wrapper, and the exported program."""

from __future__ import annotations

import math

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.config import ModelConfig
from recsys.data.batch import Batch, FeatureLayout, SparseFeature
from recsys.losses import RankingTrain
from recsys.model import build_model, entire_space_logit, export_model
from recsys.modules.interaction import DotInteraction

LAYOUT = FeatureLayout(
    sparse=(
        SparseFeature("item", 6),
        SparseFeature("user", 4),
        SparseFeature("hist", 6, multi_hot=True, table="item"),
    ),
    dense=("price_z", "clicks_7d"),
    labels=("click", "purchase", "dwell"),
)


def tiny_batch() -> Batch:
    """3 rows, written out by hand."""
    sparse = KeyedJaggedTensor(
        keys=["item", "user", "hist"],
        values=torch.tensor([3, 0, 5, 1, 2, 0, 1, 2, 5, 4, 3]),
        lengths=torch.tensor([1, 1, 1, 1, 1, 1, 2, 0, 3]),
    )
    dense = torch.tensor([[0.5, 0.0], [-1.0, 1.5], [2.0, 3.0]])
    labels = {
        "click": torch.tensor([1.0, 0.0, 1.0]),
        "purchase": torch.tensor([0.0, 0.0, 1.0]),
        "dwell": torch.tensor([0.3, 0.0, 1.2]),
    }
    return Batch(dense, sparse, labels)


def tiny_config(arch: dict, gate: dict | None = None) -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "tasks": [
                {"name": "click"},
                {"name": "purchase", "given": "click"},
                {"name": "dwell", "kind": "regression", "weight": 0.5},
            ],
            "embedding": {"dim": 4, "pooling": "mean"},
            "arch": {"expert_hidden": [8, 6], "tower_hidden": [4], **arch},
            "gate": gate or {},
        }
    )


CONFIGS = {
    "mmoe_softmax": ({"type": "mmoe", "num_experts": 3}, {"load_balance_weight": 0.1}),
    "mmoe_top2": (
        {"type": "mmoe", "num_experts": 4},
        {"type": "noisy_topk", "k": 2, "load_balance_weight": 0.1},
    ),
    "ple_top2": (
        {"type": "ple", "num_shared_experts": 2, "num_task_experts": 1, "num_levels": 2},
        {"type": "noisy_topk", "k": 2, "temperature": 0.5},
    ),
    "mmoe_dot": ({"type": "mmoe", "num_experts": 3, "interaction": "dot"}, None),
    "shared_bottom": ({"type": "shared_bottom"}, None),
    "single_task": ({"type": "single_task"}, None),
}

# Computed once with torch 2.13.0 / torchrec 1.8.0 (seed 0, eval mode), then pasted.
GOLDEN = {  # rows: click, purchase (entire space), dwell; columns: the 3 examples
    "mmoe_softmax": [
        [0.512423, 0.524048, 0.498001],
        [-0.654172, -0.654873, -0.687053],
        [0.052176, 0.054976, 0.059213],
    ],
    "mmoe_top2": [
        [-0.48749, -0.50158, -0.503726],
        [-1.154956, -1.149961, -1.162372],
        [-0.347917, -0.325978, -0.347367],
    ],
    "ple_top2": [
        [-0.258913, -0.258741, -0.259887],
        [-1.533767, -1.533762, -1.535238],
        [0.162923, 0.161046, 0.161007],
    ],
    "mmoe_dot": [
        [-0.447435, -0.44223, -0.468436],
        [-1.251787, -1.244584, -1.267549],
        [0.298039, 0.293602, 0.314229],
    ],
    "shared_bottom": [
        [-0.323172, -0.336427, -0.317349],
        [-1.1908, -1.183582, -1.183027],
        [-0.461576, -0.476322, -0.466164],
    ],
    "single_task": [
        [0.146603, 0.12701, 0.10247],
        [-1.06143, -1.07168, -1.085194],
        [-0.157761, -0.120804, -0.154545],
    ],
}


def seeded_model(name: str, **gate_changes):
    arch, gate = CONFIGS[name]
    config = tiny_config(arch, {**(gate or {}), **gate_changes})
    torch.manual_seed(0)
    return build_model(config, LAYOUT).eval(), config


@pytest.mark.parametrize("name", list(CONFIGS))
def test_golden_outputs(name):
    model, _ = seeded_model(name)
    batch = tiny_batch()
    with torch.no_grad():
        logits, stats = model(batch.dense, batch.sparse)
    assert list(logits) == ["click", "purchase", "dwell", "purchase_given_click"]
    assert all(v.shape == (3,) for v in logits.values())
    got = torch.stack([logits[k] for k in ("click", "purchase", "dwell")])
    torch.testing.assert_close(got, torch.tensor(GOLDEN[name]), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- ESMM


def test_dot_interaction_appends_every_pairwise_dot_product():
    torch.manual_seed(0)
    inter = DotInteraction(num_sparse=3, dim=4, num_dense=2)
    embedded, dense = torch.randn(5, 3, 4), torch.randn(5, 2)
    out = inter(embedded, dense)
    vectors = [embedded[:, f] for f in range(3)] + [inter.dense_proj(dense)]
    dots = [(vectors[i] * vectors[j]).sum(1) for i in range(4) for j in range(i + 1, 4)]
    want = torch.cat([embedded.flatten(1), dense, torch.stack(dots, 1)], dim=1)
    assert out.shape == (5, inter.out_dim) == (5, 3 * 4 + 2 + 6)
    torch.testing.assert_close(out, want)
    no_dense = DotInteraction(num_sparse=3, dim=4, num_dense=0)
    assert no_dense.out_dim == 12 + 3 and no_dense(embedded, dense[:, :0]).shape == (5, 15)


def test_entire_space_logit_is_the_product_of_probabilities():
    a = torch.tensor([-3.0, 0.0, 2.0, 5.0, -20.0])
    b = torch.tensor([1.0, -1.0, 0.5, 4.0, 3.0])
    want = torch.sigmoid(a.double()) * torch.sigmoid(b.double())
    torch.testing.assert_close(torch.sigmoid(entire_space_logit(a, b)).double(), want, rtol=1e-5, atol=1e-9)


def test_esmm_purchase_never_exceeds_click_even_at_extremes():
    a = torch.tensor([-80.0, -30.0, 0.0, 30.0, 80.0, 200.0, 17.0], requires_grad=True)
    b = torch.tensor([-80.0, 30.0, 0.0, -30.0, 80.0, 200.0, 17.0], requires_grad=True)
    z = entire_space_logit(a, b)
    assert torch.isfinite(z).all()
    assert (torch.sigmoid(z) <= torch.sigmoid(a)).all() and (torch.sigmoid(z) <= torch.sigmoid(b)).all()
    z.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    model, _ = seeded_model("mmoe_softmax")
    torch.manual_seed(1)
    batch = random_batch(256)
    logits, _ = model(batch.dense, batch.sparse)
    assert (torch.sigmoid(logits["purchase"]) <= torch.sigmoid(logits["click"])).all()
    torch.testing.assert_close(
        torch.sigmoid(logits["purchase"]),
        torch.sigmoid(logits["click"]) * torch.sigmoid(logits["purchase_given_click"]),
    )


# --------------------------------------------------------------------------------------- training


def random_batch(rows: int) -> Batch:
    """Synthetic rows whose labels depend on the features (so that they can be learned)."""
    item = torch.randint(0, 6, (rows,))
    user = torch.randint(0, 4, (rows,))
    hist_len = torch.randint(0, 4, (rows,))
    hist = torch.randint(0, 6, (int(hist_len.sum()),))
    dense = torch.randn(rows, 2)
    sparse = KeyedJaggedTensor(
        keys=["item", "user", "hist"],
        values=torch.cat([item, user, hist]),
        lengths=torch.cat([torch.ones(2 * rows, dtype=torch.long), hist_len]),
    )
    click = ((item % 2 == 0) ^ (dense[:, 0] > 1)).float()
    purchase = click * (user == 1).float()
    dwell = dense[:, 1] + 0.5 * (item == 3).float()
    return Batch(dense, sparse, {"click": click, "purchase": purchase, "dwell": dwell})


@pytest.fixture
def one_thread():
    """Tiny matmuls run faster on one thread than split across two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["mmoe_top2", "ple_top2", "mmoe_dot"])
def test_training_drives_every_task_loss_down(name, one_thread):
    model, config = seeded_model(name)
    train = RankingTrain.from_config(model.train(), config)
    optimizer = torch.optim.Adam(train.parameters(), lr=0.01)
    torch.manual_seed(0)
    batch = random_batch(128)
    history = []
    for _ in range(300):
        loss, (losses, _, stats) = train(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(losses)
    for task in ("click", "purchase", "dwell"):
        first, last = history[0][task].item(), history[-1][task].item()
        assert last < 0.4 * first, (task, first, last)
    assert "aux_loss" in history[-1] or config.gate.load_balance_weight == 0
    assert math.isfinite(stats["moe/aux_loss"].item())


# ----------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", ["mmoe_top2", "ple_top2", "mmoe_dot", "single_task"])
def test_exported_program_matches_eager(name, tmp_path):
    model, _ = seeded_model(name)
    example = tiny_batch()
    program = export_model(model, example)
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    torch.manual_seed(2)
    for batch in (example, random_batch(7), random_batch(1)):  # the batch size is dynamic
        with torch.no_grad():
            want_logits, want_stats = model(batch.dense, batch.sparse)
            got_logits, got_stats = loaded(batch.dense, batch.sparse.values(), batch.sparse.lengths())
        assert list(got_logits) == list(want_logits) and set(got_stats) == set(want_stats)
        for key, value in want_logits.items():
            torch.testing.assert_close(got_logits[key], value)
        for key, value in want_stats.items():
            torch.testing.assert_close(got_stats[key], value)


def test_export_refuses_dispatch_mode_and_the_dense_copy_shares_its_parameters():
    model, _ = seeded_model("mmoe_top2", dispatch=True)
    with pytest.raises(ValueError, match=r"model\.gate\.dispatch: export traces the dense path only"):
        export_model(model, tiny_batch())
    dense, _ = seeded_model("mmoe_top2")
    dense.load_state_dict(model.state_dict())  # same parameters: the dispatch model can be scored densely
