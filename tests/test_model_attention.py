"""Target attention over the history: the unit, masking, empty histories, config, export and DMP."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.config import EmbeddingConfig, ModelConfig
from recsys.data.batch import FeatureLayout, SparseFeature
from recsys.model import build_model, export_model
from recsys.modules.attention import TargetAttention, history_queries, pad_sequences
from tests.test_model_model import LAYOUT, tiny_batch, tiny_config


def attention_config(**embedding) -> ModelConfig:
    """The tiny MMoE of test_model_model with attended histories."""
    settings = {"dim": 4, "history_pooling": "attention", "attention_hidden": [8], **embedding}
    return replace(tiny_config({"type": "mmoe", "num_experts": 3}), embedding=EmbeddingConfig(**settings))


def seeded(config: ModelConfig, layout: FeatureLayout = LAYOUT):
    torch.manual_seed(0)
    return build_model(config, layout).eval()


def test_the_unit_is_the_unnormalized_mlp_weighted_sum_of_the_keys():
    torch.manual_seed(0)
    unit = TargetAttention(dim=3, hidden=[5])
    q, keys = torch.randn(1, 3), torch.randn(1, 2, 3)
    mask = torch.tensor([[True, True]])
    x = torch.cat([q.expand(2, 3), keys[0], q - keys[0], q * keys[0]], dim=1)  # (2, 12)
    w = unit.score(torch.relu(unit.mlp.layers[0](x))).squeeze(-1)  # (2,), no softmax
    torch.testing.assert_close(unit(q, keys, mask), (w[:, None] * keys[0]).sum(0, keepdim=True))


def test_padding_positions_do_not_change_the_output():
    torch.manual_seed(0)
    unit = TargetAttention(dim=4, hidden=[8, 4])
    q, keys = torch.randn(2, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    garbage = keys.clone()
    garbage[~mask] = 1e6  # whatever sits at a padded position
    out = unit(q, keys, mask)
    torch.testing.assert_close(unit(q, garbage, mask), out)
    torch.testing.assert_close(unit(q[:1], keys[:1, :2], mask[:1, :2]), out[:1])  # as if never padded
    # An empty row is exactly zero.
    assert torch.equal(unit(q, keys, torch.zeros_like(mask)), torch.zeros(2, 4))


def test_pad_sequences_fills_rows_in_jagged_order():
    values = torch.arange(6.0).view(3, 2)
    padded, mask = pad_sequences(values, torch.tensor([2, 0, 1]))
    assert mask.tolist() == [[True, True], [False, False], [True, False]]
    assert padded.tolist() == [[[0, 1], [2, 3]], [[0, 0], [0, 0]], [[4, 5], [0, 0]]]
    padded, mask = pad_sequences(values[:0], torch.tensor([0, 0]))  # every history empty
    assert padded.shape == (2, 0, 2) and mask.shape == (2, 0)


def test_attention_differs_from_mean_and_mean_is_unchanged():
    batch = tiny_batch()
    mean_config = tiny_config({"type": "mmoe", "num_experts": 3})
    assert mean_config.embedding.history_pooling == "mean"
    with torch.no_grad():
        mean, _ = seeded(mean_config)(batch.dense, batch.sparse)
        attended, _ = seeded(attention_config())(batch.dense, batch.sparse)
    assert seeded(mean_config).history_arch is None
    assert not torch.allclose(mean["click"], attended["click"])
    assert all(torch.isfinite(v).all() for v in attended.values())


def test_empty_histories_give_finite_outputs_and_zero_history_features():
    model = seeded(attention_config())
    assert history_queries(LAYOUT) == {"hist": "item"}
    assert model.keys == ["user", "item", "hist"]  # pooled first, then the candidate and its history
    # hist is empty in every row.
    sparse = KeyedJaggedTensor(
        keys=["item", "user", "hist"],
        values=torch.tensor([3, 0, 5, 1, 2, 0]),
        lengths=torch.tensor([1] * 6 + [0] * 3),
    )
    with torch.no_grad():
        embedded = model.history_arch(sparse)  # (B, 2, D): item, hist
        logits, _ = model(torch.zeros(3, 2), sparse)
    assert embedded.shape == (3, 2, 4) and torch.equal(embedded[:, 1], torch.zeros(3, 4))
    assert all(torch.isfinite(v).all() for v in logits.values())
    # Gradients reach the attention MLP and the shared item table.
    logits, _ = model.train()(tiny_batch().dense, tiny_batch().sparse)
    logits["click"].sum().backward()
    unit = model.history_arch.attention["hist"]
    assert unit.mlp.layers[0].weight.grad.abs().sum() > 0
    assert model.history_arch.embedding_collection.embeddings["t_item"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("embedding", "message"),
    [
        ({"history_pooling": "din"}, "model.embedding.history_pooling: expected one of"),
        ({"attention_hidden": [8, 0]}, "model.embedding.attention_hidden: expected layer sizes"),
        ({"attention_hidden": 8}, "model.embedding.attention_hidden: expected a list"),
    ],
)
def test_config_errors_name_the_field_and_value(embedding, message):
    with pytest.raises(ValueError, match=message):
        attention_config(**embedding)


def test_attention_needs_a_history_sharing_a_candidate_table_and_refuses_export():
    unshared = FeatureLayout(
        sparse=(SparseFeature("item", 6), SparseFeature("hist", 6, multi_hot=True)), dense=("price_z",)
    )
    with pytest.raises(ValueError, match="model.embedding.history_pooling: attention needs a multi-hot"):
        build_model(attention_config(), unshared)
    with pytest.raises(ValueError, match="history_pooling: export supports mean only"):
        export_model(seeded(attention_config()), tiny_batch())


def test_dmp_shards_the_sequence_tables_trains_and_gathers_to_the_eager_model(tmp_path, world_of_one):
    from recsys.train.checkpoints import gather_unsharded
    from recsys.train.config import TrainConfig
    from recsys.train.sharding import shard_model

    model = {
        "tasks": [{"name": "click"}, {"name": "purchase", "given": "click"}],
        "embedding": {"dim": 4, "history_pooling": "attention", "attention_hidden": [8]},
        "arch": {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]},
    }
    config = TrainConfig.from_dict(
        {"features": str(tmp_path), "model": model, "training": {"dense_lr": 0.01}}
    )
    sharded = shard_model(config, LAYOUT, torch.device("cpu"))
    plan = sharded.plan.plan
    assert set(plan["model.history_arch.embedding_collection"]) == {"t_item"}
    assert set(plan["model.sparse_arch.embedding_bag_collection"]) == {"t_user"}
    unit = sharded.dmp.module.model.history_arch.attention["hist"].score.weight
    before = unit.detach().clone()
    batch, losses = tiny_batch(), []
    for _ in range(5):
        sharded.optimizer.zero_grad()
        loss, _ = sharded.dmp(batch)
        loss.backward()
        sharded.optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(unit.detach(), before)  # the attention MLP trains with the dense optimizer
    sharded.dmp.eval()
    with torch.no_grad():
        _, (_, during, _) = sharded.dmp(batch)
        eager, _ = gather_unsharded(sharded, config)(batch.dense, batch.sparse)
    for task in ("click", "purchase"):
        torch.testing.assert_close(eager[task], during[task])
