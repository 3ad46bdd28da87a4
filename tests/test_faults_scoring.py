"""Batch scoring under faults: nothing lost, nothing silent (issue 20).

Each test breaks one thing: an output folder that is an input or not ours, a corrupt manifest, a full
disk, a model that returns NaN, unreadable or unusual input files, a damaged part file. Each checks the
exit status, that the message names the file, field or value, and what is on disk afterwards. They share
the scoring world of ``tests/scoring_world.py`` (built once per session) and one local Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from polars.testing import assert_frame_equal

from features.files import OWNER_MARKER, owned_kind
from pipelines import score
from recsys.runtime import protect_ray_token
from recsys.scoring import run_scoring
from recsys.scoring.manifest import MANIFEST, load_manifest, open_output
from recsys.scoring.partitions import check_part
from recsys.tracking import CHAMPION
from tests.scoring_world import MODEL, config_for, read_output, running_ray

ROOT = Path(__file__).resolve().parents[1]
ROWS_PER_PARTITION = 1000  # 4 partitions of the world's 3,003 candidates


@pytest.fixture(scope="module")
def world(scoring_models):
    """The shared registered models and candidates, and a local Ray for this module (its address too)."""
    with running_ray() as address:
        yield scoring_models | {"address": address}


@pytest.fixture(scope="module")
def complete(world, tmp_path_factory):
    """A complete scoring output of the champion (copy it before changing it)."""
    out = tmp_path_factory.mktemp("faults") / "complete"
    result = run_scoring(config_for(world, out, rows_per_partition=ROWS_PER_PARTITION))
    assert result.ok and owned_kind(out) == "scores"
    return out


def cli(world, out: Path, *extra: str, input: Path | str | None = None) -> list[str]:
    """Arguments of ``python -m pipelines.score`` over the world's candidates."""
    return [
        *("--model", f"models:/{MODEL}@{CHAMPION}"),
        *("--input", str(input or world["inputs"])),
        *("--output", str(out)),
        *("--tracking-uri", world["store"]),
        *("--rows-per-partition", str(ROWS_PER_PARTITION)),
        "--no-progress",
        *extra,
    ]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and a digest of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def candidates_folder(world, folder: Path, names=("part-00000.parquet", "part-00001.parquet")) -> Path:
    """The world's candidates in ``folder``, under ``names``, with the users and items tables."""
    folder.mkdir(parents=True)
    for src, name in zip(sorted(world["inputs"].glob("c*.parquet")), names, strict=True):
        shutil.copy(src, folder / name)
    for table in ("users", "items"):
        shutil.copy(world["inputs"] / f"{table}.parquet", folder / f"{table}.parquet")
    return folder


