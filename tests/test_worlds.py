"""Tests of the family of worlds: their tables, truth and labels; the default world unchanged; the CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from benchmarks.worlds_table import exposure, raw_moments
from features import contract
from synth.candidates import generate_candidates
from synth.generate import WORLDS, GenerateResult, generate
from synth.truth import RAW_TERMS
from synth.world import N_TOP
from synth.worlds import PEAK_HOUR, WEEKEND_LIFT, get_world

N = 20_000
SEED = 7
REPO = Path(__file__).resolve().parents[1]
TABLES = ("impressions", "users", "items", "truth")
# Content digest (see _digest) of the default world at N rows, seed 7, computed with the generator as it was
# before worlds existed (commit 7e513be). The default world must keep drawing exactly these rows.
DEFAULT_DIGEST = "feb99c54a88d0effdaeac9304aa326c5990ad37c0fe67f5eba8eeacaa6deb144"


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, GenerateResult]:
    root = tmp_path_factory.mktemp("worlds")
    return {name: generate(root / name, N, SEED, world=name, progress=False) for name in WORLDS}


def _joined(result: GenerateResult) -> pl.DataFrame:
    return pl.read_parquet(result.impressions_path).join(
        pl.read_parquet(result.truth_path), on="impression_id"
    )


def _digest(folder: Path) -> str:
    """sha256 of every column's values (not the Parquet bytes, which depend on the pyarrow version)."""
    h = hashlib.sha256()
    for table in TABLES:
        for name, column in pl.read_parquet(folder / f"{table}.parquet").to_dict().items():
            h.update(f"{table}.{name}:".encode())
            if column.dtype == pl.String:
                h.update("\x00".join(column.to_list()).encode())
            else:
                h.update(column.to_physical().fill_null(-1).to_numpy().tobytes())
    h.update(pq.read_schema(folder / "truth.parquet").metadata[b"truth_model"])
    return h.hexdigest()


def test_default_world_draws_the_same_rows_as_before_worlds(worlds: dict[str, GenerateResult]) -> None:
    assert _digest(worlds["default"].truth_path.parent) == DEFAULT_DIGEST


@pytest.mark.parametrize("name", list(WORLDS))
@pytest.mark.parametrize("table", ["impressions", "users", "items"])
def test_every_world_satisfies_the_contract(worlds: dict[str, GenerateResult], name: str, table: str) -> None:
    path = worlds[name].truth_path.parent / f"{table}.parquet"
    contract.validate(pl.scan_parquet(path), table)


@pytest.mark.parametrize("name", list(WORLDS))
def test_truth_is_open_and_consistent_with_the_labels(worlds: dict[str, GenerateResult], name: str) -> None:
    joined = _joined(worlds[name])
    assert joined.height == N
    for prob in ("p_click", "p_purchase_given_click", "p_purchase"):
        assert ((joined[prob] > 0) & (joined[prob] < 1)).all(), prob
    for label, prob in (("click", "p_click"), ("purchase", "p_purchase")):
        rate, mean_p, var = joined.select(
            pl.col(label).cast(pl.Float64).mean().alias("rate"),
            pl.col(prob).mean().alias("mean_p"),
            ((pl.col(prob) * (1 - pl.col(prob))).sum() / N**2).alias("var"),
        ).row(0)
        assert abs(rate - mean_p) < 4 * var**0.5, (label, rate, mean_p)
    assert 0.035 < worlds[name].click_rate < 0.07
    assert 0.06 < worlds[name].purchase_given_click_rate < 0.15


@pytest.mark.parametrize("name", list(WORLDS))
def test_truth_metadata_names_the_world_and_its_terms(worlds: dict[str, GenerateResult], name: str) -> None:
    metadata = pq.read_schema(worlds[name].truth_path).metadata
    model = json.loads(metadata[b"truth_model"])
    assert model["components"] == list(get_world(name).components) == list(worlds[name].model.components)
    assert len(model["w_click"]) == len(model["w_purchase"]) == len(model["components"])
    if name == "default":
        assert b"world" not in metadata  # as in files written before worlds existed
    else:
        world = json.loads(metadata[b"world"])
        assert world["name"] == name == worlds[name].world
        assert world["pref_concentration"] == get_world(name).pref_concentration


