"""The feature pipeline from files to files: validate, derive, split, fit, transform, write.

Two sources:

* ``ecommerce``: a data folder with ``impressions.parquet``, ``users.parquet`` and ``items.parquet`` (each
  may also be a folder or glob of Parquet parts), joined and derived by :mod:`features.derive`.
* ``flat``: one table (Parquet or CSV, gzip allowed) used as it is, e.g. the census data.

Output of :func:`transform` and :func:`build` (model-ready Parquet)::

    OUT/spec.json                     the fitted spec (with its content hash)
    OUT/manifest.json                 rows per split, label means, the spec hash
    OUT/{train,valid,test}/part-*.parquet   (or OUT/all/ for data without a split), with page checksums
    OUT/.recsys-output.json           the owner marker: ``overwrite`` replaces only a folder that has it

A whole output folder is written under a temporary name and renamed when complete. The input tables are
read by :mod:`features.inputs`.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import polars as pl
import pyarrow.parquet as pq

from features.config import AFFINITY, FeatureConfig
from features.console import progress as progress_bar
from features.contract import ContractError, validate
from features.derive import derive_ecommerce_indexed
from features.files import check_replaceable, mark_owned, staged_dir
from features.inputs import Tables
from features.inputs import input_paths as input_paths  # re-exported: callers import them from here
from features.inputs import load_tables as load_tables
from features.inputs import scan_table as scan_table
from features.spec import _P, FeatureSpec, _stable_hash, fit, output_exprs

P = ParamSpec("P")
R = TypeVar("R")
SPLITS = ("train", "valid", "test")


def _in_memory(func: Callable[P, R]) -> Callable[P, R]:
    """Runs ``func`` with polars' in-memory engine.

    On 2 cores it sorts and joins the whole table 2-3x faster than the streaming engine, and the pipeline
    holds the derived rows in memory anyway.
    """

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with pl.Config(engine_affinity="in-memory"):
            return func(*args, **kwargs)

    return wrapper


ALL = "all"
FEATURES = "features"  # the kind of output folder we write (its owner marker)
# Rows per Parquet row group of the feature output. The rows are in time order and training reads whole row
# groups in a random order into its shuffle buffer (recsys.data.shard.ParquetShard): with small groups a
# buffer of 100,000 rows mixes a dozen stretches of a few hours from anywhere in the window. With polars'
# default groups (125,000 rows of a 1M-row part, about two days of a 2M-impression world) each hundred
# batches came from one stretch of two days; on the generated worlds the small groups gave +0.0065 and
# +0.0032 first-epoch validation click AUC on `interest` and `daypart` (-0.0013 on `default`), and the
# build of 10M impressions was no slower (docs/results.md, docs/performance.md).
ROW_GROUP_ROWS = 8192


# ------------------------------------------------------------------------------------- validation


def validate_tables(config: FeatureConfig, tables: Tables, *, labels: bool) -> None:
    """Runs the data contract (ecommerce) or checks the flat table's columns, before any work."""
    if config.source == "ecommerce":
        validate(tables.impressions, "impressions", labels=labels)
        validate(tables.users, "users")
        validate(tables.items, "items")
        if tables.history is not None:
            validate(tables.history, "impressions")
        return
    schema = tables.impressions.collect_schema()
    needed = {c: "passthrough" for c in config.passthrough}
    for f in config.features:
        needed[f.source] = f"features[{f.name}]"
        if f.relative_to:
            needed[f.relative_to] = f"features[{f.name}].relative_to"
    if labels:
        needed.update({lab.column: f"labels[{lab.name}]" for lab in config.labels})
    missing = {c: who for c, who in needed.items() if c not in schema}
    if missing:
        col, who = next(iter(missing.items()))
        raise ContractError(
            f"flat table: missing column(s) {sorted(missing)} (e.g. {col!r}, needed by "
            f"{who}); the table has columns {list(schema.names())}"
        )
    if labels:
        for lab in config.labels:
            n_null = tables.impressions.select(pl.col(lab.column).is_null().sum()).collect().item()
            if n_null:
                raise ContractError(f"flat table.{lab.column}: {n_null} null label(s) (labels[{lab.name}])")
            if lab.kind == "binary" and not (lab.positive_values or lab.positive_prefix):
                bad = (
                    tables.impressions.filter(~pl.col(lab.column).is_in([0, 1]))
                    .select(lab.column)
                    .head(1)
                    .collect()
                )
                if bad.height:
                    raise ContractError(
                        f"flat table.{lab.column}: binary label must be 0 or 1, e.g. "
                        f"{lab.column}={bad.item()!r} (labels[{lab.name}])"
                    )


# ------------------------------------------------------------------------------------------ split


