from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features.config import FeatureConfig, HistoryConfig, builtin_config
from features.contract import ContractError
from features.derive import derive_ecommerce, derive_ecommerce_indexed, in_time_order
from features.pipeline import Tables, build, fit_spec, scan_table, split_expr, split_rows, transform
from features.spec import FeatureSpec, apply, fit

from .conftest import at, impressions_frame

CENSUS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "census-income" / "census-income.dev.csv.gz"
)
ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> FeatureConfig:
    data = {
        "name": "tiny",
        "source": "ecommerce",
        "split": {"method": "time", "validation_days": 3, "test_days": 3},
        "history": {"max_length": 2, "windows_days": [1, 7]},
        "passthrough": ["impression_id", "user_id"],
        "labels": [{"name": "click"}, {"name": "purchase"}],
        "features": [
            {"name": "item", "source": "item_id", "kind": "categorical"},
            {"name": "user", "source": "user_id", "kind": "categorical", "hash_buckets": 50},
            {"name": "category", "source": "category_id", "kind": "categorical"},
            {"name": "city_id", "source": "city", "kind": "categorical"},
            {"name": "hist_items", "source": "hist_item_ids", "kind": "multi_hot", "vocab_of": "item"},
            {"name": "hist_cats", "source": "hist_category_ids", "kind": "multi_hot"},
            {"name": "price_z", "source": "price", "kind": "numeric", "transforms": ["log1p", "standardize"]},
            {"name": "rating_z", "source": "rating", "kind": "numeric", "transforms": ["standardize"]},
            {"name": "clicks_7d", "source": "user_clicks_7d", "kind": "numeric", "transforms": ["log1p"]},
        ],
    }
    data.update(overrides)
    return FeatureConfig.from_dict(data)


def tables(impressions, users, items, history=None) -> Tables:
    return Tables(impressions.lazy(), users.lazy(), items.lazy(), None if history is None else history.lazy())


# ----------------------------------------------------------------------------- derived columns


