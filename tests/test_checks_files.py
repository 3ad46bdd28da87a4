"""The shared config vocabulary (features.checks) and atomic writes (features.files)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from features.checks import check_choice, check_int, check_number, config_path, from_mapping
from features.files import atomic_write


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3", None])
def test_check_int_names_the_field_and_the_value(value):
    with pytest.raises(ValueError, match=rf"^training\.epochs: expected an integer >= 1, got {value!r}$"):
        check_int("training", "epochs", value)


def test_check_int_takes_an_explicit_minimum():
    check_int("run", "max_failures", -1, minimum=-1)
    with pytest.raises(ValueError, match="expected an integer >= -1, got -2"):
        check_int("run", "max_failures", -2, minimum=-1)


@pytest.mark.parametrize("value", [0, -0.5, float("nan"), float("inf"), True, 2.5])
def test_check_number_rejects_what_is_out_of_range(value):
    with pytest.raises(ValueError, match="training.lr: expected a number > 0 and <= 2"):
        check_number("training", "lr", value, high=2.0)


def test_check_number_and_choice_accept_good_values():
    check_number("training", "lr", 0.1)
    check_number("training", "weight_decay", 0.0, low_open=False)
    check_choice("training", "ingest", "parquet", ("parquet", "ray_data"))
    with pytest.raises(
        ValueError, match=r"training\.ingest: expected one of \['parquet', 'ray_data'\], got 'x'"
    ):
        check_choice("training", "ingest", "x", ("parquet", "ray_data"))


def test_config_path_takes_a_yaml_path_or_a_shipped_name(tmp_path):
    (tmp_path / "demo.yaml").write_text("a: 1\n")
    assert config_path("demo", tmp_path) == tmp_path / "demo.yaml"
    assert config_path("elsewhere/run.yml", tmp_path) == Path("elsewhere/run.yml")
    with pytest.raises(
        ValueError, match=r"train config: no shipped config 'nope'; shipped configs are \['demo'\]"
    ):
        config_path("nope", tmp_path, "train config")


def test_from_mapping_names_unknown_fields():
    @dataclass
    class Section:
        a: int = 1

    assert from_mapping(Section, {"a": 2}, "section") == Section(2)
    with pytest.raises(ValueError, match=r"section: unknown field\(s\) \['b'\]"):
        from_mapping(Section, {"b": 2}, "section")


def test_atomic_write_replaces_whole_files_with_the_usual_mode(tmp_path):
    path = tmp_path / "sub" / "manifest.json"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_text() == "new"
    assert os.listdir(path.parent) == ["manifest.json"]  # no temporary file left behind
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "manifest.json"
    atomic_write(path, "old")
    with pytest.raises(TypeError):
        atomic_write(path, 42)  # type: ignore[arg-type]
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["manifest.json"]


def test_a_staged_file_appears_only_when_complete(tmp_path):
    from features.files import staged_file

    path = tmp_path / "part.parquet"
    path.write_text("old")
    with pytest.raises(RuntimeError), staged_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed while writing")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["part.parquet"]
    with staged_file(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old"  # not in place before the block ends
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["part.parquet"]


def test_a_staged_folder_replaces_the_old_one_only_when_complete(tmp_path):
    from features.files import staged_dir

    target = tmp_path / "features"
    target.mkdir()
    (target / "old.parquet").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(target) as tmp:
        (tmp / "new.parquet").write_text("half")
        raise RuntimeError("killed while writing")
    assert os.listdir(target) == ["old.parquet"] and os.listdir(tmp_path) == ["features"]
    with staged_dir(target) as tmp:
        (tmp / "new.parquet").write_text("new")
    assert os.listdir(target) == ["new.parquet"] and os.listdir(tmp_path) == ["features"]


def test_replace_dir_swaps_in_one_step_where_linux_can(tmp_path, monkeypatch):
    from features import files

    target, new = tmp_path / "out", tmp_path / "new"
    for folder, text in ((target, "old"), (new, "new")):
        folder.mkdir()
        (folder / "part.parquet").write_text(text)
    renames = []
    monkeypatch.setattr(files.os, "replace", lambda a, b: renames.append((a, b)))  # a swap needs none
    files.replace_dir(new, target)
    assert renames == [] and (target / "part.parquet").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the old folder, swapped out, is gone


def test_a_marked_folder_of_the_same_kind_is_the_only_one_overwrite_replaces(tmp_path):
    from features.files import OWNER_MARKER, check_replaceable, mark_owned, owned_kind

    check_replaceable(tmp_path / "missing", "scores", overwrite=False)
    mine, users = tmp_path / "mine", tmp_path / "users"
    mine.mkdir()
    users.mkdir()
    (users / "notes.txt").write_text("keep")
    mark_owned(mine, "features")
    assert owned_kind(mine) == "features" and owned_kind(users) is None
    check_replaceable(mine, "features", overwrite=True)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        check_replaceable(mine, "features", overwrite=False)
    with pytest.raises(FileExistsError, match=f"it is a features output.*holds {OWNER_MARKER}"):
        check_replaceable(mine, "scores", overwrite=True)
    with pytest.raises(FileExistsError, match=rf"{users}: it has no {OWNER_MARKER} marker.*holds notes.txt"):
        check_replaceable(users, "features", overwrite=True)


@pytest.mark.parametrize(("out", "how"), [("in", "is"), ("in/out", "is inside"), (".", "contains")])
def test_an_output_that_is_around_or_inside_an_input_is_refused(tmp_path, out, how):
    from features.files import refuse_overlap

    (tmp_path / "in").mkdir()
    refuse_overlap(tmp_path / "elsewhere", {"--data": tmp_path / "in"})
    with pytest.raises(ValueError, match=f"{how} the input --data {tmp_path / 'in'}"):
        refuse_overlap(tmp_path / out, {"--data": tmp_path / "in"})