def resolve_split(config: FeatureConfig, tables: Tables) -> dict[str, Any]:
    """Turns the split config into concrete boundaries (time) or fractions (hash)."""
    s = config.split
    if s.method == "hash":
        return {
            "method": "hash",
            "validation_fraction": s.validation_fraction,
            "test_fraction": s.test_fraction,
            "seed": s.seed,
        }
    if s.valid_start:
        valid_start, test_start = (dt.datetime.fromisoformat(v) for v in (s.valid_start, s.test_start))
    else:
        last = tables.impressions.select(pl.col(config.time_column).max()).collect().item()
        if last is None:
            raise ValueError("split: the impressions are empty, so there is no time range to split")
        # Whole days: the test split is the last `test_days` calendar days that have data.
        end = dt.datetime.combine(last.date(), dt.time()) + dt.timedelta(days=1)
        test_start = end - dt.timedelta(days=s.test_days)
        valid_start = test_start - dt.timedelta(days=s.validation_days)
    return {
        "method": "time",
        "column": config.time_column,
        "valid_start": valid_start.isoformat(),
        "test_start": test_start.isoformat(),
    }


def split_expr(split: dict[str, Any]) -> pl.Expr:
    """The split name (``train``/``valid``/``test``) of each row, from a resolved split."""
    if split["method"] == "time":
        ts = pl.col(split["column"])
        valid_start = dt.datetime.fromisoformat(split["valid_start"])
        test_start = dt.datetime.fromisoformat(split["test_start"])
        return (
            pl.when(ts >= test_start)
            .then(pl.lit("test"))
            .when(ts >= valid_start)
            .then(pl.lit("valid"))
            .otherwise(pl.lit("train"))
        )
    u = _stable_hash(pl.col("__row").cast(pl.Int64), seed=split["seed"]) / _P  # uniform in [0, 1)
    test, valid = split["test_fraction"], split["validation_fraction"]
    return (
        pl.when(u < test)
        .then(pl.lit("test"))
        .when(u < test + valid)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
    )


def split_rows(rows: pl.DataFrame, split: dict[str, Any]) -> dict[str, pl.DataFrame]:
    """The rows of each split, in :data:`SPLITS` order.

    A split whose rows are consecutive (a time split of rows sorted by time) is a slice of ``rows``, not a
    copy.
    """
    names = rows.select(split_expr(split)).to_series()
    parts: dict[str, pl.DataFrame] = {}
    for name in SPLITS:
        where = names == name
        at = where.arg_true()
        if at.len() and at[-1] - at[0] + 1 == at.len():
            parts[name] = rows.slice(at[0], at.len())
        else:
            parts[name] = rows.filter(where)
    return parts


# ---------------------------------------------------------------------------------------- derive


def derived(config: FeatureConfig, tables: Tables) -> tuple[pl.LazyFrame, pl.DataFrame | None]:
    """All rows with every derived column (lazily) and the history lists they index.

    Flat tables get a row number (for the hash split) and no lists.
    """
    if config.source == "flat":
        return tables.impressions.with_row_index("__row"), None
    affinities = [f for f in config.features if f.kind == AFFINITY]
    return derive_ecommerce_indexed(
        tables.impressions, tables.users, tables.items, config.history, tables.history, affinities
    )


def _has_labels(config: FeatureConfig, lf: pl.LazyFrame) -> bool:
    names = set(lf.collect_schema().names())
    return all(lab.column in names for lab in config.labels)


# ----------------------------------------------------------------------------------------- write


@dataclass
class DatasetResult:
    """What a transform wrote.

    Attributes:
        out_dir: the output folder.
        rows: rows written per split (or under ``all``).
        spec_hash: the content hash of the spec used.
        seconds: wall time of the run.
        label_means: per split, the mean of each label.
    """

    out_dir: Path
    rows: dict[str, int]
    spec_hash: str
    seconds: float
    label_means: dict[str, dict[str, float]] = field(default_factory=dict)


