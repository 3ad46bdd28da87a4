from __future__ import annotations

import polars as pl
import pytest

from features.contract import ContractError, validate


def test_valid_tables_pass_and_extra_columns_are_allowed(impressions, users, items):
    out = validate(impressions.with_columns(pl.lit("x").alias("campaign")), "impressions")
    assert "campaign" in out.collect_schema().names()
    validate(users, "users")
    validate(items, "items")
    validate(impressions.drop("click", "purchase"), "impressions", labels=False)


def test_missing_column_names_table_and_column(impressions):
    with pytest.raises(ContractError, match=r"impressions: missing column\(s\) \['page'\]"):
        validate(impressions.drop("page"), "impressions")


def test_labels_are_required_for_training_but_not_for_scoring(impressions):
    with pytest.raises(ContractError, match=r"missing column\(s\) \['click', 'purchase'\]"):
        validate(impressions.drop("click", "purchase"), "impressions")


def test_wrong_type_names_column_types_and_an_example_value(users):
    bad = users.with_columns(pl.col("member_level").cast(pl.Int64))
    with pytest.raises(
        ContractError, match=r"users\.member_level: expected type Int8, got Int64 \(example value: 0\)"
    ):
        validate(bad, "users")


def test_timestamp_unit_is_checked(items):
    bad = items.with_columns(pl.col("listing_ts").dt.cast_time_unit("ns"))
    with pytest.raises(ContractError, match=r"items\.listing_ts: expected type Datetime\(time_unit='us'"):
        validate(bad, "items")


def test_duplicated_key_names_the_value(users):
    bad = pl.concat([users, users.head(1)])
    with pytest.raises(
        ContractError,
        match=r"users\.user_id: key is not unique: 1 duplicate row\(s\), e\.g\. user_id=10 appears 2 times",
    ):
        validate(bad, "users")


def test_purchase_without_click_names_the_row(impressions):
    bad = impressions.with_columns(
        pl.when(pl.col("impression_id") == 3)
        .then(1)
        .otherwise(pl.col("purchase"))
        .cast(pl.Int8)
        .alias("purchase")
    )
    with pytest.raises(
        ContractError,
        match=r"impressions\.purchase: purchase=1 without click=1: 1 row\(s\), "
        r"e\.g\. purchase=1 at impression_id=3",
    ):
        validate(bad, "impressions")


def test_negative_price_names_the_value_and_item(items):
    bad = items.with_columns(
        pl.when(pl.col("item_id") == 102).then(-5.0).otherwise(pl.col("price")).alias("price")
    )
    with pytest.raises(
        ContractError,
        match=r"items\.price: price must be finite and >= 0: 1 row\(s\), e\.g\. price=-5\.0 at item_id=102",
    ):
        validate(bad, "items")


def test_non_binary_label_and_bad_position_are_reported_together(impressions):
    bad = impressions.with_columns(
        pl.when(pl.col("impression_id") == 5).then(2).otherwise(pl.col("click")).cast(pl.Int8).alias("click"),
        pl.when(pl.col("impression_id") == 7)
        .then(0)
        .otherwise(pl.col("position"))
        .cast(pl.Int16)
        .alias("position"),
    )
    with pytest.raises(ContractError) as err:
        validate(bad, "impressions")
    message = str(err.value)
    assert "impressions.click: label must be 0 or 1: 1 row(s), e.g. click=2 at impression_id=5" in message
    assert (
        "impressions.position: position must be >= 1: 1 row(s), e.g. position=0 at impression_id=7" in message
    )


def test_null_in_non_nullable_column(users):
    bad = users.with_columns(
        pl.when(pl.col("user_id") == 20).then(None).otherwise(pl.col("city")).alias("city")
    )
    with pytest.raises(ContractError, match=r"users\.city: null in a non-nullable column: 1 row\(s\)"):
        validate(bad, "users")


def test_nullable_rating_is_accepted_but_nan_is_not(items):
    validate(items, "items")  # the fixture has null ratings
    bad = items.with_columns(pl.col("rating").fill_null(float("nan")))
    with pytest.raises(ContractError, match=r"items\.rating: rating is NaN"):
        validate(bad, "items")


def test_infinite_prices_and_ratings_are_named_like_nan(items):
    # One item with price = inf made two features non-finite in every row and NaN scores (issue 20).
    for column, value, message in (
        ("price", float("inf"), r"items\.price: price must be finite and >= 0: 1 row\(s\), e\.g\. price=inf"),
        (
            "price",
            float("-inf"),
            r"items\.price: price must be finite and >= 0: 1 row\(s\), e\.g\. price=-inf",
        ),
        (
            "rating",
            float("inf"),
            r"items\.rating: rating is NaN or infinite .*: 1 row\(s\), e\.g\. rating=inf",
        ),
    ):
        bad = items.with_columns(
            pl.when(pl.col("item_id") == 101)
            .then(value)
            .otherwise(pl.col(column))
            .cast(items.schema[column])
            .alias(column)
        )
        with pytest.raises(ContractError, match=message + r" at item_id=101"):
            validate(bad, "items")


def test_unknown_table_is_a_value_error(users):
    with pytest.raises(ValueError, match="unknown contract table 'orders'"):
        validate(users, "orders")