def error_line(capsys) -> str:
    """The error the command printed: from ``error:`` on, once, and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 1, err
    return err[err.index("error: ") :]


# ------------------------------------------------------------------------------ the output folder


def test_overwrite_never_clears_an_input_folder(scoring_models, tmp_path, capsys):
    world = scoring_models
    # Candidate files named like our part files: --overwrite on the input folder used to delete them.
    cands = candidates_folder(world, tmp_path / "cands")
    before = snapshot(cands)
    assert score.main(cli(world, cands, "--overwrite", input=cands)) == 2
    line = error_line(capsys)
    assert f"output folder {cands.resolve()} is the input --input {cands.resolve()}" in line
    assert snapshot(cands) == before  # nothing deleted, no marker, no manifest
    # A folder around the input, and around the users table given elsewhere: refused as well.
    users = tmp_path / "elsewhere" / "users.parquet"
    users.parent.mkdir()
    shutil.copy(cands / "users.parquet", users)
    args = cli(world, users.parent, "--overwrite", "--users", str(users), input=cands / "part-00000.parquet")
    assert score.main(args) == 2
    assert f"contains the input users table {users.resolve()}" in error_line(capsys)
    assert snapshot(cands) == before and users.exists() and not (users.parent / OWNER_MARKER).exists()


def test_an_output_inside_the_input_is_refused_so_no_rerun_reads_it_back(scoring_models, tmp_path, capsys):
    world = scoring_models
    cands = candidates_folder(world, tmp_path / "cands")
    before = snapshot(cands)
    for attempt in ("first run", "rerun"):  # the rerun used to read the first run's parts as candidates
        assert score.main(cli(world, cands / "scores", input=cands)) == 2, attempt
        assert f"is inside the input --input {cands.resolve()}" in error_line(capsys)
        assert snapshot(cands) == before and not (cands / "scores").exists()
    # A glob that would find the part files of an output below it: refused too.
    pattern = str(tmp_path / "*" / "part-*.parquet")
    assert score.main(cli(world, tmp_path / "scores", input=pattern)) == 2
    assert f"lies where --input {pattern!r} finds its files" in error_line(capsys)
    assert not (tmp_path / "scores").exists()


def test_a_folder_without_our_marker_is_never_written_into_nor_cleared(scoring_models, tmp_path, capsys):
    world = scoring_models
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    (out / "part-00000.parquet").write_bytes(b"the user's own part file")
    before = snapshot(out)
    for extra in ((), ("--overwrite",)):
        assert score.main(cli(world, out, *extra)) == 2, extra
        line = error_line(capsys)
        assert f"refusing to replace output folder {out.resolve()}" in line
        assert f"it has no {OWNER_MARKER} marker" in line and "notes.txt" in line
        assert snapshot(out) == before  # nothing written among the user's files, nothing deleted


@pytest.mark.slow
def test_a_corrupt_manifest_is_named_and_overwrite_rescores_cleanly(world, complete, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(complete, out)
    manifest = out / MANIFEST
    cases = {
        b"\xff\xfe{not text": "not JSON (UnicodeDecodeError",
        b'{"format": 1, "partitions": {"0": {"file": 3}}, "mo': "not JSON (JSONDecodeError",
        b"[1, 2, 3]": "a JSON list, expected an object",
        b'{"format": 1, "partitions": []}': "AttributeError",
        json.dumps({**json.loads(manifest.read_text()), "partitions": {"0": {"file": 3}}}).encode(): (
            "TypeError: MovedRequests: expected an object, got None"
        ),
    }
    original = manifest.read_bytes()
    for content, why in cases.items():
        manifest.write_bytes(content)
        before = snapshot(out)
        assert score.main(cli(world, out)) == 2, content
        line = error_line(capsys)
        assert f"{manifest.resolve()}: not a scoring manifest: {why}" in line and "--overwrite" in line
        assert snapshot(out) == before
    # A partition record of another shape: the field and the value are named.
    data = json.loads(original)
    data["partitions"]["1"]["rows_out"] = "many"
    manifest.write_text(json.dumps(data))
    assert score.main(cli(world, out)) == 2
    assert "PartitionRecord.rows_out: expected int, got 'many'" in error_line(capsys)
    assert score.main(cli(world, out, "--overwrite")) == 0
    assert_frame_equal(read_output(out), read_output(complete))
    assert json.loads(manifest.read_text())["complete"]


@pytest.mark.slow
def test_only_our_own_temporary_files_are_removed(complete, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(complete, out)
    users = ["keep.tmp", ".keep.tmp", ".part-00001.parquet.tmp", "part-00002.parquet.x1y2z3ab.tmp"]
    ours = [".part-00001.parquet.x1y2z3ab.tmp", f".{MANIFEST}.q_9z8y7x.tmp", f".{OWNER_MARKER}.abcd1234.tmp"]
    for name in users + ours:
        (out / name).write_bytes(b"half written")
    open_output(out, load_manifest(out / MANIFEST), overwrite=False)  # what a rerun does first
    assert {p.name for p in out.iterdir() if p.name.endswith(".tmp")} == set(users)
    assert_frame_equal(read_output(out), read_output(complete))


# ------------------------------------------------------------------------------ the run itself


def limit_file_size(size: int):
    """A ``preexec_fn``: writes past ``size`` bytes of a file fail with EFBIG (a full disk, one process)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


@pytest.mark.slow
def test_a_failed_write_ends_the_process_promptly_and_a_rerun_finishes_exactly(world, tmp_path):
    out = tmp_path / "out"
    # The driver alone is limited: it joins the module's Ray (whose processes would not start under the
    # limit) and scores a package folder, tracking off (an SQLite store past the limit is not writable).
    args = cli(world, out, "--model", str(world["packages"][0]), "--tracking-uri", "http://127.0.0.1:9")
    limited = [*args, "--address", world["address"], "--verbose"]  # no log file: Ray's dumps are long
    run = subprocess.run(
        [sys.executable, "-m", "pipelines.score", *limited],
        cwd=ROOT,
        preexec_fn=limit_file_size(16_000),  # the manifest fits, a part file (~20 kB) does not
        capture_output=True,
        text=True,
        timeout=120,  # it used to hang for ever once the write failed
    )
    # The last word is one error line naming the file (Ray Data's own log, past the limit too, may print
    # "--- Logging error ---" blocks before it).
    last = run.stderr.rstrip().splitlines()[-1]
    assert run.returncode == 1 and last.startswith("error: "), run.stderr[-3000:]
    assert f"writing {out.resolve()}/part-0000" in last, last
    assert last.endswith("File too large; rerun the same command to finish"), last
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))  # nothing half written
    assert all(
        check_part(out / e.file, e.rows_out) is None
        for e in load_manifest(out / MANIFEST).partitions.values()
    )
    assert score.main(args) == 0  # the same command, without the limit, finishes
    rows = read_output(out)
    assert rows.height == world["cands"].height == rows["impression_id"].n_unique()
    assert sorted(rows["impression_id"]) == sorted(world["cands"]["impression_id"])


