"""Faults of the feature pipeline (issue 20, "nothing lost, nothing silent").

Each fault is driven through the command line (``pipelines.features.main``): bad input exits with status 2
and one line that names the file, the column or field, and the value; what is on disk afterwards is
checked too: no input deleted, no output half written.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from features.config import FeatureConfig
from features.files import OWNER_MARKER
from features.spec import FeatureSpec, fit
from pipelines.features import main

CONFIG = {
    "name": "tiny",
    "source": "ecommerce",
    "split": {"method": "time", "validation_days": 3, "test_days": 3},
    "history": {"max_length": 2, "windows_days": [1, 7]},
    "passthrough": ["impression_id"],
    "labels": [{"name": "click"}, {"name": "purchase"}],
    "features": [
        {"name": "item", "source": "item_id", "kind": "categorical"},
        {"name": "hist_cats", "source": "hist_category_ids", "kind": "multi_hot"},
        {"name": "price_z", "source": "price", "kind": "numeric", "transforms": ["log1p", "standardize"]},
        {"name": "clicks_7d", "source": "user_clicks_7d", "kind": "numeric", "transforms": ["log1p"]},
    ],
}


def write_config(path: Path, text: str | None = None, **changes) -> Path:
    path.write_text(text if text is not None else yaml.safe_dump({**CONFIG, **changes}))
    return path


@pytest.fixture
def raw(tmp_path, impressions, users, items) -> Path:
    folder = tmp_path / "raw"
    folder.mkdir()
    impressions.write_parquet(folder / "impressions.parquet")
    users.write_parquet(folder / "users.parquet")
    items.write_parquet(folder / "items.parquet")
    return folder


@pytest.fixture
def config(tmp_path) -> Path:
    return write_config(tmp_path / "tiny.yaml")


def run(capsys, *argv: object) -> tuple[int, str]:
    """Exit status and standard error of one command line."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- --overwrite and --out


@pytest.mark.parametrize(
    ("out", "how"),
    [("raw", "is the input --data"), ("raw/features", "is inside the input --data"), (".", "contains")],
)
def test_overwrite_never_deletes_the_input(capsys, tmp_path, raw, config, out, how):
    before = contents(raw)
    code, err = run(
        capsys, "build", "--config", config, "--data", raw, "--out", tmp_path / out, "--overwrite"
    )
    assert code == 2
    assert how in err and str(raw) in err
    assert contents(raw) == before  # the raw tables, and nothing written among them
    assert no_temporaries(tmp_path) and no_temporaries(raw)


def test_overwrite_refuses_a_folder_we_did_not_write(capsys, tmp_path, raw, config):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, err = run(capsys, "build", "--config", config, "--data", raw, "--out", mine, "--overwrite")
    assert code == 2
    assert str(mine) in err and OWNER_MARKER in err and "notes.txt" in err
    assert contents(mine) == {"notes.txt": b"keep me"}
    assert no_temporaries(tmp_path)


def test_overwrite_replaces_a_previous_features_output(capsys, tmp_path, raw, config):
    out = tmp_path / "features"
    assert run(capsys, "build", "--config", config, "--data", raw, "--out", out)[0] == 0
    assert json.loads((out / OWNER_MARKER).read_text())["kind"] == "features"
    code, err = run(capsys, "build", "--config", config, "--data", raw, "--out", out)
    assert code == 2 and f"output folder {out} exists" in err
    (out / "train" / "stale.parquet").write_bytes(b"old")
    assert run(capsys, "build", "--config", config, "--data", raw, "--out", out, "--overwrite")[0] == 0
    assert not (out / "train" / "stale.parquet").exists()
    spec = out / "spec.json"
    again = tmp_path / "again"
    assert run(capsys, "transform", "--spec", spec, "--data", raw, "--out", again)[0] == 0
    assert (
        run(capsys, "transform", "--spec", again / "spec.json", "--data", raw, "--out", out, "--overwrite")[0]
        == 0
    )
    assert (out / OWNER_MARKER).exists() and no_temporaries(tmp_path)