def test_history_is_strictly_before_each_impression(impressions, users, items):
    out = derive_ecommerce(
        impressions.lazy(), users.lazy(), items.lazy(), HistoryConfig(max_length=2)
    ).collect()
    got = out.select(
        "impression_id", "hist_item_ids", "hist_category_ids", "user_clicks_1d", "user_clicks_7d"
    )
    expected = pl.DataFrame(
        {
            "impression_id": list(range(1, 15)),
            # Impressions 1-3 are the first page view: its own clicks (items 100, 101) are not history.
            "hist_item_ids": [
                [],
                [],
                [],
                [100, 101],
                [100, 101],
                [],
                [],
                [101, 103],
                [],
                [102],
                [103, 104],
                [102],
                [104, 102],
                [],
            ],
            "hist_category_ids": [
                [],
                [],
                [],
                [1, 1],
                [1, 1],
                [],
                [],
                [1, 2],
                [],
                [2],
                [2, 3],
                [2],
                [3, 2],
                [],
            ],
            # Impression 4 (day 1, 12:00) sees the clicks of day 0, 09:00, which are 27 h old: not in 1 day.
            "user_clicks_1d": [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            "user_clicks_7d": [0, 0, 0, 2, 2, 0, 0, 3, 0, 1, 4, 1, 3, 0],
        },
        schema_overrides={"hist_item_ids": pl.List(pl.Int64), "hist_category_ids": pl.List(pl.Int64)},
    )
    assert_frame_equal(got, expected)


def test_top_category_match_with_last_click_and_with_the_previous_days_last_click(users, items):
    rows = impressions_frame(
        [
            (1, 1, at(0, 9), 10, 100, 1, 1, 0),  # clicks a home item on day 0
            (2, 2, at(1, 9), 10, 102, 1, 1, 0),  # a toys item on day 1, 09:00
            (3, 3, at(1, 10), 10, 103, 1, 0, 0),  # toys: matches the last click, not the day-0 one
            (4, 3, at(1, 10), 10, 101, 2, 0, 0),  # home: matches the day-0 click only
            (5, 4, at(2, 10), 10, 104, 1, 0, 0),  # food: matches neither
            (6, 5, at(2, 10), 10, 999, 2, 0, 0),  # unknown item: no top category, no match
        ]
    )
    out = derive_ecommerce(rows.lazy(), users.lazy(), items.lazy(), HistoryConfig()).collect()
    assert out["last_click_same_top"].to_list() == [0, 0, 1, 0, 0, 0]
    assert out["prev_day_click_same_top"].to_list() == [0, 0, 0, 1, 0, 0]


def test_time_features(impressions, users, items):
    out = derive_ecommerce(impressions.lazy(), users.lazy(), items.lazy(), HistoryConfig()).collect()
    row = out.filter(pl.col("impression_id") == 4).row(0, named=True)
    assert row["hour"] == 12
    assert row["weekday"] == 5  # 2026-01-02 is a Friday
    assert row["item_age_days"] == pytest.approx(1 + 1.5)  # item 103 listed at day -1
    assert row["user_tenure_days"] == pytest.approx(101.5)
    assert row["log_price"] == pytest.approx(math.log1p(50.0))


def test_appending_later_events_leaves_earlier_features_unchanged(impressions, users, items):
    cfg = tiny_config()
    spec = fit_spec(cfg, tables(impressions, users, items))
    later = impressions_frame(
        [(100 + i, 100 + i, at(9, 11 + i), 10, 100 + i % 4, 1, 1, i % 2) for i in range(6)]
        + [(200, 200, at(12), 20, 101, 1, 1, 0)]
    )
    before = apply(
        spec, derive_ecommerce(impressions.lazy(), users.lazy(), items.lazy(), cfg.history)
    ).collect()
    appended = pl.concat([impressions, later])
    after = apply(spec, derive_ecommerce(appended.lazy(), users.lazy(), items.lazy(), cfg.history)).collect()
    after = after.filter(pl.col("impression_id").is_in(impressions["impression_id"].implode()))
    assert_frame_equal(before, after)


def test_history_kept_per_state_gives_the_same_output_as_per_row_lists(impressions, users, items):
    cfg = tiny_config()
    spec = fit_spec(cfg, tables(impressions, users, items))
    per_row = apply(spec, derive_ecommerce(impressions.lazy(), users.lazy(), items.lazy(), cfg.history))
    rows, lists = derive_ecommerce_indexed(impressions.lazy(), users.lazy(), items.lazy(), cfg.history)
    assert "hist_item_ids" not in rows.collect_schema().names()
    assert_frame_equal(per_row.collect(), apply(spec, rows, lists=lists).collect())


def test_training_and_scoring_paths_give_identical_features(impressions, users, items, tmp_path):
    cfg = tiny_config()
    spec, train = build(cfg, tables(impressions, users, items), tmp_path / "train", progress=False)
    scoring_rows = impressions.filter(pl.col("impression_id") >= 9).drop("click", "purchase")
    scored = transform(
        spec, tables(scoring_rows, users, items, history=impressions), tmp_path / "score", progress=False
    )
    assert scored.rows == {"all": 6}
    as_scoring = pl.read_parquet(tmp_path / "score" / "all").sort("impression_id")
    as_training = (
        pl.concat([pl.read_parquet(tmp_path / "train" / s) for s in ("train", "valid", "test")])
        .filter(pl.col("impression_id") >= 9)
        .drop("click", "purchase")
        .sort("impression_id")
    )
    assert_frame_equal(as_scoring, as_training)


# ------------------------------------------------------------------------------------ the spec


def test_vocabulary_hashing_and_out_of_vocabulary(impressions, users, items, tmp_path):
    spec, _ = build(tiny_config(), tables(impressions, users, items), tmp_path / "out", progress=False)
    item = spec.fitted["item"]
    # Training window = days 0-3 (impressions 1-8): item 100, 102, 104 twice; ties broken by value.
    assert item["vocab"] == [100, 102, 104, 101, 103]
    assert item["num_embeddings"] == 6
    assert spec.fitted["hist_items"]["num_embeddings"] == 6
    assert spec.fitted["city_id"]["vocab"] == ["paris", "lyon"]
    frame = pl.DataFrame(
        {
            "item_id": [100, 103, 999, None],
            "user_id": [10, 10, 20, None],
            "category_id": [1, 3, 9, None],
            "city": ["lyon", "paris", "rome", None],
            "hist_item_ids": [[100, 999], [], None, [103]],
            "hist_category_ids": [[1], [2, 3], [], None],
            "price": [10.0, None, float("nan"), 1.0],
            "rating": [4.5, None, 3.0, 5.0],
            "user_clicks_7d": [0, 1, 2, 3],
            "impression_id": [1, 2, 3, 4],
        },
        schema_overrides={"rating": pl.Float32},
    )
    out = apply(spec, frame.lazy(), labels=False).collect()
    assert out["item"].to_list() == [1, 5, 0, 0]  # unseen 999 and null: the out-of-vocabulary bucket 0
    assert out["city_id"].to_list() == [2, 1, 0, 0]
    assert out["hist_items"].to_list() == [[1, 0], [], [], [5]]
    users_hashed = out["user"].to_list()
    assert users_hashed[0] == users_hashed[1] != users_hashed[2] and users_hashed[3] == 0
    assert all(1 <= u <= 50 for u in users_hashed[:3])
    # Nulls and NaNs are filled with the training mean, which standardizes to ~0.
    price = spec.fitted["price_z"]
    assert price["fill_value"] == pytest.approx(items.join(impressions.head(8), on="item_id")["price"].mean())
    assert out["price_z"][1] == pytest.approx(
        (math.log1p(price["fill_value"]) - price["steps"][1]["mean"]) / price["steps"][1]["std"], rel=1e-5
    )
    assert out["price_z"][1] == out["price_z"][2]
    assert out["clicks_7d"].to_list() == pytest.approx([math.log1p(v) for v in (0, 1, 2, 3)])
    assert out.schema["item"] == pl.Int64 and out.schema["price_z"] == pl.Float32
    assert out.schema["hist_items"] == pl.List(pl.Int64)


def test_numeric_transforms_golden_values():
    train = pl.DataFrame(
        {"x": [1.0, 2.0, 3.0, 4.0, None], "g": ["a", "a", "b", "b", "b"], "y": [0, 1, 0, 1, 0]}
    )
    cfg = FeatureConfig.from_dict(
        {
            "name": "num",
            "source": "flat",
            "split": {"method": "hash"},
            "labels": [{"name": "y"}],
            "features": [
                {
                    "name": "z",
                    "source": "x",
                    "kind": "numeric",
                    "fill_null": "zero",
                    "transforms": ["standardize"],
                },
                {
                    "name": "b",
                    "source": "x",
                    "kind": "numeric",
                    "transforms": ["bucketize"],
                    "boundaries": [2, 3.5],
                },
                {
                    "name": "q",
                    "source": "x",
                    "kind": "numeric",
                    "fill_null": "median",
                    "transforms": ["bucketize"],
                    "num_buckets": 2,
                },
                {"name": "r", "source": "x", "kind": "numeric", "relative_to": "g"},
            ],
        }
    )
    spec = fit(cfg, train, {"method": "hash"})
    out = apply(spec, train.lazy()).collect()
    filled = [1.0, 2.0, 3.0, 4.0, 0.0]
    mean = sum(filled) / 5
    std = (sum((v - mean) ** 2 for v in filled) / 4) ** 0.5  # sample std, as polars
    assert out["z"].to_list() == pytest.approx([(v - mean) / std for v in filled], rel=1e-6)
    assert out["b"].to_list() == [1, 2, 2, 3, 2]  # null -> mean 2.5 -> bucket [2, 3.5)
    assert spec.fitted["b"]["num_embeddings"] == 4
    assert spec.fitted["q"]["steps"][0]["boundaries"] == [2.5]
    # Group medians: a -> 1.5, b -> 3.0 (the null is filled with the mean 2.5 first).
    assert out["r"].to_list() == pytest.approx([1 / 1.5, 2 / 1.5, 1.0, 4 / 3, 2.5 / 3])


def test_spec_round_trip_hash_and_tamper_detection(impressions, users, items, tmp_path):
    cfg = tiny_config()
    spec = fit_spec(cfg, tables(impressions, users, items))
    again = fit_spec(cfg, tables(impressions, users, items))
    assert spec.content_hash == again.content_hash
    path = spec.save(tmp_path / "spec.json")
    loaded = FeatureSpec.load(path)
    assert loaded.content_hash == spec.content_hash
    assert loaded.sparse_features() == {
        "item": 6,
        "user": 51,
        "category": 4,
        "city_id": 3,
        "hist_items": 6,
        "hist_cats": 3,
    }
    assert loaded.dense_features() == ["price_z", "rating_z", "clicks_7d"]
    body = json.loads(path.read_text())
    body["fitted"]["item"]["vocab"][0] = 12345
    path.write_text(json.dumps(body))
    with pytest.raises(ValueError, match="content_hash .* does not match"):
        FeatureSpec.load(path)


def test_fit_then_transform_equals_build(impressions, users, items, tmp_path):
    cfg = tiny_config()
    spec_a, built = build(cfg, tables(impressions, users, items), tmp_path / "a", progress=False)
    spec_b = fit_spec(cfg, tables(impressions, users, items))
    assert spec_a.content_hash == spec_b.content_hash
    result = transform(spec_b, tables(impressions, users, items), tmp_path / "b", progress=False)
    assert result.rows == built.rows == {"train": 8, "valid": 3, "test": 3}
    for split in ("train", "valid", "test"):
        assert_frame_equal(pl.read_parquet(tmp_path / "a" / split), pl.read_parquet(tmp_path / "b" / split))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["rows"]["train"] == 8
    assert manifest["label_means"]["train"]["click"] == pytest.approx(5 / 8)


def test_output_is_written_in_small_row_groups(tmp_path):
    """The output is in time order; training mixes it by reading small row groups in a random order."""
    import pyarrow.parquet as pq

    from features.pipeline import ROW_GROUP_ROWS, load_tables
    from synth.generate import generate

    generate(tmp_path / "raw", 40_000, seed=3, progress=False)
    config = FeatureConfig.from_yaml(builtin_config("ecommerce"))
    build(config, load_tables(tmp_path / "raw"), tmp_path / "f", progress=False)
    files = sorted((tmp_path / "f" / "train").glob("*.parquet"))
    sizes = [m.row_group(g).num_rows for m in map(pq.read_metadata, files) for g in range(m.num_row_groups)]
    assert max(sizes) == ROW_GROUP_ROWS and len(sizes) == math.ceil(sum(sizes) / ROW_GROUP_ROWS) > 2


def test_output_folder_is_not_overwritten_by_accident(impressions, users, items, tmp_path):
    cfg = tiny_config()
    build(cfg, tables(impressions, users, items), tmp_path / "out", progress=False)
    with pytest.raises(FileExistsError, match="exists"):
        build(cfg, tables(impressions, users, items), tmp_path / "out", progress=False)
    build(cfg, tables(impressions, users, items), tmp_path / "out", overwrite=True, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_bad_input_fails_before_any_output(impressions, users, items, tmp_path):
    bad = items.with_columns(pl.col("price") * -1)
    with pytest.raises(ContractError, match=r"items\.price"):
        build(tiny_config(), tables(impressions, users, bad), tmp_path / "out", progress=False)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"source": "sql"}, r"config\.source: expected one of \['ecommerce', 'flat'\], got 'sql'"),
        ({"features": [{"name": "a", "kind": "embedding"}]}, r"features\[a\]\.kind: .* got 'embedding'"),
        (
            {"features": [{"name": "a", "kind": "numeric", "transforms": ["sqrt"]}]},
            r"features\[a\]\.transforms: .* got 'sqrt'",
        ),
        (
            {"features": [{"name": "a", "kind": "categorical", "min_count": 0}]},
            r"features\[a\]\.min_count: expected an integer >= 1, got 0",
        ),
        (
            {"features": [{"name": "a", "kind": "numeric", "transforms": ["bucketize", "log1p"]}]},
            r"features\[a\]\.transforms: bucketize must be the last",
        ),
        (
            {"features": [{"name": "a", "source": "click", "kind": "categorical"}]},
            r"features\[a\]\.source: a feature may not read a label column, got 'click'",
        ),
        ({"features": [{"name": "a", "kind": "categorical", "colour": 1}]}, r"features\[0\]: unknown field"),
        ({"split": {"method": "hash"}}, r"split\.method: ecommerce data is split by time, got 'hash'"),
        ({"split": {"validation_fraction": 1.5}}, r"split\.validation_fraction: .* got 1\.5"),
    ],
)
def test_config_errors_name_the_field_and_value(change, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**change)