@pytest.mark.slow
def test_a_model_that_returns_nan_writes_nothing_and_names_the_partition(world, tmp_path, capsys):
    package = tmp_path / "nan-package"
    shutil.copytree(world["packages"][0], package)
    weights = torch.load(package / "weights.pt", weights_only=True)
    bias = next(k for k in weights if k.startswith("towers.click.") and k.endswith("bias"))
    weights[bias] = torch.full_like(weights[bias], float("nan"))
    torch.save(weights, package / "weights.pt")
    out = tmp_path / "out"
    assert score.main([*cli(world, out, "--model", str(package)), "--concurrency", "1"]) == 2
    line = error_line(capsys)
    assert f"{out.resolve()}/part-0000" in line and "(partition " in line, line
    assert "rows have a score that is not a finite number in ['p_click'" in line
    assert "impression_id=" in line and "item_id=" in line and "p_click=nan" in line
    assert not list(out.glob("part-*")) and load_manifest(out / MANIFEST).partitions == {}


# ------------------------------------------------------------------------------ the input files


@pytest.mark.slow
def test_an_extra_column_in_one_input_file_is_accepted(world, tmp_path):
    cands = candidates_folder(world, tmp_path / "cands", names=("c0.parquet", "c1.parquet"))
    c1 = pl.read_parquet(cands / "c1.parquet")
    c1.with_columns(pl.lit("campaign-7").alias("note")).write_parquet(
        cands / "c1.parquet", row_group_size=300
    )
    out = tmp_path / "out"
    assert score.main(cli(world, out, input=cands)) == 0
    rows = read_output(out)
    assert rows.height == world["cands"].height == rows["impression_id"].n_unique()


def test_unreadable_or_mixed_parquet_inputs_are_named_and_nothing_written(scoring_models, tmp_path, capsys):
    world = scoring_models
    good = world["inputs"] / "c1.parquet"
    data = good.read_bytes()
    cases = {
        "empty": (b"", "cannot be read as Parquet"),
        "truncated": (data[: len(data) // 2], "cannot be read as Parquet"),
        "headless": (data[:8] + data[-4000:], "cannot be read as Parquet"),
        "mixed": (None, "impressions.position: expected type Int16, got Int64"),
    }
    for name, (content, why) in cases.items():
        cands = candidates_folder(world, tmp_path / name, names=("c0.parquet", "c1.parquet"))
        bad = cands / "c1.parquet"
        if content is None:  # the same columns, one of another type
            pl.read_parquet(good).with_columns(pl.col("position").cast(pl.Int64)).write_parquet(bad)
        else:
            bad.write_bytes(content)
        out = tmp_path / f"out-{name}"
        assert score.main(cli(world, out, input=cands)) == 2, name
        line = error_line(capsys)
        assert f"input {bad.resolve()}" in line and why in line, (name, line)
        assert not out.exists(), name


# ------------------------------------------------------------------------------ damaged outputs


def flip_a_byte_in_a_data_page(path: Path, column: str) -> None:
    """Flips one byte inside the last data page of ``column`` in the first row group; the footer stays."""
    meta = pq.read_metadata(path)
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    chunk = meta.row_group(0).column(names.index(column))
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    position = start + chunk.total_compressed_size - 3  # inside the last page's values, past its header
    data = bytearray(path.read_bytes())
    data[position] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_damaged_part_is_found_by_its_page_checksums_and_scored_again(world, complete, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(complete, out)
    part = out / "part-00001.parquet"
    flip_a_byte_in_a_data_page(part, "p_click")
    assert pq.read_metadata(part).num_rows > 0  # the footer is intact: a row count alone looks fine
    damage = check_part(part, pq.read_metadata(part).num_rows)
    assert damage is not None and str(part) in damage and "CRC checksum verification failed" in damage
    capsys.readouterr()
    again = run_scoring(config_for(world, out, rows_per_partition=ROWS_PER_PARTITION))
    assert f"{part}: damaged or unreadable" in capsys.readouterr().out
    assert again.ok and again.partitions_scored == 1 and again.partitions_skipped == again.partitions - 1
    assert check_part(part, pq.read_metadata(part).num_rows) is None
    assert_frame_equal(read_output(out), read_output(complete))


# ------------------------------------------------------------------------------ Ray


@pytest.mark.slow
def test_rays_token_file_is_readable_by_its_owner_only(world, tmp_path, monkeypatch):
    token = Path.home() / ".ray" / "auth_token"
    if token.exists():  # the module's Ray started with it
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    protect_ray_token(create=True)
    made = tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(made.stat().st_mode) == 0o600 and len(made.read_text()) == 64
    os.chmod(made, 0o644)  # as Ray writes it
    protect_ray_token(create=False)
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