@pytest.mark.parametrize("flags", [("--data", "raw"), ("--impressions", "raw/impressions.parquet")])
def test_fit_never_writes_its_spec_over_an_input(capsys, tmp_path, raw, config, flags):
    before = contents(raw)
    spec = raw / "impressions.parquet"
    tables = ("--users", raw / "users.parquet", "--items", raw / "items.parquet")
    inputs = (flags[0], tmp_path / flags[1], *(tables if flags[0] == "--impressions" else ()))
    code, err = run(capsys, "fit", "--config", config, *inputs, "--spec", spec)
    assert code == 2
    assert f"--spec {spec}" in err and flags[0] in err
    assert contents(raw) == before


# ------------------------------------------------------------------------------ fitted statistics


@pytest.mark.parametrize(
    ("fill_null", "transforms", "statistic"),
    [
        ("mean", [], "fill_value"),
        ("zero", ["standardize"], "steps[0].mean"),
        ("zero", ["log1p", "bucketize"], "steps[1].boundaries[0]"),
    ],
)
def test_a_non_finite_fitted_statistic_is_named(fill_null, transforms, statistic):
    feature = {"name": "ratio", "kind": "numeric", "fill_null": fill_null, "transforms": transforms}
    if "bucketize" in transforms:
        feature["num_buckets"] = 2
    config = FeatureConfig.from_dict(
        {"name": "t", "source": "flat", "labels": [{"name": "y"}], "features": [feature]}
    )
    # A derived ratio divided by a zero: the contract refuses an infinite raw price, not this.
    train = pl.DataFrame({"ratio": [1.0, math.inf, math.inf, None], "y": [0, 1, 0, 1]})
    split = {"method": "hash", "validation_fraction": 0.1, "test_fraction": 0.1, "seed": 0}
    with pytest.raises(ValueError, match=re.escape(f"features[ratio]: fitted {statistic} is inf")):
        fit(config, train, split)


def test_a_spec_with_a_non_finite_number_is_never_written_or_read(tmp_path):
    spec = FeatureSpec(
        config=CONFIG,
        fitted={"price_z": {"fill_value": math.nan, "steps": [], "output": "dense"}},
        split={"method": "time"},
    )
    path = tmp_path / "spec.json"
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": .*fitted\.price_z\.fill_value is nan"):
        spec.save(path)
    assert not path.exists() and no_temporaries(tmp_path)
    path.write_text('{"format_version": 1, "fitted": {"x": {"fill_value": Infinity}}}')
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": Infinity is not a JSON number"):
        FeatureSpec.load(path)


# ----------------------------------------------------------------------------- configs and specs


BROKEN_YAML = "name: tiny\nfeatures: [\n  {name: a, kind: numeric}\nlabels: []\n"  # no closing ]


@pytest.mark.parametrize(
    ("text", "changes", "message"),
    [
        (BROKEN_YAML, {}, "not valid YAML at line 4, column 1"),
        (None, {"history": {"windows_days": 7}}, "history.windows_days: expected a list, got 7"),
        (None, {"features": 5}, "config.features: expected a list, got 5"),
        (None, {"passthrough": "impression_id"}, "config.passthrough: expected a list, got 'impression_id'"),
    ],
)
def test_a_bad_feature_config_is_named(capsys, tmp_path, raw, text, changes, message):
    path = write_config(tmp_path / "bad.yaml", text, **changes)
    code, err = run(capsys, "build", "--config", path, "--data", raw, "--out", tmp_path / "out")
    assert code == 2
    assert str(path) in err and message in err
    assert not (tmp_path / "out").exists()


