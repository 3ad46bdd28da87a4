"""Arrow rows -> model batch, the feature layout, and the feature pipeline's output through the model."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from features.config import FeatureConfig, builtin_config
from features.pipeline import Tables, build
from recsys.config import EmbeddingConfig, ModelConfig
from recsys.config import builtin_config as model_config
from recsys.data.batch import FeatureLayout, SparseFeature, batch_from_arrow
from recsys.losses import RankingTrain
from recsys.model import build_model

LAYOUT = FeatureLayout(
    sparse=(
        SparseFeature("item", 6),
        SparseFeature("user", 4),
        SparseFeature("hist", 6, multi_hot=True, table="item"),
    ),
    dense=("price_z", "clicks_7d"),
    labels=("click", "purchase"),
)


def tiny_table() -> pa.Table:
    return pa.table(
        {
            "impression_id": pa.array([11, 12, 13]),  # passthrough: ignored
            "item": pa.array([3, 0, 5], pa.int64()),
            "user": pa.array([1, 2, 0], pa.int64()),
            "hist": pa.array([[1, 2], [], [5, 4, 3]], pa.large_list(pa.int64())),
            "price_z": pa.array([0.5, -1.0, 2.0], pa.float32()),
            "clicks_7d": pa.array([0.0, 1.5, 3.0], pa.float32()),
            "click": pa.array([1.0, 0.0, 1.0], pa.float32()),
            "purchase": pa.array([0.0, 0.0, 1.0], pa.float32()),
        }
    )


def assert_tiny_batch(batch) -> None:
    assert batch.sparse.keys() == ["item", "user", "hist"]
    assert batch.sparse.values().tolist() == [3, 0, 5, 1, 2, 0, 1, 2, 5, 4, 3]
    assert batch.sparse.lengths().tolist() == [1, 1, 1, 1, 1, 1, 2, 0, 3]
    assert batch.sparse.values().dtype == torch.int64
    torch.testing.assert_close(batch.dense, torch.tensor([[0.5, 0.0], [-1.0, 1.5], [2.0, 3.0]]))
    assert batch.dense.dtype == torch.float32
    assert {k: v.tolist() for k, v in batch.labels.items()} == {
        "click": [1.0, 0.0, 1.0],
        "purchase": [0.0, 0.0, 1.0],
    }


def test_batch_from_arrow_exact_kjt_and_dense():
    assert_tiny_batch(batch_from_arrow(tiny_table(), LAYOUT))


def test_record_batches_chunks_slices_and_list_types_give_the_same_batch():
    table = tiny_table()
    assert_tiny_batch(batch_from_arrow(table.to_batches()[0], LAYOUT))
    chunked = pa.concat_tables([table.slice(0, 1), table.slice(1, 2)])  # two chunks per column
    assert chunked.column("hist").num_chunks == 2
    assert_tiny_batch(batch_from_arrow(chunked, LAYOUT))
    small_lists = table.set_column(3, "hist", table.column("hist").cast(pa.list_(pa.int64())))
    assert_tiny_batch(batch_from_arrow(small_lists, LAYOUT))
    # A slice starts inside the list values: offsets and values must follow it.
    sliced = batch_from_arrow(table.slice(2, 1), LAYOUT)
    assert sliced.sparse.values().tolist() == [5, 0, 5, 4, 3] and sliced.sparse.lengths().tolist() == [
        1,
        1,
        3,
    ]


def test_null_lists_are_empty_bags_and_scoring_data_has_no_labels():
    table = tiny_table().drop_columns(["click", "purchase"])
    table = table.set_column(3, "hist", pa.array([[1, 2], None, [5]], pa.large_list(pa.int64())))
    batch = batch_from_arrow(table, LAYOUT, labels=False)
    assert batch.sparse.lengths().tolist()[-3:] == [2, 0, 1] and batch.sparse.values().tolist()[-3:] == [
        1,
        2,
        5,
    ]
    assert batch.labels == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.drop_columns(["user"]), r"batch: missing column\(s\) \['user'\]"),
        (
            lambda t: t.set_column(1, "item", pa.array([3, 6, 0])),
            r"batch\.item: ids must lie in \[0, 6\), got \[0, 6\]",
        ),
        (lambda t: t.set_column(1, "item", pa.array(["a", "b", "c"])), r"batch\.item: expected an integer"),
        (lambda t: t.set_column(1, "item", pa.array([1, None, 2])), r"batch\.item: expected non-null ids"),
    ],
)
def test_batch_errors_name_the_column(change, message):
    with pytest.raises(ValueError, match=message):
        batch_from_arrow(change(tiny_table()), LAYOUT)


def test_layout_rejects_a_shared_table_of_two_sizes():
    with pytest.raises(ValueError, match=r"layout\.sparse\[hist\]\.table: table 'item' has 6 embeddings"):
        FeatureLayout(
            sparse=(SparseFeature("item", 6), SparseFeature("hist", 7, multi_hot=True, table="item"))
        )


# ------------------------------------------------------- the feature pipeline's output, end to end


@pytest.fixture
def built(impressions, users, items, tmp_path):
    config = FeatureConfig.from_yaml(builtin_config("ecommerce"))
    spec, _ = build(
        config, Tables(impressions.lazy(), users.lazy(), items.lazy()), tmp_path / "out", progress=False
    )
    return spec, tmp_path / "out"


def test_layout_from_spec_shares_vocabulary_tables(built):
    spec, _ = built
    layout = FeatureLayout.from_spec(spec)
    assert layout.keys == list(spec.sparse_features())
    assert layout.dense == tuple(spec.dense_features()) and layout.labels == ("click", "purchase")
    tables = layout.tables
    assert tables["item"][1] == ("item", "hist_items") and tables["category"][1] == (
        "category",
        "hist_categories",
    )
    assert "hist_items" not in tables and len(tables) == len(layout.keys) - 2
    assert len(FeatureLayout.from_spec(spec, EmbeddingConfig(share_vocab_tables=False)).tables) == len(
        layout.keys
    )
    grouped = FeatureLayout.from_spec(spec, EmbeddingConfig(shared_tables=(("category", "top_category"),)))
    assert grouped.tables["category"][1] == ("category", "top_category", "hist_categories")
    with pytest.raises(
        ValueError, match=r"model\.embedding\.shared_tables: unknown sparse feature\(s\) \['nope'\]"
    ):
        FeatureLayout.from_spec(spec, EmbeddingConfig(shared_tables=(("item", "nope"),)))
    with pytest.raises(ValueError, match=r"layout\.sparse\[\w+\]\.table: table 'user' has 100001 embeddings"):
        FeatureLayout.from_spec(spec, EmbeddingConfig(shared_tables=(("user", "item"),)))


@pytest.mark.parametrize("name", ["ecommerce_mmoe", "ecommerce_ple"])
def test_pipeline_output_runs_through_the_model(built, name):
    spec, out = built
    config = ModelConfig.from_yaml(model_config(name))
    layout = FeatureLayout.from_spec(spec, config.embedding)
    torch.manual_seed(0)
    train = RankingTrain.from_config(build_model(config, layout), config)
    for split in ("train", "valid", "test"):
        table = pq.read_table(out / split)
        batch = batch_from_arrow(table, layout)
        loss, (losses, logits, stats) = train(batch)
        assert logits["click"].shape == logits["purchase"].shape == (table.num_rows,)
        assert torch.isfinite(loss) and set(losses) == {"click", "purchase", "aux_loss", "loss"}
        assert (torch.sigmoid(logits["purchase"]) <= torch.sigmoid(logits["click"])).all()
    loss.backward()