def _part_path(directory: Path, index: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"part-{index:05d}.parquet"


def _write_part(out: pl.DataFrame, path: Path, bar: Any) -> None:
    # lz4: much faster to write and to read than zstd, for files training reads many times. No column
    # statistics: nothing filters these files by value. A CRC32 checksum in every page header, so that a
    # reader that verifies them (pyarrow's ``page_checksum_verification``) finds a damaged page instead of
    # training on it. Polars' writer has no checksums; pyarrow's (one thread) made the build of 1M
    # impressions ~40% slower on 2 cores (1.75 s against 1.2 s).
    pq.write_table(
        out.to_arrow(),
        path,
        compression="lz4",
        write_statistics=False,
        row_group_size=ROW_GROUP_ROWS,
        write_page_checksum=True,
    )
    bar.update(out.height)


def write_dataset(
    spec: FeatureSpec,
    rows: pl.DataFrame,
    out_dir: str | Path,
    *,
    split: bool,
    labels: bool,
    lists: pl.DataFrame | None = None,
    overwrite: bool = False,
    progress: bool = True,
    started: float | None = None,
) -> DatasetResult:
    """Applies ``spec`` to derived ``rows`` chunk by chunk and writes the dataset atomically.

    Args:
        spec: the fitted spec.
        rows: derived rows (in memory).
        out_dir: the output folder; missing or empty, or with ``overwrite`` a features output of ours.
        split: write ``train``/``valid``/``test`` folders (else one ``all`` folder).
        labels: include label columns.
        lists: the history lists that ``rows`` index (ecommerce).
        overwrite: replace an existing output folder.
        progress: show a progress bar.
        started: when the run started (for the reported wall time).
    """
    started = time.perf_counter() if started is None else started
    out_dir = Path(out_dir)
    check_replaceable(out_dir, FEATURES, overwrite)
    chunk = spec.feature_config.rows_per_file
    exprs = output_exprs(spec, labels=labels, lists=lists)  # built once: it maps the history lists
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(out_dir) as tmp:  # the old output stays until the new one is complete
        counts: dict[str, int] = {}
        label_means: dict[str, dict[str, float]] = {}
        bar = progress_bar(
            total=rows.height,
            unit="row",
            unit_scale=True,
            desc="transform",
            disable=None if progress else True,
        )
        parts = split_rows(rows, spec.split) if split else {ALL: rows}
        # One part is written in the background while the next is computed: writing leaves a core idle.
        with ThreadPoolExecutor(1, thread_name_prefix="write") as writer:
            writing: Future[None] | None = None
            for name, subset in parts.items():
                sums = dict.fromkeys(spec.label_names(), 0.0)
                # Every split folder gets at least one part, empty if the split has no rows.
                for i, begin in enumerate(range(0, max(subset.height, 1), chunk)):
                    out = subset.slice(begin, chunk).lazy().select(exprs).collect()
                    if labels and out.height:
                        for k, v in out.select(spec.label_names()).sum().row(0, named=True).items():
                            sums[k] += float(v)
                    if writing is not None:
                        writing.result()
                    writing = writer.submit(_write_part, out, _part_path(tmp / name, i), bar)
                counts[name] = subset.height
                if labels and subset.height:
                    label_means[name] = {k: v / subset.height for k, v in sums.items()}
            if writing is not None:
                writing.result()
        bar.close()
        spec.save(tmp / "spec.json")
        result = DatasetResult(out_dir, counts, spec.content_hash, time.perf_counter() - started, label_means)
        manifest = {
            "rows": result.rows,
            "label_means": label_means,
            "spec_hash": spec.content_hash,
            "split": spec.split,
            "seconds": round(result.seconds, 3),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        mark_owned(tmp, FEATURES)  # arrives with the output, in the same rename
    return result


# ------------------------------------------------------------------------------------ entry points


@_in_memory
def fit_spec(config: FeatureConfig, tables: Tables) -> FeatureSpec:
    """Validates the tables and fits a spec on the training window only."""
    validate_tables(config, tables, labels=True)
    split = resolve_split(config, tables)
    if split["method"] == "time":
        # Training rows only need events before them, so the training window derives on its own.
        cutoff = dt.datetime.fromisoformat(split["valid_start"])
        tables = Tables(
            tables.impressions.filter(pl.col(config.time_column) < cutoff),
            tables.users,
            tables.items,
            tables.history,
        )
    rows, lists = derived(config, tables)
    train = rows.filter(split_expr(split) == "train").collect()
    if train.height == 0:
        raise ValueError(f"split: the training window is empty ({split})")
    return fit(config, train, split, lists)


@_in_memory
def transform(
    spec: FeatureSpec,
    tables: Tables,
    out_dir: str | Path,
    *,
    split: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> DatasetResult:
    """Applies a fitted spec to training or scoring data and writes model-ready Parquet.

    Args:
        spec: the fitted spec.
        tables: the input tables; scoring data has no label columns.
        out_dir: the output folder.
        split: split into train/valid/test; by default when the data has labels.
        overwrite: replace an existing output folder (only one that we wrote: see
            ``features.files.check_replaceable``).
        progress: show a progress bar.
    """
    started = time.perf_counter()
    check_replaceable(out_dir, FEATURES, overwrite)  # before any work
    cfg = spec.feature_config
    labels = _has_labels(cfg, tables.impressions)
    validate_tables(cfg, tables, labels=labels)
    rows, lists = derived(cfg, tables)
    return write_dataset(
        spec,
        rows.collect(),
        out_dir,
        split=labels if split is None else split,
        labels=labels,
        lists=lists,
        overwrite=overwrite,
        progress=progress,
        started=started,
    )


@_in_memory
def build(
    config: FeatureConfig,
    tables: Tables,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[FeatureSpec, DatasetResult]:
    """Fit and transform in one pass over the data: derives once, fits on the train split, writes all.

    Gives the same spec and output as :func:`fit_spec` followed by :func:`transform`, because a training
    row's derived columns only depend on events before it.
    """
    started = time.perf_counter()
    check_replaceable(out_dir, FEATURES, overwrite)  # before any work
    validate_tables(config, tables, labels=True)
    split = resolve_split(config, tables)
    lazy_rows, lists = derived(config, tables)
    rows = lazy_rows.collect()
    train = split_rows(rows, split)["train"]
    if train.height == 0:
        raise ValueError(f"split: the training window is empty ({split})")
    spec = fit(config, train, split, lists)
    del train
    result = write_dataset(
        spec,
        rows,
        out_dir,
        split=True,
        labels=True,
        lists=lists,
        overwrite=overwrite,
        progress=progress,
        started=started,
    )
    return spec, result