def test_shipped_configs_load():
    for name in ("ecommerce", "census_group1", "census_group2"):
        cfg = FeatureConfig.from_yaml(builtin_config(name))
        label_columns = {lab.column for lab in cfg.labels}
        assert not label_columns & {f.source for f in cfg.features}
    with pytest.raises(ValueError, match="no shipped config 'nope'"):
        builtin_config("nope")


# ------------------------------------------------------------------------------- generic path


def test_census_flat_path(tmp_path):
    cfg = FeatureConfig.from_yaml(builtin_config("census_group1"))
    spec, result = build(cfg, Tables(scan_table(CENSUS)), tmp_path / "census", progress=False)
    assert sum(result.rows.values()) == 49_898
    assert 0.7 < result.rows["train"] / 49_898 < 0.9
    train = pl.read_parquet(tmp_path / "census" / "train")
    assert 0.05 < train["income_50k"].mean() < 0.075  # README: about 6.2%
    assert 0.40 < train["never_married"].mean() < 0.46  # README: about 43%
    inputs = set(spec.sparse_features()) | set(spec.dense_features())
    assert not inputs & {"income_50k", "marital_stat", "education", "instance_weight"}
    assert len(inputs) == 38


def test_flat_table_missing_column_is_named(tmp_path):
    cfg = FeatureConfig.from_yaml(builtin_config("census_group1"))
    table = scan_table(CENSUS).drop("sex")
    with pytest.raises(ContractError, match=r"flat table: missing column\(s\) \['sex'\]"):
        build(cfg, Tables(table), tmp_path / "x", progress=False)


