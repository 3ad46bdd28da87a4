"""Shared fixtures: tiny hand-written contract tables, and the scoring tests' world (built once)."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest

T0 = dt.datetime(2026, 1, 1)


def at(days: float = 0, hours: float = 0) -> dt.datetime:
    return T0 + dt.timedelta(days=days, hours=hours)


def impressions_frame(rows: list[tuple]) -> pl.DataFrame:
    """rows: (impression_id, request_id, ts, user_id, item_id, position, click, purchase)."""
    cols = ["impression_id", "request_id", "ts", "user_id", "item_id", "position", "click", "purchase"]
    df = pl.DataFrame(rows, schema=cols, orient="row")
    return df.select(
        pl.col("impression_id").cast(pl.Int64),
        pl.col("request_id").cast(pl.Int64),
        pl.col("ts").cast(pl.Datetime("us")),
        pl.col("user_id").cast(pl.Int64),
        pl.col("item_id").cast(pl.Int64),
        pl.col("position").cast(pl.Int16),
        pl.lit("app").alias("device"),
        pl.lit("home").alias("page"),
        pl.col("click").cast(pl.Int8),
        pl.col("purchase").cast(pl.Int8),
    )


@pytest.fixture
def users() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [10, 20, 30],
            "age_bucket": ["18-24", "25-34", "35-44"],
            "gender": ["f", "m", "u"],
            "city": ["paris", "lyon", "paris"],
            "member_level": [0, 2, 1],
            "signup_ts": [at(-100), at(-10), at(-1)],
        },
        schema_overrides={"member_level": pl.Int8, "signup_ts": pl.Datetime("us")},
    )


@pytest.fixture
def items() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": [100, 101, 102, 103, 104],
            "category_id": [1, 1, 2, 2, 3],
            "top_category": ["home", "home", "toys", "toys", "food"],
            "brand_id": [7, 7, 8, 9, 9],
            "shop_id": [1, 2, 1, 2, 3],
            "price": [10.0, 30.0, 5.0, 50.0, 2.0],
            "rating": [4.5, None, 3.0, 5.0, None],
            "listing_ts": [at(-30), at(-5), at(-60), at(-1), at(-2)],
        },
        schema_overrides={"rating": pl.Float32, "listing_ts": pl.Datetime("us")},
    )


@pytest.fixture
def impressions() -> pl.DataFrame:
    # Days 0..9; user 10 clicks on days 0, 1 and 3; user 20 on day 2; validation days 6-7, test days 8-9.
    return impressions_frame(
        [
            (1, 1, at(0, 9), 10, 100, 1, 1, 1),
            (2, 1, at(0, 9), 10, 101, 2, 1, 0),
            (3, 1, at(0, 9), 10, 102, 3, 0, 0),
            (4, 2, at(1, 12), 10, 103, 1, 1, 0),
            (5, 2, at(1, 12), 10, 100, 2, 0, 0),
            (6, 3, at(2, 8), 20, 102, 1, 1, 1),
            (7, 3, at(2, 8), 20, 104, 2, 0, 0),
            (8, 4, at(3, 20), 10, 104, 1, 1, 0),
            (9, 5, at(4, 10), 30, 100, 1, 0, 0),
            (10, 6, at(5, 10), 20, 101, 1, 0, 0),
            (11, 7, at(6, 10), 10, 102, 1, 1, 0),
            (12, 8, at(7, 10), 20, 100, 1, 0, 0),
            (13, 9, at(8, 10), 10, 101, 1, 1, 1),
            (14, 10, at(9, 10), 30, 999, 1, 0, 0),  # item 999 is not in the items table
        ]
    )


@pytest.fixture
def world_of_one(tmp_path):
    """A gloo process group of one process: for collectives, and TorchRec's sharding in one process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def scoring_raw(tmp_path_factory):
    """Generated contract tables (3,000 impressions over 30 days), for the scoring tests."""
    from tests.scoring_world import generate_raw

    return generate_raw(tmp_path_factory.mktemp("score") / "raw")


@pytest.fixture(scope="session")
def scoring_models(scoring_raw):
    """Two tiny registered models and candidate files (:func:`tests.scoring_world.register_models`).

    Built once for the session: each scoring test module starts its own Ray around it.
    """
    from tests.scoring_world import register_models

    return register_models(scoring_raw)