def test_worlds_differ_for_the_same_seed(worlds: dict[str, GenerateResult]) -> None:
    p_click = {name: pl.read_parquet(r.truth_path)["p_click"].to_numpy() for name, r in worlds.items()}
    names = list(WORLDS)
    for k, a in enumerate(names):
        for b in names[k + 1 :]:
            assert np.corrcoef(p_click[a], p_click[b])[0, 1] < 0.5, (a, b)


def test_interest_users_concentrate_on_fewer_categories(worlds: dict[str, GenerateResult]) -> None:
    def top_share(result: GenerateResult) -> float:
        """Impression-weighted share of each user's impressions in their most shown top category."""
        shown = pl.read_parquet(result.impressions_path).join(
            pl.read_parquet(result.items_path), on="item_id"
        )
        per_user = (
            shown.group_by("user_id", "top_category")
            .len()
            .group_by("user_id")
            .agg((pl.col("len").max() / pl.col("len").sum()).alias("share"), pl.col("len").sum().alias("n"))
        )
        per_user = per_user.filter(pl.col("n") >= 20)
        return float((per_user["share"] * per_user["n"]).sum() / per_user["n"].sum())

    # Dirichlet(0.15) puts ~0.43 of a user's preference on one category, Dirichlet(0.5) ~0.25; 70% of the
    # slots follow it: ~0.31 against ~0.19 of the impressions.
    assert top_share(worlds["interest"]) > top_share(worlds["default"]) + 0.08


@pytest.mark.parametrize("name", list(WORLDS))
def test_frozen_centres_and_scales_standardize_the_terms(name: str) -> None:
    world = get_world(name)
    assert all(t.name in RAW_TERMS and t.scale > 0 for t in world.terms)
    moments = raw_moments(world, 100_000)
    for term in world.terms:
        if term.name == "history":  # needs earlier clicks, which raw_moments does not draw
            continue
        mean, sd = moments[term.name]
        # Loose: a small catalogue's few head items move the item terms' moments by up to ~0.25 sd.
        assert abs((mean - term.center) / term.scale) < 0.35, term
        assert 0.7 < sd / term.scale < 1.4, term


def test_sqrt_worlds_give_users_more_impressions_as_data_grows() -> None:
    small, large = (exposure(get_world("interest"), n) for n in (200_000, 2_000_000))
    assert large["user_mean"] > 3 * small["user_mean"]
    linear_small, linear_large = (exposure(get_world("default"), n) for n in (200_000, 2_000_000))
    assert linear_large["user_mean"] == pytest.approx(linear_small["user_mean"])
    assert len(PEAK_HOUR) == len(WEEKEND_LIFT) == N_TOP


def test_unknown_world_raises_naming_world_and_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"world.*default.*interest.*daypart.*'nonsense'"):
        generate(tmp_path / "out", 100, 1, world="nonsense", progress=False)
    assert not (tmp_path / "out").exists()


def test_candidates_pass_the_world_through(tmp_path: Path) -> None:
    cands = generate_candidates(tmp_path, 2_000, 3, world="daypart", days=2, progress=False)
    users = pl.read_parquet(cands.users).height
    assert users == get_world("daypart").default_users(2_000) != get_world("default").default_users(2_000)


def test_cli_world_choice(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "pipelines.generate", "--impressions", "500", "--seed", "3", *args]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)

    bad = cli("--out", str(tmp_path / "bad"), "--world", "nonsense")
    assert bad.returncode == 2
    assert "--world" in bad.stderr and "nonsense" in bad.stderr
    assert all(name in bad.stderr for name in WORLDS)
    good = cli("--out", str(tmp_path / "ok"), "--world", "interest", "--days", "2", "--no-progress")
    assert good.returncode == 0, good.stderr
    assert (
        json.loads(pq.read_schema(tmp_path / "ok" / "truth.parquet").metadata[b"world"])["name"] == "interest"
    )
