"""The input tables: Parquet files, folders and globs (CSV for a flat table), checked as they are scanned.

Every Parquet file's footer is read before any work, so that an empty, truncated or foreign file is named
rather than failing deep inside a query. The parts of one table must agree on the type of every column
they share, and each contract column is in every part or in none (then the contract names it). Extra
columns, which the contract allows, may differ between parts: rows of a part without one get nulls there.

Example:
    >>> tables = load_tables("data/demo/raw")  # doctest: +SKIP
    >>> tables.impressions.collect_schema()["ts"]  # doctest: +SKIP
    Datetime(time_unit='us', time_zone=None)
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from features.contract import CONTRACTS, ContractError


@dataclass
class Tables:
    """The input tables of one run, lazily scanned.

    Attributes:
        impressions: the impressions (ecommerce) or the flat table.
        users: the users table (ecommerce only).
        items: the items table (ecommerce only).
        history: an event log for history features (scoring); None means the impressions themselves.
    """

    impressions: pl.LazyFrame
    users: pl.LazyFrame | None = None
    items: pl.LazyFrame | None = None
    history: pl.LazyFrame | None = None


def input_paths(path: str | Path) -> list[str]:
    """Files behind a path: the file itself, a folder's Parquet parts, or a glob's matches."""
    p = str(path)
    if os.path.isdir(p):
        files = sorted(glob.glob(os.path.join(p, "**", "*.parquet"), recursive=True))
    elif any(ch in p for ch in "*?["):
        files = sorted(glob.glob(p, recursive=True))
    else:
        files = [p] if os.path.exists(p) else []
    if not files:
        raise FileNotFoundError(f"no input files at {p!r}")
    return files


def scan_table(path: str | Path, *, table: str | None = None) -> pl.LazyFrame:
    """Scans a Parquet file, folder or glob, or reads a (gzipped) CSV file.

    Args:
        path: the file, folder or glob.
        table: the contract table it holds (``impressions``, ``users``, ``items``): parts may differ in
            extra columns. None (a flat table): every part has the same columns.

    Raises:
        ValueError: naming the file that is not readable, or whose column's type differs from another part.
        ContractError: naming the part that lacks a column another part has (a contract column, or any
            column of a flat table).
    """
    files = input_paths(path)
    if files[0].endswith((".csv", ".csv.gz")):
        return pl.concat([_read_csv(f) for f in files]).lazy()
    schemas = {f: _parquet_schema(f) for f in files}
    first = schemas[files[0]]
    if all(schema == first for schema in schemas.values()):
        return pl.scan_parquet(files)
    _check_parts(schemas, table)
    # Parts with different extra columns: each part is scanned on its own, and a missing extra is null.
    return pl.concat([pl.scan_parquet(f) for f in files], how="diagonal")


def _parquet_schema(file: str) -> pl.Schema:
    """The schema in ``file``'s footer; a ValueError naming the file when it is not readable Parquet."""
    try:
        return pl.read_parquet_schema(file)
    except (pl.exceptions.PolarsError, OSError) as exc:
        size = os.path.getsize(file) if os.path.isfile(file) else 0
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{file}: not a readable Parquet file ({size:,} bytes): {reason}") from None


def _read_csv(file: str) -> pl.DataFrame:
    try:
        return pl.read_csv(file, infer_schema_length=100_000)
    except pl.exceptions.PolarsError as exc:
        raise ValueError(f"{file}: not a readable CSV file: {str(exc).strip().splitlines()[0]}") from None


def _check_parts(schemas: dict[str, pl.Schema], table: str | None) -> None:
    """Raises unless the parts of one table agree on their columns' types and on the needed columns."""
    seen: dict[str, tuple[str, pl.DataType]] = {}
    for file, schema in schemas.items():
        for name, dtype in schema.items():
            where, other = seen.setdefault(name, (file, dtype))
            if dtype != other:
                raise ValueError(
                    f"{file}: column {name!r} is {dtype}, but {other} in {where}; the parts of one table "
                    "must agree on each column's type"
                )
    needed = list(seen) if table is None else [c.name for c in CONTRACTS[table].columns if c.name in seen]
    for file, schema in schemas.items():
        missing = [c for c in needed if c not in schema]
        if missing:
            raise ContractError(
                f"{file}: missing column(s) {missing} that {seen[missing[0]][0]} has; every part of the "
                f"{table or 'flat'} table needs them"
            )


def load_tables(
    data: str | Path | None = None,
    *,
    impressions: str | Path | None = None,
    users: str | Path | None = None,
    items: str | Path | None = None,
    history: str | Path | None = None,
) -> Tables:
    """Scans the ecommerce tables from a data folder, or from explicit paths (which win)."""

    def pick(explicit: str | Path | None, name: str) -> pl.LazyFrame:
        if explicit is not None:
            return scan_table(explicit, table=name)
        if data is None:
            raise ValueError(f"{name}: give a data folder or an explicit --{name} path")
        return scan_table(Path(data) / f"{name}.parquet", table=name)

    return Tables(
        impressions=pick(impressions, "impressions"),
        users=pick(users, "users"),
        items=pick(items, "items"),
        history=scan_table(history, table="impressions") if history is not None else None,
    )


def refuse_input_file(path: str | Path, inputs: dict[str, str | Path], role: str) -> None:
    """Raises ValueError when output file ``path`` is one of the inputs' files, or a folder.

    Args:
        path: the file to be written (a spec).
        inputs: each input's role (``--data``, ``--impressions``) and its file, folder or glob.
        role: the output's role, for the message (``--spec``).
    """
    target = Path(path).resolve()
    if target.is_dir():
        raise ValueError(f"{role} {path}: is a folder; give the path of a file to write")
    for name, source in inputs.items():
        try:
            files = [source, *input_paths(source)]
        except FileNotFoundError:  # nothing there yet to destroy
            files = [source]
        if any(Path(f).resolve() == target for f in files):
            raise ValueError(
                f"{role} {path}: is a file of the input {name} {source}; writing there would destroy the "
                "input: choose another path"
            )