def test_unquoted_yaml_dates_are_taken_as_dates(capsys, tmp_path, raw):
    split = "split: {valid_start: 2026-01-07, test_start: 2026-01-09}\n"  # unquoted: dates, not strings
    path = write_config(
        tmp_path / "dates.yaml", yaml.safe_dump({k: v for k, v in CONFIG.items() if k != "split"}) + split
    )
    assert yaml.safe_load(path.read_text())["split"]["valid_start"] == dt.date(2026, 1, 7)
    assert run(capsys, "build", "--config", path, "--data", raw, "--out", tmp_path / "out")[0] == 0
    split = json.loads((tmp_path / "out" / "spec.json").read_text())["split"]
    assert (split["valid_start"], split["test_start"]) == ("2026-01-07T00:00:00", "2026-01-09T00:00:00")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not a spec JSON file"),
        (
            '{"format_version": 1, "config": {}, "split": {}, "content_hash": "0"}',
            "missing field(s) ['fitted']",
        ),
    ],
)
def test_a_bad_spec_file_is_named(capsys, tmp_path, raw, text, message):
    spec = tmp_path / "spec.json"
    spec.write_text(text)
    code, err = run(capsys, "transform", "--spec", spec, "--data", raw, "--out", tmp_path / "out")
    assert code == 2
    assert str(spec) in err and message in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------- input Parquet


def split_impressions(
    raw: Path, first: pl.DataFrame | None = None, second: pl.DataFrame | None = None
) -> Path:
    """Replaces impressions.parquet with a folder of two parts (changed by the arguments)."""
    table = pl.read_parquet(raw / "impressions.parquet")
    (raw / "impressions.parquet").unlink()
    folder = raw / "impressions.parquet"
    folder.mkdir()
    (table.head(7) if first is None else first).write_parquet(folder / "part-0.parquet")
    (table.tail(7) if second is None else second).write_parquet(folder / "part-1.parquet")
    return folder


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b"", "0 bytes"),
        (lambda b: b[: len(b) // 2], "not a readable Parquet file"),
    ],
)
def test_an_unreadable_parquet_file_is_named(capsys, tmp_path, raw, config, damage, message):
    part = split_impressions(raw) / "part-1.parquet"
    part.write_bytes(damage(part.read_bytes()))
    code, err = run(capsys, "build", "--config", config, "--data", raw, "--out", tmp_path / "out")
    assert code == 2
    assert str(part) in err and message in err
    assert not (tmp_path / "out").exists()


def test_parts_of_one_table_with_different_types_are_named(capsys, tmp_path, raw, config, impressions):
    folder = split_impressions(
        raw, second=impressions.tail(7).with_columns(pl.col("position").cast(pl.Int64))
    )
    code, err = run(capsys, "build", "--config", config, "--data", raw, "--out", tmp_path / "out")
    assert code == 2
    assert str(folder / "part-1.parquet") in err and "'position'" in err and "Int64" in err and "Int16" in err


def test_extra_columns_in_one_part_are_accepted(capsys, tmp_path, raw, config, impressions):
    split_impressions(raw, first=impressions.head(7).with_columns(pl.lit("spring").alias("campaign")))
    assert run(capsys, "build", "--config", config, "--data", raw, "--out", tmp_path / "out")[0] == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sum(manifest["rows"].values()) == impressions.height


def test_a_part_missing_a_contract_column_is_named(capsys, tmp_path, raw, config, impressions):
    folder = split_impressions(raw, second=impressions.tail(7).drop("device"))
    code, err = run(capsys, "build", "--config", config, "--data", raw, "--out", tmp_path / "out")
    assert code == 2
    assert str(folder / "part-1.parquet") in err and "'device'" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- output page checksums


def test_feature_parts_carry_page_checksums(capsys, tmp_path, raw, config):
    assert run(capsys, "build", "--config", config, "--data", raw, "--out", tmp_path / "out")[0] == 0
    part = tmp_path / "out" / "train" / "part-00000.parquet"
    pq.read_table(part, page_checksum_verification=True)  # intact
    chunk = pq.read_metadata(part).row_group(0).column(0)
    last = (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size - 1
    data = bytearray(part.read_bytes())
    data[last] ^= 0xFF  # the last byte of the first column's last data page; the footer stays intact
    part.write_bytes(bytes(data))
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        pq.read_table(part, page_checksum_verification=True)