def test_cli_help_and_errors(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "pipelines.features", "build", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and "--config" in run.stdout
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.features",
            "build",
            "--config",
            "census_group1",
            "--table",
            str(tmp_path / "missing.csv"),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "no input files" in run.stderr


def test_split_rows_gives_each_splits_rows_in_order_whether_or_not_they_are_consecutive():
    ts = [at(day) for day in (1, 2, 3, 4, 5, 6)]
    rows = pl.DataFrame({"ts": ts, "v": [0, 1, 2, 3, 4, 5]}).with_row_index("__row")
    time_split = {
        "method": "time",
        "column": "ts",
        "valid_start": at(3).isoformat(),
        "test_start": at(5).isoformat(),
    }
    parts = split_rows(rows, time_split)
    assert list(parts) == ["train", "valid", "test"]
    assert [parts[name]["v"].to_list() for name in parts] == [[0, 1], [2, 3], [4, 5]]
    # The same rows out of time order: the splits are no longer consecutive runs of rows.
    shuffled = rows.select(pl.all().gather([4, 0, 2, 5, 1, 3]))
    parts = split_rows(shuffled, time_split)
    assert [parts[name]["v"].to_list() for name in parts] == [[0, 1], [2, 3], [4, 5]]
    hash_split = {"method": "hash", "validation_fraction": 0.3, "test_fraction": 0.3, "seed": 1}
    names = rows.select(split_expr(hash_split)).to_series().to_list()
    parts = split_rows(rows, hash_split)
    for name, part in parts.items():
        assert part["v"].to_list() == [v for v, n in zip(rows["v"], names, strict=True) if n == name]


def test_impressions_out_of_time_order_derive_as_when_sorted(impressions, users, items):
    cfg = tiny_config()
    ordered = impressions.sort("ts", "impression_id")
    shuffled = ordered.sample(fraction=1.0, shuffle=True, seed=3)
    assert in_time_order(ordered.lazy()) and not in_time_order(shuffled.lazy())
    derive = lambda imp: derive_ecommerce(imp.lazy(), users.lazy(), items.lazy(), cfg.history).collect()  # noqa: E731
    assert_frame_equal(derive(shuffled), derive(ordered))


@pytest.mark.parametrize(
    "dtype, vocab, values",
    [
        ("int", [7, 3, 0, 12], [3, 0, 12, 7, 5, 13, 99, -1, None]),
        ("int", [10**12, 5], [5, 10**12, 6, None]),  # too sparse for a table: the hash map
        ("str", ["b", "a", "c"], ["a", "c", "b", "z", None]),
        ("str", [], ["a", None]),
    ],
)
def test_vocabulary_lookups_give_the_hash_maps_ids(dtype, vocab, values):
    from features.spec import _vocab_expr

    state = {"vocab": vocab, "dtype": dtype}
    frame = pl.DataFrame({"x": values}, schema={"x": pl.Int64 if dtype == "int" else pl.String})
    fast = frame.select(_vocab_expr(pl.col("x"), state)).to_series().to_list()
    slow = frame.select(_vocab_expr(pl.col("x"), state, lookup=False)).to_series().to_list()
    expected = [vocab.index(v) + 1 if v in vocab else 0 for v in values]
    assert fast == slow == expected
