"""The input of a scoring run: candidate files, the users, items and history tables, all checked first.

Every table is validated against the data contract (:func:`features.contract.validate`) before any work:
a missing column or a wrong type fails with the table, the column and a value named, and nothing is
written. Scoring relaxes one rule: ``user_id`` and ``item_id`` may be null (a logged-out user, an item
missing from the catalogue); such rows are scored through the out-of-vocabulary ids, as unseen ids are,
and never dropped.

History features (the user's recent clicks as of each row's ``ts``) come from ``history`` (impressions
with ``click``) when given; else from the input's own labels when it carries ``click`` (as in training);
else they are empty (no clicks), and the run says so.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from features.contract import LABELS, ContractError, validate
from features.pipeline import Tables, input_paths, validate_tables
from features.spec import FeatureSpec
from recsys.rows import HISTORY_COLUMNS, empty_history
from recsys.scoring.config import ScoreConfig

NULLABLE_IDS = ("user_id", "item_id")  # null ids are scored through the out-of-vocabulary path
FLAT_KEYS = ("impression_id", "request_id")  # what a flat table needs besides its features
BESIDE = ("users", "items", "history")  # tables that may sit beside the input files, and are not input


@dataclass(frozen=True)
class Inputs:
    """The validated input of a run.

    Attributes:
        files: the candidate Parquet files, in input order.
        rows: candidate rows in all.
        users: the users table.
        items: the items table.
        history: (H, ``HISTORY_COLUMNS``) click events for the history features (or what
            :func:`with_history` keeps).
        history_source: where they come from, in words.
        groups: the files of each table (``input``, ``users``, ``items``, and ``history`` when given).
        fingerprint: a content fingerprint of all of them: a rerun on changed files is refused.
        labelled: the input carries labels (they stand for the history when none is given).
    """

    files: list[Path]
    rows: int
    users: pl.DataFrame
    items: pl.DataFrame
    history: pl.DataFrame
    history_source: str
    groups: dict[str, list[Path]]
    fingerprint: str
    labelled: bool = False


def read_inputs(config: ScoreConfig, spec: FeatureSpec | None = None) -> Inputs:
    """Finds and validates the input of ``config``, with the click events of the history.

    A model whose affinity features read more of the event log reads it again with
    :func:`with_history`. For a model of a flat table (``spec`` of source ``flat``) the input is that table
    alone, with ``impression_id`` (unique) and ``request_id`` (the ranking group) besides its features.

    Raises:
        ContractError: a table breaks the contract (the message names the table, the column and a value).
        FileNotFoundError: an input is missing.
    """
    files = input_files(config.input)
    if spec is not None and spec.feature_config.source == "flat":
        return _flat_inputs(files, spec)
    groups = {
        "input": files,
        "users": _table_files(_beside(files, config.users, "users")),
        "items": _table_files(_beside(files, config.items, "items")),
    }
    if config.history:
        groups["history"] = _table_files(Path(config.history))
    has_labels = _validate_input(files)
    users = _validated_table(groups["users"], "users")
    items = _validated_table(groups["items"], "items")
    history, source = _history(config, files, has_labels, HISTORY_COLUMNS, False)
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    return Inputs(files, rows, users, items, history, source, groups, _fingerprint(groups), has_labels)


def has_contract_tables(config: ScoreConfig) -> bool:
    """Whether the users and items tables are there (given, or beside the input): a contract input.

    Such an input is validated before the model is resolved; one without them is a flat table, or the
    error that names the missing table comes once the model's spec says it is not one.
    """
    try:
        files = input_files(config.input)
    except FileNotFoundError:
        return True  # read_inputs names what is missing, before the store is read
    return all(_beside_path(files, getattr(config, name), name).exists() for name in ("users", "items"))


def _flat_inputs(files: list[Path], spec: FeatureSpec) -> Inputs:
    """The input of a flat-table model: its files, checked for the spec's columns and the two keys."""
    cfg = spec.feature_config
    for f in files:
        schema = pl.scan_parquet(str(f)).collect_schema()
        for key in FLAT_KEYS:
            if key not in schema or not schema[key].is_integer():
                found = f"type {schema[key]}" if key in schema else "missing"
                raise ContractError(f"input {f}: column {key!r}: expected an integer key column, {found}")
        try:
            validate_tables(cfg, Tables(pl.scan_parquet(str(f))), labels=False)
        except ContractError as e:
            raise ContractError(f"input {f}:\n{e}") from None
    rows, unique = _scan(files).select(pl.len(), pl.col("impression_id").n_unique()).collect().row(0)
    if rows != unique:
        raise ContractError(f"input.impression_id: key is not unique: {rows - unique} duplicate row(s)")
    labelled = all(lab.column in pl.scan_parquet(str(files[0])).collect_schema() for lab in cfg.labels)
    groups = {"input": files}
    none = "none (a flat table has no history)"
    empty = pl.DataFrame()
    return Inputs(files, rows, empty, empty, empty_history(), none, groups, _fingerprint(groups), labelled)


def with_history(
    config: ScoreConfig, inputs: Inputs, columns: tuple[str, ...], every_impression: bool
) -> Inputs:
    """``inputs`` with the history that a model's features read (:func:`recsys.package.history_needs`).

    Args:
        config: the run's settings.
        inputs: from :func:`read_inputs`.
        columns: the history columns to keep.
        every_impression: keep the non-click impressions too (else the clicks only).

    Raises:
        ContractError: the history (or the labelled input standing for it) lacks one of ``columns``.
    """
    if columns == HISTORY_COLUMNS and not every_impression:
        return inputs
    history, _ = _history(config, inputs.files, inputs.labelled, columns, every_impression)
    return replace(inputs, history=history)


