"""Tests of the synthetic data generator: contract, determinism, truth consistency, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from features import contract
from synth.generate import COMPONENTS, W_CLICK, GenerateResult, generate, purchase_weights
from synth.truth import remember_clicks
from synth.world import Guided

N = 20_000
SEED = 7
FILES = ("impressions.parquet", "users.parquet", "items.parquet", "truth.parquet")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> GenerateResult:
    return generate(tmp_path_factory.mktemp("world"), N, SEED, progress=False)


@pytest.fixture(scope="module")
def joined(world: GenerateResult) -> pl.DataFrame:
    return pl.read_parquet(world.impressions_path).join(
        pl.read_parquet(world.truth_path), on="impression_id", how="left"
    )


def _logit(p: pl.Expr) -> pl.Expr:
    return (p / (1 - p)).log()


def test_writes_four_files_and_no_temporaries(world: GenerateResult) -> None:
    out = world.impressions_path.parent
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert world.n_impressions == N
    assert pl.scan_parquet(world.truth_path).select(pl.len()).collect().item() == N
    assert pl.scan_parquet(world.users_path).select(pl.len()).collect().item() == world.n_users == 200
    assert pl.scan_parquet(world.items_path).select(pl.len()).collect().item() == world.n_items == 400


@pytest.mark.parametrize("table", ["impressions", "users", "items"])
def test_tables_satisfy_the_contract(world: GenerateResult, table: str) -> None:
    path = world.impressions_path.parent / f"{table}.parquet"
    contract.validate(pl.scan_parquet(path), table)
    expected = {c.name: c.dtype for c in contract.CONTRACTS[table].columns}
    assert dict(pl.read_parquet_schema(path)) == expected


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(
    world: GenerateResult, tmp_path: Path
) -> None:
    again = generate(tmp_path / "again", N, SEED, progress=False)
    for name in FILES:
        assert (again.impressions_path.parent / name).read_bytes() == (
            world.impressions_path.parent / name
        ).read_bytes(), name
    other = generate(tmp_path / "other", N, SEED + 1, progress=False)
    assert other.truth_path.read_bytes() != world.truth_path.read_bytes()
    assert other.impressions_path.read_bytes() != world.impressions_path.read_bytes()


def test_truth_matches_impressions_one_to_one(world: GenerateResult) -> None:
    imp_ids = pl.read_parquet(world.impressions_path, columns=["impression_id"])["impression_id"]
    truth = pl.read_parquet(world.truth_path)
    assert truth.columns == ["impression_id", "p_click", "p_purchase_given_click", "p_purchase"]
    assert truth.schema["p_click"] == pl.Float64 and truth.schema["p_purchase"] == pl.Float64
    assert truth["impression_id"].to_list() == imp_ids.to_list()
    assert imp_ids.to_list() == list(range(1, N + 1))


def test_probabilities_are_consistent(joined: pl.DataFrame) -> None:
    stats = joined.select(
        ((pl.col("p_click") > 0) & (pl.col("p_click") < 1)).all().alias("click_open"),
        (pl.col("p_purchase") <= pl.col("p_click")).all().alias("purchase_le_click"),
        (pl.col("p_purchase") - pl.col("p_click") * pl.col("p_purchase_given_click"))
        .abs()
        .max()
        .alias("err"),
        ((pl.col("purchase") == 1) & (pl.col("click") == 0)).sum().alias("purchase_without_click"),
    ).row(0, named=True)
    assert stats["click_open"] and stats["purchase_le_click"]
    assert stats["err"] < 1e-15
    assert stats["purchase_without_click"] == 0


@pytest.mark.parametrize(("label", "prob"), [("click", "p_click"), ("purchase", "p_purchase")])
def test_label_rates_match_the_truth(joined: pl.DataFrame, label: str, prob: str) -> None:
    # Labels are independent Bernoulli draws: their mean lies within a few standard errors of mean(p).
    rate, mean_p, var = joined.select(
        pl.col(label).cast(pl.Float64).mean().alias("rate"),
        pl.col(prob).mean().alias("mean_p"),
        ((pl.col(prob) * (1 - pl.col(prob))).sum() / N**2).alias("var"),
    ).row(0)
    assert abs(rate - mean_p) < 4 * var**0.5


def test_label_rates_are_near_the_targets(world: GenerateResult) -> None:
    assert 0.035 < world.click_rate < 0.07
    assert 0.06 < world.purchase_given_click_rate < 0.15
    assert world.purchase_rate == pytest.approx(world.click_rate * world.purchase_given_click_rate)


def test_impressions_are_in_time_order_with_contiguous_positions(joined: pl.DataFrame) -> None:
    assert joined["ts"].is_sorted() and joined["request_id"].is_sorted()
    pages = joined.group_by("request_id").agg(
        pl.len().alias("n"),
        pl.col("position").min().alias("first"),
        pl.col("position").max().alias("last"),
        pl.col("item_id").n_unique().alias("distinct"),
        pl.col("user_id").n_unique().alias("users"),
        pl.col("ts").n_unique().alias("times"),
    )
    assert (pages["first"] == 1).all() and (pages["last"] == pages["n"]).all()
    assert pages["n"].max() <= 12
    assert (pages["users"] == 1).all() and (pages["times"] == 1).all()
    assert (pages["distinct"] == pages["n"]).mean() > 0.99  # repeats are redrawn; rare ones may survive
    assert joined["ts"].min() >= datetime(2026, 1, 1) and joined["ts"].max() < datetime(2026, 1, 31)
    assert joined["ts"].dt.date().n_unique() == 30


def test_items_are_shown_only_after_listing(world: GenerateResult, joined: pl.DataFrame) -> None:
    items = pl.read_parquet(world.items_path)
    shown = joined.join(items, on="item_id")
    assert shown.height == N
    assert (shown["ts"] > shown["listing_ts"]).all()
    assert 0.1 < items["rating"].null_count() / items.height < 0.3


def test_truth_model_is_stored_in_truth_metadata(world: GenerateResult) -> None:
    meta = pq.read_schema(world.truth_path).metadata[b"truth_model"]
    model = json.loads(meta)
    assert model["components"] == list(COMPONENTS)
    assert model["bias_click"] == pytest.approx(world.model.bias_click)
    assert model["w_purchase"] == pytest.approx(list(world.model.w_purchase))


def test_split_days_keep_time_order_and_exact_counts(tmp_path: Path) -> None:
    result = generate(tmp_path, 9_001, SEED, days=2, chunk_rows=1_000, progress=False)
    assert result.n_chunks == 10  # 4_501 and 4_500 rows: five chunks a day
    assert pq.ParquetFile(result.impressions_path).metadata.num_row_groups == 10
    imps = pl.read_parquet(result.impressions_path)
    assert imps.height == 9_001 and imps["ts"].is_sorted() and imps["request_id"].is_sorted()
    contract.validate(imps, "impressions")


def test_purchase_weights_have_the_requested_cosine() -> None:
    for rho in (-1.0, -0.3, 0.0, 0.5, 1.0):
        w = purchase_weights(rho)
        assert np.linalg.norm(w) == pytest.approx(np.linalg.norm(W_CLICK))
        assert w @ W_CLICK / np.linalg.norm(W_CLICK) ** 2 == pytest.approx(rho)


def test_task_correlation_drives_the_correlation_of_the_logits(tmp_path: Path) -> None:
    def logit_corr(rho: float) -> float:
        result = generate(tmp_path / str(rho), N, SEED, task_correlation=rho, progress=False)
        truth = pl.read_parquet(result.truth_path)
        return truth.select(
            pl.corr(_logit(pl.col("p_click")), _logit(pl.col("p_purchase_given_click")))
        ).item()

    high, zero, low = logit_corr(1.0), logit_corr(0.0), logit_corr(-1.0)
    assert high > 0.6 and high > zero + 0.4 and zero > low + 0.4


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("n_impressions", {"n_impressions": 0}),
        ("n_impressions", {"n_impressions": 2.5}),
        ("seed", {"seed": -1}),
        ("task_correlation", {"task_correlation": 1.5}),
        ("task_correlation", {"task_correlation": float("nan")}),
        ("n_users", {"n_users": 0}),
        ("n_items", {"n_items": 19}),
        ("days", {"days": 0}),
        ("chunk_rows", {"chunk_rows": 0}),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_field(tmp_path: Path, field: str, kwargs: dict) -> None:
    args = {"out_dir": tmp_path / "out", "n_impressions": 100, "seed": 1, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=field):
        generate(**args)
    assert not (tmp_path / "out").exists()


def test_guided_search_equals_searchsorted() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = int(rng.integers(1, 200))
        weights = rng.random(m) ** 6 * (rng.random(m) < 0.7)  # skewed, with zero-weight runs
        weights[0] += weights.sum() == 0
        values = np.cumsum(weights) / weights.sum() * 3.0
        query = np.concatenate([rng.random(2_000) * 3.0, values[:-1], np.nextafter(values[:-1], 0), [0.0]])
        query = query[(query >= 0) & (query < 3.0)]
        expected = np.minimum(np.searchsorted(values, query, side="right"), m - 1)
        np.testing.assert_array_equal(Guided.build(values, 3.0).search(query), expected)


def test_remember_clicks_keeps_each_users_latest_click() -> None:
    last = np.array([-1, 4, 7, -1])
    remember_clicks(last, [(np.array([0, 2, 0]), np.array([1, 2, 3])), (np.array([2]), np.array([9]))])
    np.testing.assert_array_equal(last, [3, 4, 9, -1])  # user 1 did not click: keeps 4; user 3 has none
    remember_clicks(last, [])
    np.testing.assert_array_equal(last, [3, 4, 9, -1])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.generate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_help_and_tiny_run(tmp_path: Path) -> None:
    assert _cli("--help").returncode == 0
    done = _cli("--out", str(tmp_path), "--impressions", "500", "--seed", "3", "--days", "3", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    assert pl.read_parquet(tmp_path / "truth.parquet").height == 500
    bad = _cli(
        "--out", str(tmp_path / "bad"), "--impressions", "10", "--seed", "1", "--task-correlation", "2"
    )
    assert bad.returncode == 2 and "task_correlation" in bad.stderr
