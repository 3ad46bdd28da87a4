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

import contextlib
import fnmatch
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from features.contract import LABELS, ContractError, validate
from features.files import refuse_overlap
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


def refuse_output_among_inputs(config: ScoreConfig, out: Path) -> None:
    """Raises ValueError if output folder ``out`` is an input, lies inside one, or contains one.

    The inputs: the candidates (the file or folder given, or each file a glob matches), the users and items
    tables and the history. An output inside a folder or glob of candidates would be read back as input by
    the next run; one around an input, or equal to it, would be cleared by ``overwrite``.

    Raises:
        FileNotFoundError: no candidate file at ``config.input``.
    """
    files = input_files(config.input)
    pattern = config.input if _is_glob(config.input) else None
    roles: dict[str, Path] = {}
    if pattern is None:
        roles["--input"] = Path(config.input)
    else:
        roles.update({f"file {i + 1} of --input {pattern!r}": f for i, f in enumerate(files)})
    for name in ("users", "items"):
        roles[f"{name} table"] = _beside_path(files, getattr(config, name), name)
    if config.history:
        roles["--history"] = Path(config.history)
    refuse_overlap(out, roles)
    if pattern is not None and _glob_matches(out.resolve() / "part-00000.parquet", pattern):
        raise ValueError(
            f"output folder {out.resolve()} lies where --input {pattern!r} finds its files: the next run "
            "would read its part files back as input; choose an output folder outside the inputs"
        )


def _is_glob(path: str) -> bool:
    return not os.path.isdir(path) and any(ch in path for ch in "*?[")


def _glob_matches(path: Path, pattern: str) -> bool:
    """Whether ``glob.glob(pattern, recursive=True)`` would find file ``path`` (``**``: any folders)."""

    def match(parts: tuple[str, ...], pats: tuple[str, ...]) -> bool:
        if not pats:
            return not parts
        if pats[0] == "**":
            return any(match(parts[i:], pats[1:]) for i in range(len(parts) + 1))
        return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and match(parts[1:], pats[1:])

    pats = Path(os.path.abspath(pattern)).parts
    fixed = next(i for i, part in enumerate(pats) if any(ch in part for ch in "*?["))
    return match(path.parts, Path(*pats[:fixed]).resolve().parts + pats[fixed:])


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
        with _reading(f"input {f}"):
            schema = pl.scan_parquet(str(f)).collect_schema()
            for key in FLAT_KEYS:
                if key not in schema or not schema[key].is_integer():
                    found = f"type {schema[key]}" if key in schema else "missing"
                    raise ContractError(f"input {f}: column {key!r}: expected an integer key column, {found}")
            try:
                validate_tables(cfg, Tables(pl.scan_parquet(str(f))), labels=False)
            except ContractError as e:
                raise ContractError(f"input {f}:\n{e}") from None
    with _reading(f"input {_named(files)}"):
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
    """The files as one table of the first file's columns: the contract allows a file extra columns."""
    return pl.scan_parquet([str(f) for f in files], extra_columns="ignore")


_READ_ERRORS = (pl.exceptions.PolarsError, pa.ArrowException, OSError)


@contextlib.contextmanager
def _reading(what: str) -> Iterator[None]:
    """Turns an error reading Parquet (an empty, truncated or damaged file) into a ContractError naming it.

    Args:
        what: the table and its file(s), e.g. ``input /data/c0.parquet``.
    """
    try:
        yield
    except _READ_ERRORS as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ContractError(f"{what}: cannot be read as Parquet ({type(e).__name__}: {reason})") from None


def _named(files: list[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"


def _validate_input(files: list[Path]) -> bool:
    """Validates each candidate file, then the key across files; returns whether the input has labels.

    Raises:
        ContractError: naming the file, the column and a value.
    """
    has_labels = None
    for f in files:
        with _reading(f"input {f}"):
            labels = all(c in pl.scan_parquet(str(f)).collect_schema() for c in LABELS)
            if has_labels is not None and labels != has_labels:
                raise ContractError(
                    f"input {f}: some input files have the label columns {list(LABELS)}, others not"
                )
            has_labels = labels
            _validate_candidates(f, labels)
    if len(files) > 1:
        with _reading(f"input {_named(files)}"):
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
        with _reading(f"{table} {_named(files)}"):
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
            with _reading(f"history {_named(hist_files)}"):
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
    with _reading(source):
        missing = [c for c in columns if c not in lf.collect_schema().names()]
        if missing:
            raise ContractError(
                f"{source}: missing column(s) {missing}, read by the model's history features"
            )
        # Only clicks make the click history (features.derive.click_history); affinity features may count
        # every impression.
        events = lf if every_impression else lf.filter(pl.col("click") == 1)
        return events.select(columns).collect(), source