def input_files(path: str) -> list[Path]:
    """The Parquet files of an input: a file, a folder's ``*.parquet`` (recursive), or a glob's matches.

    ``users.parquet``, ``items.parquet`` and ``history.parquet`` in a folder or glob are tables beside the
    input, not input, and are left out.

    Raises:
        FileNotFoundError: no file matches.
    """
    try:
        files = input_paths(path)
    except FileNotFoundError:
        files = []
    if os.path.isdir(path) or any(ch in path for ch in "*?["):
        files = [f for f in files if Path(f).name not in {f"{name}.parquet" for name in BESIDE}]
    if not files:
        raise FileNotFoundError(f"input: no Parquet file at {path!r}")
    return [Path(f).resolve() for f in files]


def _beside_path(files: list[Path], explicit: str | None, name: str) -> Path:
    return Path(explicit) if explicit else files[0].parent / f"{name}.parquet"


def _beside(files: list[Path], explicit: str | None, name: str) -> Path:
    path = _beside_path(files, explicit, name)
    if not path.exists():
        how = f"--{name} {explicit}" if explicit else f"no --{name}, and no {path}"
        raise FileNotFoundError(f"{name}: {how} not found; give the {name} table with --{name}")
    return path


def _table_files(path: Path) -> list[Path]:
    return input_files(str(path)) if path.is_dir() else [path.resolve()]


def file_fingerprint(path: Path) -> str:
    """A content fingerprint of a Parquet file: its name, size and footer (schema, row groups, statistics).

    Reading the footer only keeps it cheap for large files; any rewrite changes the footer's offsets or
    statistics.
    """
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}:".encode())
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 8))
        tail = fh.read(8)
        footer = int.from_bytes(tail[:4], "little") if len(tail) == 8 and tail[4:] == b"PAR1" else 0
        fh.seek(max(0, size - 8 - footer))
        digest.update(fh.read(footer + 8))
    return digest.hexdigest()


def _fingerprint(groups: dict[str, list[Path]]) -> str:
    digest = hashlib.sha256()
    for name, files in groups.items():
        digest.update(name.encode())
        for f in files:
            digest.update(file_fingerprint(f).encode())
    return digest.hexdigest()[:32]


def _scan(files: list[Path]) -> pl.LazyFrame:
    return pl.scan_parquet([str(f) for f in files])


def _validate_input(files: list[Path]) -> bool:
    """Validates each candidate file, then the key across files; returns whether the input has labels.

    Raises:
        ContractError: naming the file, the column and a value.
    """
    has_labels = None
    for f in files:
        labels = all(c in pl.scan_parquet(str(f)).collect_schema() for c in LABELS)
        if has_labels is not None and labels != has_labels:
            raise ContractError(
                f"input {f}: some input files have the label columns {list(LABELS)}, others not"
            )
        has_labels = labels
        _validate_candidates(f, labels)
    if len(files) > 1:
        stats = _scan(files).select(pl.len(), pl.col("impression_id").n_unique()).collect().row(0)
        if stats[0] != stats[1]:
            raise ContractError(
                f"impressions.impression_id: key is not unique across the input files: "
                f"{stats[0] - stats[1]} duplicate row(s)"
            )
    return bool(has_labels)


def _validate_candidates(file: Path, labels: bool) -> None:
    """Validates one candidate file against the impressions contract, null ids allowed."""
    lf = pl.scan_parquet(str(file))
    schema = lf.collect_schema()
    # Null user and item ids are allowed when scoring (out-of-vocabulary); only their null rule is waived.
    checked = lf.with_columns(
        pl.col(c).fill_null(-1) for c in NULLABLE_IDS if c in schema and schema[c].is_integer()
    )
    try:
        validate(checked, "impressions", labels=labels)
    except ContractError as e:
        raise ContractError(f"input {file}:\n{e}") from None


def _validated_table(files: list[Path], table: str) -> pl.DataFrame:
    try:
        return validate(_scan(files), table).collect()
    except ContractError as e:
        raise ContractError(f"{table} {files[0] if len(files) == 1 else files}:\n{e}") from None


def _history(
    config: ScoreConfig, files: list[Path], has_labels: bool, columns: tuple[str, ...], every_impression: bool
) -> tuple[pl.DataFrame, str]:
    """The events for the history features, and where they come from."""
    if config.history:
        hist_files = _table_files(Path(config.history))
        try:
            lf = validate(_scan(hist_files), "impressions")
        except ContractError as e:
            raise ContractError(f"history {config.history}:\n{e}") from None
        source = f"history {config.history}"
    elif has_labels:
        lf, source = _scan(files), "the input's own labels"
    else:
        return empty_history(
            columns
        ), "none (no --history and no labels in the input): history features are empty"
    missing = [c for c in columns if c not in lf.collect_schema().names()]
    if missing:
        raise ContractError(f"{source}: missing column(s) {missing}, read by the model's history features")
    # Only clicks make the click history (features.derive.click_history); affinity features may count
    # every impression.
    events = lf if every_impression else lf.filter(pl.col("click") == 1)
    return events.select(columns).collect(), source
