"""Affinity features: point in time against a brute-force count, the same when scoring, config errors."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features.affinity import derived_column, history_needs
from features.config import FeatureConfig, builtin_config
from features.derive import derive_ecommerce
from features.pipeline import Tables, build, transform
from synth.generate import generate
from tests.conftest import at, impressions_frame

FEATURES = [
    {"name": "u_top", "kind": "affinity", "key": "top_category"},
    {"name": "u_cat_7d", "kind": "affinity", "key": "category_id", "window_days": 7},
    {"name": "u_top_share", "kind": "affinity", "key": "top_category", "stat": "share", "smoothing": 4},
    {"name": "u_brand_buys", "kind": "affinity", "key": "brand_id", "event": "purchase"},
    {"name": "u_shop_cvr", "kind": "affinity", "key": "shop_id", "event": "purchase", "stat": "rate"},
    {"name": "u_price_gap", "kind": "affinity", "stat": "gap", "value": "log_price"},
    {"name": "u_rating", "kind": "affinity", "stat": "mean", "value": "rating"},
    {"name": "item_ctr", "kind": "affinity", "by": "all", "key": "item_id", "stat": "rate"},
    {"name": "cat_clicks_2d", "kind": "affinity", "by": "all", "key": "category_id", "window_days": 2},
    # No smoothing: a user without clicks on the shop gets 0, not NaN.
    {
        "name": "u_shop_cvr_raw",
        "kind": "affinity",
        "key": "shop_id",
        "event": "purchase",
        "stat": "rate",
        "smoothing": 0,
    },
]


def config(features=FEATURES) -> FeatureConfig:
    return FeatureConfig.from_dict(
        {"name": "t", "source": "ecommerce", "labels": [{"name": "click"}], "features": features}
    )


def affinities(cfg: FeatureConfig) -> list:
    return [f for f in cfg.features if f.kind == "affinity"]


def derived(impressions, users, items, cfg=None, history=None) -> pl.DataFrame:
    cfg = cfg or config()
    lazy = derive_ecommerce(
        impressions.lazy(),
        users.lazy(),
        items.lazy(),
        cfg.history,
        None if history is None else history.lazy(),
        affinities(cfg),
    )
    return lazy.collect()


def brute_force(ev: pl.DataFrame, row: dict) -> dict:
    """Every feature of FEATURES for one row, by filtering the events before it."""
    before = ev.filter(pl.col("ts") < row["ts"])
    mine = before.filter(pl.col("user_id") == row["user_id"])
    clicks = mine.filter(pl.col("click") == 1)
    day = row["ts"].replace(hour=0, minute=0, second=0, microsecond=0)
    everybody = ev.filter(pl.col("ts") < day)

    def same(frame: pl.DataFrame, key: str) -> pl.DataFrame:
        return frame.filter(pl.col(key) == row[key]) if row[key] is not None else frame.clear()

    n_top = same(clicks, "top_category").height
    all_clicks = everybody.filter(pl.col("click") == 1)
    top_prior = same(all_clicks, "top_category").height / max(all_clicks.height, 1)
    shop = same(mine, "shop_id")
    cvr_prior = everybody["purchase"].sum() / max(all_clicks.height, 1)
    ctr_prior = all_clicks.height / max(everybody.height, 1)
    item = same(everybody, "item_id")
    recent = everybody.filter(pl.col("ts") >= day - dt.timedelta(days=2))

    def mean(column: str) -> float | None:
        values = clicks[column].drop_nulls()
        return float(values.mean()) if len(values) else None

    gap = mean("log_price")
    week = dt.timedelta(days=7)
    return {
        "u_top": n_top,
        "u_cat_7d": same(clicks, "category_id").filter(pl.col("ts") >= row["ts"] - week).height,
        "u_top_share": (n_top + 4 * top_prior) / (clicks.height + 4),
        "u_brand_buys": same(mine, "brand_id")["purchase"].sum(),
        "u_shop_cvr": (shop["purchase"].sum() + 10 * cvr_prior) / (shop["click"].sum() + 10),
        "u_shop_cvr_raw": shop["purchase"].sum() / max(shop["click"].sum(), 1),  # no clicks: 0, not NaN
        "u_price_gap": None if gap is None or row["log_price"] is None else row["log_price"] - gap,
        "u_rating": mean("rating"),
        "item_ctr": (item["click"].sum() + 10 * ctr_prior) / (item.height + 10),
        "cat_clicks_2d": same(recent, "category_id")["click"].sum(),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    generate(folder, 6000, 5, world="interest")
    return {name: pl.read_parquet(folder / f"{name}.parquet") for name in ("impressions", "users", "items")}


def test_each_value_equals_a_brute_force_count_of_the_events_strictly_before(world):
    out = derived(world["impressions"], world["users"], world["items"])
    events = out.select(
        "impression_id", "user_id", "ts", "item_id", "category_id", "top_category", "brand_id", "shop_id",
        "click", "purchase", "log_price", "rating",
    )  # fmt: skip
    sample = out.sample(120, seed=3)
    names = [f["name"] for f in FEATURES]
    got = sample.select(derived_column(n) for n in names).rows()
    for row, values in zip(sample.iter_rows(named=True), got, strict=True):
        expected = brute_force(events, row)
        for name, value in zip(names, values, strict=True):
            want = expected[name]
            assert (value is None) == (want is None), (name, row["impression_id"], value, want)
            if want is not None:
                assert value == pytest.approx(want, rel=1e-9, abs=1e-9), (name, row["impression_id"])
    # The sample is not trivially zero: users have clicked before, and items have been seen.
    assert (sample[derived_column("u_top")] > 0).sum() > 20
    assert sample[derived_column("item_ctr")].n_unique() > 20


def test_a_pages_own_clicks_never_count_and_later_events_change_nothing(impressions, users, items):
    out = derived(impressions, users, items).sort("impression_id")
    u_top = dict(zip(out["impression_id"], out[derived_column("u_top")], strict=True))
    # Impressions 1 and 2 are one page view of user 10 with two clicks on "home" items: neither sees them.
    assert u_top[1] == 0 and u_top[2] == 0
    assert u_top[5] == 2  # the next page: item 100 is "home", and both clicks are before it
    later = impressions_frame([(100 + i, 100 + i, at(9, 11 + i), 10, 100, 1, 1, 1) for i in range(4)])
    after = derived(pl.concat([impressions, later]), users, items).filter(pl.col("impression_id") < 100)
    assert_frame_equal(after.sort("impression_id"), out)


def test_the_scoring_path_with_a_history_log_gives_the_training_values(world, tmp_path):
    imps, users, items = world["impressions"], world["users"], world["items"]
    cfg = FeatureConfig.from_yaml(builtin_config("ecommerce_affinity"))
    spec, _ = build(cfg, Tables(imps.lazy(), users.lazy(), items.lazy()), tmp_path / "train", progress=False)
    last_day = imps["ts"].max().replace(hour=0, minute=0, second=0, microsecond=0)
    rows = imps.filter(pl.col("ts") >= last_day).drop("click", "purchase")
    history = Tables(rows.lazy(), users.lazy(), items.lazy(), imps.lazy())
    transform(spec, history, tmp_path / "score", progress=False)
    as_scoring = pl.read_parquet(tmp_path / "score" / "all").sort("impression_id")
    as_training = (
        pl.read_parquet(tmp_path / "train" / "test")
        .filter(pl.col("impression_id").is_in(rows["impression_id"].implode()))
        .drop("click", "purchase")
        .sort("impression_id")
    )
    assert as_scoring.height == rows.height > 0
    assert_frame_equal(as_scoring, as_training)
    affinity_columns = [f.name for f in affinities(cfg)]
    assert all(as_scoring[c].std() > 0 for c in affinity_columns)


def test_what_the_history_must_hold():
    clicks_only = history_needs(affinities(config(FEATURES[:2])))
    assert not (clicks_only.every_impression or clicks_only.purchases or clicks_only.every_user)
    assert history_needs(affinities(config(FEATURES[3:4]))).purchases
    share = history_needs(affinities(config(FEATURES[2:3])))  # its prior is everybody's share
    assert share.every_user and not share.purchases
    everybody = history_needs(affinities(config(FEATURES[7:8])))
    assert everybody.every_impression and everybody.every_user and not everybody.purchases
    user_ctr = {"name": "u_ctr", "kind": "affinity", "stat": "rate"}
    assert history_needs(affinities(config([user_ctr]))).every_impression


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        ({"by": "everyone"}, r"features\[a\]\.by: expected one of \['user', 'all'\], got 'everyone'"),
        ({"key": "colour"}, r"features\[a\]\.key: expected one of .* got 'colour'"),
        ({"by": "all"}, r"features\[a\]\.key: by: all counts everybody's events on a key; name one, got ''"),
        ({"stat": "rate", "per": "purchase"}, r"features\[a\]\.per: expected one of .* got 'purchase'"),
        (
            {"stat": "rate", "event": "impression"},
            r"features\[a\]\.event: a rate needs an event that follows",
        ),
        ({"stat": "share"}, r"features\[a\]\.stat: a share is the user's events on a key"),
        ({"stat": "gap"}, r"features\[a\]\.value: expected one of \['log_price', 'rating'\], got ''"),
        ({"per": "click"}, r"features\[a\]\.per: only stat: rate takes per, got 'click'"),
        ({"window_days": -1}, r"features\[a\]\.window_days: expected an integer >= 0, got -1"),
        ({"smoothing": -2}, r"features\[a\]\.smoothing: expected a number >= 0, got -2"),
        ({"source": "price"}, r"features\[a\]\.source: affinity features compute their own column"),
        ({"kind": "numeric", "key": "brand_id"}, r"features\[a\]\.key: only affinity features take it"),
    ],
)
def test_config_errors_name_the_field_and_value(feature, message):
    with pytest.raises(ValueError, match=message):
        config([{"name": "a", "kind": "affinity", **feature}])


def test_a_config_extends_another_and_a_loop_is_refused(tmp_path):
    shipped = FeatureConfig.from_yaml(builtin_config("ecommerce_affinity"))
    base = FeatureConfig.from_yaml(builtin_config("ecommerce"))
    assert shipped.features[: len(base.features)] == base.features
    assert shipped.history == base.history and shipped.split == base.split
    assert len(affinities(shipped)) == len(shipped.features) - len(base.features) >= 10
    (tmp_path / "a.yaml").write_text(
        "name: a\nextends: b.yaml\nsplit: {validation_days: 1, test_days: 1}\nfeatures:\n"
        "  - {name: u_top, kind: affinity, key: top_category}\n"
    )
    (tmp_path / "b.yaml").write_text("extends: ecommerce\nname: b\n")
    a = FeatureConfig.from_yaml(tmp_path / "a.yaml")
    assert a.name == "a" and a.split.test_days == 1 and a.features[-1].name == "u_top"
    assert a.features[:-1] == base.features
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    with pytest.raises(
        ValueError, match=r"b\.yaml\.extends: the configs extend each other in a loop, got 'a\.yaml'"
    ):
        FeatureConfig.from_yaml(tmp_path / "a.yaml")
    with pytest.raises(ValueError, match="affinity features need the ecommerce source"):
        FeatureConfig.from_dict(
            {"name": "f", "source": "flat", "labels": [{"name": "y"}], "features": FEATURES[:1]}
        )


def test_rates_fall_back_to_the_prior_without_events(impressions, users, items):
    out = derived(impressions, users, items).sort("impression_id")
    first_day = out.filter(pl.col("ts") < at(1))
    # Before any day is over nobody has a rate: the prior is 0 and there are no trials.
    assert np.allclose(first_day[derived_column("item_ctr")].to_numpy(), 0.0)
    assert first_day[derived_column("u_price_gap")].null_count() == first_day.height
