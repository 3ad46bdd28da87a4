"""The model package: save/load round trip, weights-only loading, and scoring raw rows."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from polars.testing import assert_frame_equal

from features.config import FeatureConfig, builtin_config
from features.pipeline import Tables, build, fit_spec
from recsys.calibration import PlattScaling
from recsys.config import ModelConfig
from recsys.data.batch import FeatureLayout, batch_from_arrow
from recsys.model import build_model
from recsys.package import (
    MANIFEST,
    WEIGHTS,
    LoadedPackage,
    load_package,
    predict_frame,
    quantize_package,
    save_package,
)
from tests.conftest import at, impressions_frame

TINY_MODEL = {
    "tasks": [{"name": "click"}, {"name": "purchase", "given": "click"}],
    "embedding": {"dim": 4},
    "arch": {"type": "mmoe", "num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]},
}


def in_memory_package(spec, model_config: dict, seed: int = 0) -> LoadedPackage:
    config = ModelConfig.from_dict(model_config)
    layout = FeatureLayout.from_spec(spec, config.embedding)
    torch.manual_seed(seed)
    return LoadedPackage(build_model(config, layout), config, spec, layout)


def joined(impressions: pl.DataFrame, users: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """The scoring input of the ecommerce source: impressions left-joined with users and items."""
    return impressions.join(users, on="user_id", how="left", maintain_order="left").join(
        items, on="item_id", how="left", maintain_order="left"
    )


@pytest.fixture
def ecommerce_built(impressions, users, items, tmp_path):
    """A randomly initialized package on the fixture tables' spec, and the pipeline's model-ready data."""
    config = FeatureConfig.from_yaml(builtin_config("ecommerce"))
    spec, _ = build(
        config, Tables(impressions.lazy(), users.lazy(), items.lazy()), tmp_path / "data", progress=False
    )
    return in_memory_package(spec, TINY_MODEL), tmp_path / "data"


@pytest.fixture
def ecommerce(ecommerce_built):
    return ecommerce_built[0]


@pytest.fixture
def scoring_rows(impressions, users, items) -> pl.DataFrame:
    """Joined rows out of time order, with an unseen user (99), an unseen item (999) and null ratings."""
    extra = impressions_frame([(15, 11, at(9, 11), 99, 100, 2, 0, 0), (16, 11, at(9, 11), 99, 999, 3, 0, 0)])
    rows = joined(pl.concat([impressions, extra]), users, items)
    order = np.random.default_rng(0).permutation(rows.height)
    return rows[order.tolist()]


def test_round_trip_gives_the_in_memory_predictions(ecommerce, scoring_rows, tmp_path):
    expected = predict_frame(ecommerce, scoring_rows)
    assert expected.columns == [
        "impression_id",
        "request_id",
        "user_id",
        "item_id",
        "ts",
        "p_click",
        "p_purchase",
    ]
    # Every row, in input order, unseen ids and null ratings included.
    assert expected["impression_id"].to_list() == scoring_rows["impression_id"].to_list()
    assert expected.schema["p_click"] == expected.schema["p_purchase"] == pl.Float64
    p_click, p_purchase = expected["p_click"].to_numpy(), expected["p_purchase"].to_numpy()
    assert np.isfinite(p_click).all() and ((p_click > 0) & (p_click < 1)).all()
    assert (p_purchase <= p_click).all()  # ESMM: p(click and purchase) <= p(click)

    path = save_package(
        tmp_path / "pkg", ecommerce.model, ecommerce.model_config, ecommerce.spec, {"auc": 0.5}
    )
    loaded = load_package(path)
    assert not loaded.model.training
    assert loaded.model_config == ecommerce.model_config
    assert loaded.spec.content_hash == ecommerce.spec.content_hash
    assert loaded.metadata["tasks"] == ["click", "purchase"] and loaded.metadata["extra"] == {"auc": 0.5}
    assert_frame_equal(predict_frame(loaded, scoring_rows), expected)
    # Smaller batches and pandas input change nothing; nor do timestamps as ISO strings (JSON input).
    assert_frame_equal(predict_frame(loaded, scoring_rows.to_pandas(), batch_size=3), expected)
    as_strings = scoring_rows.with_columns(pl.col("ts", "signup_ts", "listing_ts").dt.to_string())
    assert as_strings.schema["ts"] == pl.String
    assert_frame_equal(predict_frame(loaded, as_strings), expected)


def test_scores_equal_the_model_on_the_training_pipeline_output(ecommerce_built, impressions, users, items):
    package, data_dir = ecommerce_built
    ready = pq.read_table(sorted(data_dir.glob("*/part-*.parquet")))
    batch = batch_from_arrow(ready, package.layout, labels=False)
    package.model.eval()
    with torch.no_grad():
        logits, _ = package.model(batch.dense, batch.sparse)
    expected = pl.DataFrame(
        {
            "impression_id": ready["impression_id"].to_numpy(),
            "p_click": torch.sigmoid(logits["click"]).double().numpy(),
            "p_purchase": torch.sigmoid(logits["purchase"]).double().numpy(),
        }
    ).sort("impression_id")
    # The same rows, raw and joined: the scoring path must rebuild exactly the training features.
    scored = predict_frame(package, joined(impressions, users, items))
    assert_frame_equal(scored.select(expected.columns).sort("impression_id"), expected, rel_tol=1e-6)


def test_weights_are_plain_tensors_that_load_with_weights_only(ecommerce, tmp_path):
    path = save_package(tmp_path / "pkg", ecommerce.model, ecommerce.model_config, ecommerce.spec)
    state = torch.load(path / WEIGHTS, weights_only=True)
    expected = ecommerce.model.state_dict()
    assert list(state) == list(expected)
    assert all(type(v) is torch.Tensor and torch.equal(v, expected[k]) for k, v in state.items())
    config = json.loads((path / "model_config.json").read_text())
    assert ModelConfig.from_dict(config) == ecommerce.model_config


def test_history_comes_from_the_history_frame_or_the_labelled_rows(ecommerce, scoring_rows):
    with_labels = predict_frame(ecommerce, scoring_rows)
    unlabelled = scoring_rows.drop("click", "purchase")
    history = scoring_rows.select("impression_id", "ts", "user_id", "item_id", "click", "purchase")
    assert_frame_equal(predict_frame(ecommerce, unlabelled, history=history), with_labels)
    # A joined history frame (items columns too) gives the same: the rows already show every item.
    assert_frame_equal(predict_frame(ecommerce, unlabelled, history=scoring_rows.to_pandas()), with_labels)
    no_history = predict_frame(ecommerce, unlabelled)
    assert no_history.height == with_labels.height
    # User 10 clicked on day 0: its later rows lose their history without labels; its first rows had none.
    late = (pl.col("user_id") == 10) & (pl.col("ts") > at(1))
    assert not np.allclose(no_history.filter(late)["p_click"], with_labels.filter(late)["p_click"])
    first = pl.col("ts") == at(0, 9)
    assert_frame_equal(no_history.filter(first), with_labels.filter(first))


def test_input_errors_name_the_column(ecommerce, scoring_rows):
    with pytest.raises(ValueError, match=r"frame: missing column\(s\) \['price'\]"):
        predict_frame(ecommerce, scoring_rows.drop("price"))
    with pytest.raises(ValueError, match=r"frame: missing column\(s\) \['device'\]"):
        predict_frame(ecommerce, scoring_rows.drop("device"))
    with pytest.raises(ValueError, match=r"frame\.ts: cannot convert String to the contract type"):
        predict_frame(ecommerce, scoring_rows.with_columns(pl.lit("noon").alias("ts")))
    with pytest.raises(ValueError, match=r"history: missing column\(s\) \['click'\]"):
        predict_frame(ecommerce, scoring_rows, history=scoring_rows.drop("click"))
    with pytest.raises(ValueError, match=r"batch_size: expected an integer >= 1, got 0"):
        predict_frame(ecommerce, scoring_rows, batch_size=0)
    with pytest.raises(TypeError, match=r"frame: expected a polars or pandas DataFrame, got list"):
        predict_frame(ecommerce, [1, 2])


def test_empty_frame_gives_empty_scores(ecommerce, scoring_rows):
    out = predict_frame(ecommerce, scoring_rows.head(0))
    assert out.height == 0 and out.columns[-2:] == ["p_click", "p_purchase"]


def test_save_refuses_to_overwrite_and_load_checks_the_files(ecommerce, tmp_path):
    args = (ecommerce.model, ecommerce.model_config, ecommerce.spec)
    path = save_package(tmp_path / "models" / "pkg", *args)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_package(path, *args)
    save_package(path, *args, extra={"epoch": np.int64(3)}, overwrite=True)
    assert json.loads((path / MANIFEST).read_text())["extra"] == {"epoch": 3}
    assert [p.name for p in path.parent.iterdir()] == ["pkg"]  # no temporary folder left behind
    with pytest.raises(ValueError, match=r"extra: expected JSON-able metadata"):
        save_package(tmp_path / "other", *args, extra={"model": object()})
    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**manifest, "spec_hash": "0" * 64}))
    with pytest.raises(ValueError, match=r"spec_hash '0+' is not the hash of spec\.json"):
        load_package(path)
    (path / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=r"weights\.pt is missing"):
        load_package(path)


def test_a_calibrated_package_applies_its_platt_scaling_and_an_uncalibrated_one_loads_as_before(
    ecommerce, scoring_rows, tmp_path
):
    args = (ecommerce.model, ecommerce.model_config, ecommerce.spec)
    plain = save_package(tmp_path / "plain", *args)
    assert "calibration" not in json.loads((plain / MANIFEST).read_text())  # as packages before it
    loaded_plain = load_package(plain)
    assert loaded_plain.calibration == {}
    raw = predict_frame(loaded_plain, scoring_rows)
    assert_frame_equal(raw, predict_frame(ecommerce, scoring_rows))

    calibration = {"click": PlattScaling(0.5, -1.0)}  # purchase keeps the model's own probability
    path = save_package(tmp_path / "calibrated", *args, calibration=calibration)
    loaded = load_package(path)
    assert loaded.calibration == calibration
    scored = predict_frame(loaded, scoring_rows)
    expected = calibration["click"].probs(raw["p_click"].to_numpy())
    np.testing.assert_allclose(scored["p_click"].to_numpy(), expected, rtol=1e-5)
    assert not np.allclose(scored["p_click"].to_numpy(), raw["p_click"].to_numpy(), rtol=1e-3)
    assert_frame_equal(scored.drop("p_click"), raw.drop("p_click"))
    with pytest.raises(ValueError, match=r"calibration: \['dwell'\] are not binary tasks"):
        save_package(tmp_path / "bad", *args, calibration={"dwell": PlattScaling()})


# ----------------------------------------------------------------------------------------- flat source

FLAT_FEATURES = {
    "name": "tiny_flat",
    "source": "flat",
    "split": {"method": "hash", "validation_fraction": 0.2, "test_fraction": 0.2, "seed": 0},
    "passthrough": ["row_id"],
    "labels": [
        {"name": "rich", "column": "income", "positive_prefix": "50000+"},
        {"name": "single", "column": "marital", "positive_values": ["Never married"]},
    ],
    "features": [
        {"name": "city", "kind": "categorical"},
        {"name": "level", "kind": "categorical"},
        {"name": "age_z", "source": "age", "kind": "numeric", "transforms": ["log1p", "standardize"]},
        {
            "name": "wage_bucket",
            "source": "wage",
            "kind": "numeric",
            "transforms": ["bucketize"],
            "num_buckets": 3,
        },
    ],
}


def flat_frame(n: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "row_id": np.arange(n, dtype=np.int64) + 1000 * seed,
            "city": rng.choice(["paris", "lyon", "nice"], n).tolist(),
            "level": rng.integers(0, 4, n),
            "age": rng.uniform(18, 80, n),
            "wage": rng.uniform(0, 50, n),
            "income": rng.choice(["- 50000.", "50000+."], n).tolist(),
            "marital": rng.choice(["Never married", "Divorced"], n).tolist(),
        }
    )


def test_flat_round_trip_with_unseen_values_and_nulls(tmp_path):
    config = FeatureConfig.from_dict(FLAT_FEATURES)
    spec = fit_spec(config, Tables(flat_frame(40, seed=0).lazy()))
    package = in_memory_package(
        spec,
        {
            "tasks": [{"name": "rich"}, {"name": "single"}],
            "embedding": {"dim": 4},
            "arch": {"type": "shared_bottom", "expert_hidden": [8]},
        },
    )
    rows = (
        flat_frame(6, seed=1)
        .drop("income", "marital")
        .with_columns(
            pl.Series("city", ["paris", "tokyo", None, "lyon", "nice", "paris"]),
            pl.Series("age", [20.0, None, 30.0, float("nan"), 50.0, 60.0]),
        )
    )
    expected = predict_frame(package, rows)
    assert expected.columns == ["row_id", "p_rich", "p_single"]
    assert expected["row_id"].to_list() == rows["row_id"].to_list()
    assert np.isfinite(expected["p_rich"].to_numpy()).all()
    loaded = load_package(save_package(tmp_path / "pkg", package.model, package.model_config, spec))
    assert_frame_equal(predict_frame(loaded, rows), expected)
    assert_frame_equal(predict_frame(loaded, rows.to_pandas()), expected)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['wage'\]"):
        predict_frame(loaded, rows.drop("wage"))


def test_model_config_survives_json_with_every_section():
    config = ModelConfig.from_dict(
        {
            **TINY_MODEL,
            "embedding": {"dim": 4, "shared_tables": [["a", "b"]]},
            "gate": {"type": "noisy_topk", "k": 1, "dispatch": True},
        }
    )
    assert ModelConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(config)))) == config


def test_attention_round_trip_gives_the_in_memory_predictions(ecommerce_built, scoring_rows, tmp_path):
    spec = ecommerce_built[0].spec
    attention = {
        **TINY_MODEL,
        "embedding": {"dim": 4, "history_pooling": "attention", "attention_hidden": [8]},
    }
    package = in_memory_package(spec, attention)
    assert package.model.history_arch.keys == ["item", "category", "hist_items", "hist_categories"]
    expected = predict_frame(package, scoring_rows)
    assert np.isfinite(expected["p_click"].to_numpy()).all()
    mean = predict_frame(in_memory_package(spec, TINY_MODEL), scoring_rows)
    assert not np.allclose(expected["p_click"].to_numpy(), mean["p_click"].to_numpy())
    loaded = load_package(save_package(tmp_path / "pkg", package.model, package.model_config, spec))
    assert loaded.model_config.embedding.history_pooling == "attention"
    assert_frame_equal(predict_frame(loaded, scoring_rows), expected)


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_quantized_tables_score_close_to_fp32_and_a_quantized_package_carries_them(
    ecommerce_built, scoring_rows, tmp_path, pooling
):
    spec = ecommerce_built[0].spec
    config = {**TINY_MODEL, "embedding": {"dim": 8, "history_pooling": pooling, "attention_hidden": [8]}}
    package = in_memory_package(spec, config)
    for table in package.model.embedding_parameters():  # a wider spread than the default init
        torch.nn.init.normal_(table.data, std=0.5)
    fp32 = save_package(tmp_path / "fp32", package.model, package.model_config, spec)
    expected = predict_frame(load_package(fp32), scoring_rows)
    tolerance = {"fp16": 1e-3, "int8": 2e-2, "int4": 1e-1}
    for dtype, atol in tolerance.items():
        quantized = load_package(fp32, embedding_dtype=dtype)
        assert (
            quantized.embedding_dtype == dtype
            and quantized.precision_line() == f"{dtype} tables, fp32 dense layers"
        )
        got = predict_frame(quantized, scoring_rows)
        assert got["impression_id"].to_list() == expected["impression_id"].to_list()
        error = np.abs(got["p_click"].to_numpy() - expected["p_click"].to_numpy())
        assert 0 < error.max() < atol, (dtype, error.max())
        # The quantized copy holds the quantized rows: smaller, and the same scores as quantizing on load.
        copy = quantize_package(fp32, tmp_path / dtype, dtype)
        assert json.loads((copy / MANIFEST).read_text())["embedding_dtype"] == dtype
        assert (copy / WEIGHTS).stat().st_size < (fp32 / WEIGHTS).stat().st_size
        state = torch.load(copy / WEIGHTS, weights_only=True)
        packed = torch.float16 if dtype == "fp16" else torch.uint8
        assert any(v.dtype == packed for v in state.values())
        assert_frame_equal(predict_frame(load_package(copy), scoring_rows), got)
        with pytest.raises(ValueError, match=rf"holds {dtype} tables.*got 'fp32'"):
            load_package(copy, embedding_dtype="fp32")
        with pytest.raises(ValueError, match=f"already {dtype}"):
            quantize_package(copy, tmp_path / "twice", "int4")
    with pytest.raises(ValueError, match="embedding_dtype: expected one of .* got 'int2'"):
        load_package(fp32, embedding_dtype="int2")


def test_bf16_dense_layers_score_close_to_fp32_and_fp32_is_unchanged(ecommerce, scoring_rows, tmp_path):
    path = save_package(tmp_path / "pkg", ecommerce.model, ecommerce.model_config, ecommerce.spec)
    expected = predict_frame(ecommerce, scoring_rows)
    assert load_package(path).compute_dtype is None
    assert_frame_equal(predict_frame(load_package(path, compute_dtype="fp32"), scoring_rows), expected)
    bf16 = load_package(path, compute_dtype="bf16")
    assert bf16.compute_dtype == torch.bfloat16 and bf16.precision_line() == "fp32 tables, bf16 dense layers"
    error = np.abs(predict_frame(bf16, scoring_rows)["p_click"].to_numpy() - expected["p_click"].to_numpy())
    assert 0 < error.max() < 2e-2
    with pytest.raises(ValueError, match="compute_dtype: expected one of .* got 'fp8'"):
        load_package(path, compute_dtype="fp8")
