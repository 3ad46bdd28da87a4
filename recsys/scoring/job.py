"""Batch scoring: a registered model over candidate Parquet, ranked per request, lossless and resumable.

:func:`run_scoring` is the whole job; ``python -m pipelines.score`` is its command line. In order:

1. **Validate** every input table against the data contract (:func:`features.contract.validate`) before
   any work: a missing column or a wrong type fails with the table, the column and a value named, and
   nothing is written. Scoring relaxes one rule: ``user_id`` and ``item_id`` may be null (a logged-out
   user, an item missing from the catalogue); such rows are scored through the out-of-vocabulary ids,
   as unseen ids are, and never dropped.
2. **Resolve the model once** (:func:`recsys.tracking.core.resolve_model`): ``models:/NAME@champion`` becomes
   ``models:/NAME/3`` at the start, and version 3 is what every partition uses, what the manifest, the
   ``model_version`` column and the MLflow run record, even if the alias moves during the run.
3. **Plan partitions**: each input file is cut into contiguous row ranges of at most
   ``rows_per_partition`` rows at row-group boundaries (a larger row group is cut inside), numbered in
   file order: ``part-00000``, ``part-00001``, ... A cut that would split a request moves back to the start
   of that request, so that contiguous requests never straddle two partitions. A request whose rows still
   lie in several partitions (non-contiguous input, or one request in two files) belongs to the first of
   them, which reads its other rows too; the others skip them. Ranking within a request therefore always
   sees the whole request, at the cost of extra reads for non-contiguous input only.
4. **Score with Ray Data**: one dataset over the partitions to do, mapped by :class:`ScoreStage`
   (``map_batches`` with a callable class; ``concurrency`` actors, one per CPU by default, each with the
   model loaded once and the users, items and click-history tables). An actor reads a partition, runs the
   training feature code (:func:`recsys.package.model_ready`: :func:`features.pipeline.derived` then
   :func:`features.spec.output_exprs`) and the model (``batch_size`` rows per call) and returns the
   narrow scored rows.
5. **Rank and write, on the driver only**: when all rows of a partition are scored, the driver computes
   the ranking score and the rank within ``request_id``, keeps the top K per request if asked, writes
   ``OUT/part-XXXXX.parquet.tmp`` and renames it to ``OUT/part-XXXXX.parquet``, then rewrites
   ``OUT/manifest.json`` atomically. The driver is the only writer: a run killed at any moment leaves
   complete part files and a manifest that lists a subset of them.
6. **Resume**: a rerun of the same command skips the partitions that the manifest lists as done and whose
   file holds the recorded row count, and scores the rest (a part file the manifest does not list is
   scored again and replaced). A manifest written with another model version, input fingerprint or
   scoring settings is refused unless ``overwrite``.
7. **Check and log**: every partition's rows in, rows scored, rows expected out and rows in its file must
   agree, and the partitions' rows in must sum to the input's rows; :attr:`ScoreResult.ok` is False (and
   the command exits non-zero) otherwise. The run is logged to MLflow in the experiment
   ``<model name>-scoring``: model version, input fingerprint, row counts, duration, rows/s and the score
   distribution. An unreachable tracking store is reported once and the scoring goes on.

Output columns: ``impression_id``, ``request_id``, ``user_id``, ``item_id`` (passed through), one
``p_<task>`` per task, ``score``, ``rank`` (1 = best; a permutation of 1..n within each request, ties
broken by ``impression_id``) and ``model_version``; each part file is sorted by ``(request_id, rank)``.

History features (the user's recent clicks as of each row's ``ts``) come from ``history`` (impressions
with ``click``) when given; else from the input's own labels when it carries ``click`` (as in training);
else they are empty (no clicks), and the run says so.

Example:
    >>> config = ScoreConfig(model="models:/ecommerce-ranker@champion", input="cands/impressions.parquet",
    ...                      output="out/scores", history="raw/impressions.parquet")  # doctest: +SKIP
    >>> result = run_scoring(config)  # doctest: +SKIP
    >>> result.rows_in == result.rows_out, result.model_version  # doctest: +SKIP
    (True, '3')
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from features.contract import IMPRESSIONS, LABELS, ContractError, validate
from features.pipeline import Tables, input_paths
from recsys.package import HISTORY_COLUMNS, load_package, model_ready, output_column, score_ready
from recsys.runtime import model_process_env

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
KEY_COLUMNS = ("impression_id", "request_id", "user_id", "item_id")
NULLABLE_IDS = ("user_id", "item_id")  # null ids are scored through the out-of-vocabulary path
FORMULAS = ("product", "click", "purchase")
_PARTITION = "__partition"
_READ_COLUMNS = tuple(c.name for c in IMPRESSIONS.without_labels().columns)


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ScoreConfig:
    """One scoring run.

    Attributes:
        model: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/PATH``, or a local package
            folder (:func:`recsys.package.save_package`).
        input: candidate impressions (the contract's impressions columns; labels optional): a Parquet file,
            a folder of Parquet files, or a glob.
        output: the output folder (created; resumed if it holds a manifest of the same run).
        users: the users table; default ``users.parquet`` beside the (first) input file.
        items: the items table; default ``items.parquet`` beside the (first) input file.
        history: impressions with ``click`` for the history features; default: the input's own labels if
            it has them, else no history (see the module docstring).
        top_k: keep the best K rows per request (None: all rows).
        score_formula: ``product`` (``p_click * p_purchase ** alpha``), ``click`` or ``purchase``.
        alpha: the exponent of ``p_purchase`` in ``product``.
        batch_size: rows per model call.
        concurrency: scoring actors (each loads the model and the users, items and history tables once,
            and scores whole partitions); None: one per CPU (of this machine, or of the cluster).
        threads_per_actor: torch and polars threads of each actor.
        rows_per_partition: most rows per partition (one output file each).
        tracking_uri: the MLflow store of the registry and of the scoring run's log (default
            :func:`recsys.tracking.core.default_tracking_uri`).
        address: a Ray cluster to run on (default ``RAY_ADDRESS``, else an embedded local Ray).
        overwrite: rescore everything, even when a manifest of another run is there.
        max_partitions: stop after this many partitions are written (an interrupted run; for tests).
        progress: show a progress bar over partitions.
    """

    model: str
    input: str
    output: str
    users: str | None = None
    items: str | None = None
    history: str | None = None
    top_k: int | None = None
    score_formula: str = "product"
    alpha: float = 1.0
    batch_size: int = 8192
    concurrency: int | None = None
    threads_per_actor: int = 1
    rows_per_partition: int = 250_000
    tracking_uri: str | None = None
    address: str | None = None
    overwrite: bool = False
    max_partitions: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("model", "input", "output"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
        for name in ("batch_size", "threads_per_actor"):
            _check_int(name, getattr(self, name), 1)
        if self.concurrency is not None:
            _check_int("concurrency", self.concurrency, 1)
        _check_int("rows_per_partition", self.rows_per_partition, 1)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 1)
        if self.max_partitions is not None:
            _check_int("max_partitions", self.max_partitions, 1)
        if self.score_formula not in FORMULAS:
            raise ValueError(f"score_formula: expected one of {list(FORMULAS)}, got {self.score_formula!r}")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, int | float)
            or not np.isfinite(self.alpha)
        ):
            raise ValueError(f"alpha: expected a finite number, got {self.alpha!r}")

    def settings(self) -> dict[str, Any]:
        """What decides the output besides the model and the input: a rerun must use the same."""
        return {
            "score_formula": self.score_formula,
            "alpha": float(self.alpha),
            "top_k": self.top_k,
            "rows_per_partition": self.rows_per_partition,
        }


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


@dataclass
class ScoreResult:
    """What a scoring run did.

    Attributes:
        output: the output folder.
        manifest: its manifest file.
        model_uri: the model URI as given.
        pinned_uri: the model it resolved to (``models:/NAME/VERSION``).
        model_version: the value of the ``model_version`` column.
        input_fingerprint: the fingerprint of the input files (and users, items, history).
        partitions: partitions in all.
        partitions_scored: scored by this invocation.
        partitions_skipped: found complete and skipped.
        rows_in: candidate rows of the input.
        rows_out: rows in the output files (``rows_in`` without ``top_k``).
        expected_out: rows the output must hold (``rows_in``, or the top K of each request).
        seconds: wall time of this invocation.
        rows_per_s: rows scored by this invocation per second of its scoring phase (read, features, model,
            rank, write).
        complete: every partition is written.
        problems: count mismatches and unfinished partitions; empty when all is well.
        summary: the score distribution (mean and quantiles per column).
        run_id: the MLflow run (None without tracking).
    """

    output: Path
    manifest: Path
    model_uri: str
    pinned_uri: str
    model_version: str
    input_fingerprint: str
    partitions: int
    partitions_scored: int
    partitions_skipped: int
    rows_in: int
    rows_out: int
    expected_out: int
    seconds: float
    rows_per_s: float
    complete: bool
    problems: list[str] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None

    @property
    def ok(self) -> bool:
        """Complete, and every count agrees."""
        return self.complete and not self.problems


# ------------------------------------------------------------------------------------------- inputs


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
        files = [
            f for f in files if Path(f).name not in ("users.parquet", "items.parquet", "history.parquet")
        ]
    if not files:
        raise FileNotFoundError(f"input: no Parquet file at {path!r}")
    return [Path(f).resolve() for f in files]


def _beside(files: list[Path], explicit: str | None, name: str) -> Path:
    path = Path(explicit) if explicit else files[0].parent / f"{name}.parquet"
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
        lf = pl.scan_parquet(str(f))
        schema = lf.collect_schema()
        labels = all(c in schema for c in LABELS)
        if has_labels is not None and labels != has_labels:
            raise ContractError(
                f"input {f}: some input files have the label columns {list(LABELS)}, others not"
            )
        has_labels = labels
        # Null user and item ids are allowed when scoring (out-of-vocabulary); only their null rule is waived.
        checked = lf.with_columns(
            pl.col(c).fill_null(-1) for c in NULLABLE_IDS if c in schema and schema[c].is_integer()
        )
        try:
            validate(checked, "impressions", labels=labels)
        except ContractError as e:
            raise ContractError(f"input {f}:\n{e}") from None
    if len(files) > 1:
        stats = _scan(files).select(pl.len(), pl.col("impression_id").n_unique()).collect().row(0)
        if stats[0] != stats[1]:
            raise ContractError(
                f"impressions.impression_id: key is not unique across the input files: "
                f"{stats[0] - stats[1]} duplicate row(s)"
            )
    return bool(has_labels)


def _validated_table(files: list[Path], table: str) -> pl.DataFrame:
    try:
        return validate(_scan(files), table).collect()
    except ContractError as e:
        raise ContractError(f"{table} {files[0] if len(files) == 1 else files}:\n{e}") from None


def _history(config: ScoreConfig, files: list[Path], has_labels: bool) -> tuple[pl.DataFrame, str]:
    """The click events for the history features, and where they come from."""
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
        empty = pl.DataFrame(
            schema={c.name: c.dtype for c in IMPRESSIONS.columns if c.name in HISTORY_COLUMNS}
        )
        return empty, "none (no --history and no labels in the input): history features are empty"
    # Only clicks make history (features.derive.click_history); the rest is not needed.
    return lf.filter(pl.col("click") == 1).select(HISTORY_COLUMNS).collect(), source


# --------------------------------------------------------------------------------------- partitions


@dataclass(frozen=True)
class Partition:
    """A unit of work and of output: one file ``part-{index:05d}.parquet``.

    Attributes:
        index: its number, in input order.
        file: the input file.
        start: first row (in the file) of its range.
        stop: one past its last row.
        rows_in: the rows it scores: its range, less the requests owned by an earlier partition, plus the
            rows of its own requests that lie in other ranges.
        drop_requests: requests of its range that an earlier partition scores.
        pull: rows of its requests in other ranges: ``(file, start, stop, request ids)``.
    """

    index: int
    file: str
    start: int
    stop: int
    rows_in: int
    drop_requests: tuple[int, ...] = ()
    pull: tuple[tuple[str, int, int, tuple[int, ...]], ...] = ()

    @property
    def name(self) -> str:
        """The output file name."""
        return f"part-{self.index:05d}.parquet"


def _cuts(group_rows: Sequence[int], limit: int) -> list[int]:
    """Row offsets of the cuts: at row-group starts, at most ``limit`` rows apart (inside large groups)."""
    cuts, begin, pos = [], 0, 0
    for n in group_rows:
        if pos > begin and pos + n - begin > limit:
            cuts.append(pos)
            begin = pos
        while pos + n - begin > limit:
            begin += limit
            cuts.append(begin)
        pos += n
    return cuts


def _aligned(cuts: list[int], request_ids: np.ndarray) -> list[int]:
    """Moves each cut back to the start of the request it would split (forward if that empties a range)."""
    n = len(request_ids)
    starts = np.flatnonzero(np.diff(request_ids) != 0) + 1 if n else np.zeros(0, np.int64)
    starts = np.concatenate([[0], starts, [n]])  # every run of one request starts at one of these
    out: list[int] = []
    for cut in cuts:
        back = int(starts[np.searchsorted(starts, cut, side="right") - 1])
        if back > (out[-1] if out else 0):
            out.append(back)
            continue
        forward = int(starts[np.searchsorted(starts, cut, side="left")])
        if (out[-1] if out else 0) < forward < n:
            out.append(forward)
    return out


def plan_partitions(files: list[Path], rows_per_partition: int) -> list[Partition]:
    """Cuts the input files into partitions, each holding whole requests (see the module docstring).

    Reads the footers and the ``request_id`` column only.
    """
    ranges: list[tuple[str, int, int]] = []
    request_parts = []
    for f in files:
        meta = pq.read_metadata(f)
        request_ids = pq.read_table(f, columns=["request_id"])["request_id"].to_numpy()
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        bounds = [0, *_aligned(_cuts(groups, rows_per_partition), request_ids), len(request_ids)]
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            if stop > start or len(request_ids) == 0:
                request_parts.append(
                    pl.DataFrame({"request_id": request_ids[start:stop]}).with_columns(
                        pl.lit(len(ranges), pl.Int64).alias(_PARTITION)
                    )
                )
                ranges.append((str(f), start, stop))
    counts = (
        pl.concat(request_parts)
        .group_by("request_id", _PARTITION)
        .len()
        .with_columns(pl.col(_PARTITION).min().over("request_id").alias("owner"))
    )
    rows_in = dict.fromkeys(range(len(ranges)), 0)
    for part, rows in counts.group_by("owner").agg(pl.col("len").sum()).iter_rows():
        rows_in[part] = int(rows)
    moved = counts.filter(pl.col(_PARTITION) != pl.col("owner"))
    drops: dict[int, tuple[int, ...]] = {}
    pulls: dict[int, list[tuple[str, int, int, tuple[int, ...]]]] = {}
    if moved.height:
        log.warning(
            "%d request(s) lie in several partitions (%d rows); each is scored by its first partition, "
            "which reads its other rows too (sort the input by request_id to avoid the extra reads)",
            moved["request_id"].n_unique(),
            int(moved["len"].sum()),
        )
        for (part,), group in moved.group_by(_PARTITION, maintain_order=True):
            drops[int(part)] = tuple(sorted(int(r) for r in group["request_id"]))
            for (owner,), sub in group.group_by("owner", maintain_order=True):
                file, start, stop = ranges[int(part)]
                pulls.setdefault(int(owner), []).append(
                    (file, start, stop, tuple(sorted(int(r) for r in sub["request_id"])))
                )
    return [
        Partition(i, file, start, stop, rows_in[i], drops.get(i, ()), tuple(pulls.get(i, ())))
        for i, (file, start, stop) in enumerate(ranges)
    ]


def read_range(file: str, start: int, stop: int, columns: Sequence[str]) -> pl.DataFrame:
    """Rows ``[start, stop)`` of a Parquet file, reading only the row groups that hold them."""
    pf = pq.ParquetFile(file)
    meta = pf.metadata
    offsets = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    groups = [i for i in range(meta.num_row_groups) if offsets[i] < stop and offsets[i + 1] > start]
    if not groups:
        return pl.from_arrow(pf.schema_arrow.empty_table().select(list(columns)))
    table = pf.read_row_groups(groups, columns=list(columns))
    return pl.from_arrow(table.slice(start - int(offsets[groups[0]]), stop - start))


def read_partition(part: Partition) -> pl.DataFrame:
    """The candidate rows a partition scores (its range, less dropped requests, plus pulled rows)."""
    rows = read_range(part.file, part.start, part.stop, _READ_COLUMNS)
    if part.drop_requests:
        rows = rows.filter(~pl.col("request_id").is_in(list(part.drop_requests)))
    pulled = [
        read_range(file, start, stop, _READ_COLUMNS).filter(pl.col("request_id").is_in(list(ids)))
        for file, start, stop, ids in part.pull
    ]
    return pl.concat([rows, *pulled]) if pulled else rows


# ------------------------------------------------------------------------------------------ ranking


def score_expr(formula: str, alpha: float) -> pl.Expr:
    """The ranking score from the task probabilities.

    ``product``: ``p_click * p_purchase ** alpha`` (alpha = 0 ranks by clicks, large alpha by purchases);
    ``click``: ``p_click``; ``purchase``: ``p_purchase`` (the model's p(click and purchase)).
    """
    if formula == "product":
        return (pl.col("p_click") * pl.col("p_purchase").pow(alpha)).alias("score")
    if formula == "click":
        return pl.col("p_click").alias("score")
    if formula == "purchase":
        return pl.col("p_purchase").alias("score")
    raise ValueError(f"score_formula: expected one of {list(FORMULAS)}, got {formula!r}")


def rank_requests(scored: pl.DataFrame, formula: str, alpha: float, top_k: int | None) -> pl.DataFrame:
    """Adds ``score`` and ``rank`` within ``request_id``, and keeps the top K of each request.

    The rank is a permutation of 1..n within each request: by score, highest first (a NaN score last),
    ties broken by ``impression_id``. Rows are returned sorted by ``(request_id, rank)``.

    Args:
        scored: (N, ...) rows with ``request_id``, ``impression_id`` and the ``p_*`` columns.
        formula: see :func:`score_expr`.
        alpha: see :func:`score_expr`.
        top_k: keep the rows of rank <= K (None: all).
    """
    ranked = (
        scored.with_columns(score_expr(formula, alpha).fill_nan(None))
        .sort(["request_id", "score", "impression_id"], descending=[False, True, False], nulls_last=True)
        .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over("request_id").alias("rank"))
    )
    return ranked.filter(pl.col("rank") <= top_k) if top_k is not None else ranked


def expected_rows_out(request_ids: pl.Series, top_k: int | None) -> int:
    """Rows a partition must write: all its rows, or ``min(n, K)`` per request."""
    if top_k is None:
        return len(request_ids)
    sizes = request_ids.value_counts()["count"]
    return int(sizes.clip(upper_bound=top_k).sum())


# ------------------------------------------------------------------------------------- ray stages


def _package_files(directory: Path) -> dict[str, bytes]:
    """The package folder as bytes, so that actors on any node can rebuild it (no shared disk needed)."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _materialize(files: dict[str, bytes]) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="recsys-package-"))
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


class ScoreStage:
    """Ray Data stage: partition specs in; per partition, key columns and one ``p_<task>`` per task out.

    Each actor does all the work of a partition: it reads the rows, runs the training feature code
    (:func:`recsys.package.model_ready`) and the model (:func:`recsys.package.score_ready`, ``batch_size``
    rows per call). The model is rebuilt once per actor from the package bytes in the object store; the
    users, items and click-history tables are fetched once per actor. The feature rows never leave the
    actor: only the narrow scored rows go to the driver.

    One stage rather than a feature stage feeding a model stage: on a small machine the two stages'
    actors fought over the cores and every feature block was copied through the object store; measured
    at 1M rows on 2 cores, end to end went from 51% of the bare forward (two stages) to the figure in
    README (one stage, one actor per core, one thread each).
    """

    def __init__(self, shared: dict[str, Any], batch_size: int, threads: int) -> None:
        import ray
        import torch

        from features.spec import FeatureSpec

        torch.set_num_threads(threads)
        package_dir = _materialize(ray.get(shared["package"]))
        self.package = load_package(package_dir)
        self.spec = FeatureSpec.load(package_dir / "spec.json")
        shutil.rmtree(package_dir, ignore_errors=True)
        self.batch_size = batch_size
        self.columns = {t.name: output_column(t) for t in self.package.model_config.tasks}
        self.users = pl.from_arrow(ray.get(shared["users"]))
        self.items = pl.from_arrow(ray.get(shared["items"]))
        self.history = pl.from_arrow(ray.get(shared["history"]))

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        """Yields (rows, keys + ``p_*`` + ``__partition``) Arrow tables for each partition of the batch."""
        for raw in batch["partition"]:
            part = Partition(**_partition_from_json(json.loads(raw)))
            rows = read_partition(part)
            # A user's history states depend on that user's clicks only: the rest need not be derived.
            history = self.history.filter(pl.col("user_id").is_in(rows["user_id"].drop_nulls().unique()))
            tables = Tables(rows.lazy(), self.users.lazy(), self.items.lazy(), history.lazy())
            ready = model_ready(self.spec, tables).to_arrow()
            del rows, history
            scores = score_ready(self.package, ready, self.batch_size)
            out = ready.select(list(KEY_COLUMNS)).append_column(
                _PARTITION, pa.array(np.full(ready.num_rows, part.index, np.int64))
            )
            for task, column in self.columns.items():
                out = out.append_column(column, pa.array(scores[task], pa.float64()))
            yield out


def _partition_from_json(data: dict[str, Any]) -> dict[str, Any]:
    data["drop_requests"] = tuple(data["drop_requests"])
    data["pull"] = tuple((f, s, e, tuple(ids)) for f, s, e, ids in data["pull"])
    return data


# ----------------------------------------------------------------------------------------- manifest


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``path`` under a temporary name in its folder, flushed to disk, then renames it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Rewrites the manifest atomically."""
    _atomic_write_bytes(path, json.dumps(manifest, indent=1, sort_keys=True).encode())


def _parquet_rows(path: Path) -> int | None:
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowInvalid):
        return None


def _check_previous(previous: dict[str, Any], fresh: dict[str, Any], manifest: Path) -> None:
    """Refuses to resume a manifest of another run (model version, input or settings)."""
    problems = []
    if previous.get("model", {}).get("pinned_uri") != fresh["model"]["pinned_uri"]:
        problems.append(
            f"model: the output was scored with {previous.get('model', {}).get('pinned_uri')!r}, "
            f"this run resolves {fresh['model']['uri']!r} to {fresh['model']['pinned_uri']!r}"
        )
    if previous.get("input_fingerprint") != fresh["input_fingerprint"]:
        problems.append(
            f"input fingerprint: {previous.get('input_fingerprint')!r} in the manifest, "
            f"{fresh['input_fingerprint']!r} now (the input, users, items or history changed)"
        )
    if previous.get("settings") != fresh["settings"]:
        problems.append(f"settings: {previous.get('settings')} in the manifest, {fresh['settings']} now")
    if previous.get("format") != MANIFEST_FORMAT:
        problems.append(f"format: {previous.get('format')!r}, expected {MANIFEST_FORMAT}")
    if problems:
        raise ValueError(
            f"{manifest}: belongs to another scoring run; "
            + "; ".join(problems)
            + ". Pass --overwrite to rescore everything, or rerun with the recorded model and input."
        )


def _finished(out: Path, manifest: dict[str, Any]) -> set[int]:
    """Partitions the manifest lists as done whose file holds the recorded rows."""
    done = set()
    for key, entry in manifest.get("partitions", {}).items():
        if entry.get("status") == "done" and _parquet_rows(out / entry["file"]) == entry.get("rows_out"):
            done.add(int(key))
    return done


def _clear(out: Path) -> None:
    for path in [*out.glob("part-*.parquet"), *out.glob("*.tmp"), *out.glob(".*.tmp"), out / MANIFEST]:
        path.unlink(missing_ok=True)


# -------------------------------------------------------------------------------------------- ray


def init_ray(address: str | None = None, actors: int = 2) -> bool:
    """Connects to a Ray cluster (``address`` or ``RAY_ADDRESS``) or starts a local one on 127.0.0.1.

    Args:
        address: the cluster; None for ``RAY_ADDRESS``, else a new local Ray.
        actors: CPUs the job's actors take at once, for the local Ray's CPU count.

    Returns:
        True if this call started or connected Ray (the caller shuts it down), False if it was running.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, include_dashboard=False)
        return True
    # Headroom: the stages' actors take one CPU each, and Ray Data's own tasks need a free CPU besides,
    # or they wait forever on a 2-core machine (as in recsys.train.loop).
    ray.init(
        num_cpus=max(os.cpu_count() or 1, actors) + 2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",  # local only: nothing listens on other interfaces
        # A bounded object store bounds the feature blocks in flight, and so the memory.
        object_store_memory=2 * 1024**3,
        logging_level=logging.WARNING,
    )
    return True


# ------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class _Model:
    uri: str
    pinned_uri: str
    name: str
    version: str | None
    run_id: str | None
    package_dir: Path

    @property
    def column_value(self) -> str:
        """The ``model_version`` column: the registry version, else the pinned URI."""
        return self.version if self.version is not None else self.pinned_uri


def _resolve(config: ScoreConfig, tracker: Any, workdir: Path) -> _Model:
    from recsys.tracking import download_package, resolve_model

    if Path(config.model).is_dir():
        path = Path(config.model).resolve()
        package = load_package(path)  # fails early and clearly for a folder that is not a package
        name = package.metadata.get("extra", {}).get("registered_model") or "package"
        return _Model(config.model, f"file:{path}", str(name), None, None, path)
    resolved = resolve_model(tracker, config.model)
    package_dir = download_package(tracker, resolved, workdir / "model")
    name = resolved.name or resolved.pinned_uri.split("/")[1]
    return _Model(config.model, resolved.pinned_uri, name, resolved.version, resolved.run_id, package_dir)


# -------------------------------------------------------------------------------------------- run


def score_summary(files: list[Path], columns: Sequence[str]) -> dict[str, float]:
    """Mean and quantiles (1, 10, 50, 90, 99 %) of each score column over the output files."""
    if not files:
        return {}
    exprs = []
    for c in columns:
        exprs.append(pl.col(c).mean().alias(f"{c}/mean"))
        for q in (0.01, 0.1, 0.5, 0.9, 0.99):
            exprs.append(pl.col(c).quantile(q).alias(f"{c}/p{round(q * 100):02d}"))
    row = pl.scan_parquet([str(f) for f in files]).select(exprs).collect().row(0, named=True)
    return {k: float(v) for k, v in row.items() if v is not None}


def run_scoring(config: ScoreConfig) -> ScoreResult:
    """Scores candidate rows with a model and writes ranked Parquet (see the module docstring).

    Args:
        config: the run.

    Returns:
        What was done; :attr:`ScoreResult.ok` is False when a count differs or partitions are left.

    Raises:
        ContractError: an input table breaks the contract (nothing is written).
        FileNotFoundError: an input is missing.
        ValueError: a bad model URI or setting, or an output folder of another run (without
            ``overwrite``).
        TrackingError: the model cannot be resolved (its store is unreachable).
    """
    from recsys.tracking import Tracker

    started = time.perf_counter()
    files = input_files(config.input)
    users_path = _beside(files, config.users, "users")
    items_path = _beside(files, config.items, "items")
    has_labels = _validate_input(files)
    users = _validated_table(_table_files(users_path), "users")
    items = _validated_table(_table_files(items_path), "items")
    history, history_source = _history(config, files, has_labels)
    print(f"history features from {history_source}")

    out = Path(config.output).resolve()
    with tempfile.TemporaryDirectory(prefix="recsys-score-") as workdir:
        # The registry is read here, once: the alias moving later does not change this run.
        tracker = Tracker(config.tracking_uri, "scoring")
        model = _resolve(config, tracker, Path(workdir))
        package = load_package(model.package_dir)
        tasks = [output_column(t) for t in package.model_config.tasks]
        needed = {"product": ("p_click", "p_purchase"), "click": ("p_click",), "purchase": ("p_purchase",)}
        missing = [c for c in needed[config.score_formula] if c not in tasks]
        if missing:
            raise ValueError(
                f"score_formula: {config.score_formula!r} needs {missing}, the model outputs {tasks}"
            )
        package_files = _package_files(model.package_dir)

        fingerprint_groups = {
            "input": files,
            "users": _table_files(users_path),
            "items": _table_files(items_path),
        }
        if config.history:
            fingerprint_groups["history"] = _table_files(Path(config.history))
        fingerprint = _fingerprint(fingerprint_groups)
        partitions = plan_partitions(files, config.rows_per_partition)
        total_rows = sum(pq.read_metadata(f).num_rows for f in files)
        fresh = {
            "format": MANIFEST_FORMAT,
            "model": {
                "uri": model.uri,
                "pinned_uri": model.pinned_uri,
                "name": model.name,
                "version": model.version,
                "run_id": model.run_id,
                "spec_hash": package.spec.content_hash,
            },
            "model_version": model.column_value,
            "input_fingerprint": fingerprint,
            "inputs": {k: [str(f) for f in v] for k, v in fingerprint_groups.items()},
            "history_source": history_source,
            "settings": config.settings(),
            "rows_in": total_rows,
            "partitions": {},
            "complete": False,
        }

        out.mkdir(parents=True, exist_ok=True)
        manifest_path = out / MANIFEST
        previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        if config.overwrite:
            _clear(out)
            previous = None
        elif previous is None and any(out.glob("part-*.parquet")):
            raise ValueError(
                f"output: {out} holds part files but no {MANIFEST}; pass --overwrite to replace them"
            )
        if previous is not None:
            _check_previous(previous, fresh, manifest_path)
            fresh["partitions"] = previous.get("partitions", {})
        for path in [*out.glob("*.tmp"), *out.glob(".*.tmp")]:
            path.unlink(missing_ok=True)  # left by a killed run
        done = _finished(out, fresh)
        fresh["partitions"] = {k: v for k, v in fresh["partitions"].items() if int(k) in done}
        write_manifest(manifest_path, fresh)
        todo = [p for p in partitions if p.index not in done]

        tracker = Tracker(config.tracking_uri, f"{model.name}-scoring")
        run_id = tracker.start_run(
            run_name=f"score-{model.name}-{model.column_value}",
            tags={
                "model_uri": model.uri,
                "pinned_uri": model.pinned_uri,
                "model_version": model.column_value,
            },
        )
        try:
            tables = {"users": users, "items": items, "history": history}
            scored, scoring_seconds, rows_scored = _score_partitions(
                config, model, package_files, tables, todo, len(done), fresh, out
            )
            result = _finish(config, model, fresh, partitions, out, total_rows, started)
            result.partitions_scored, result.partitions_skipped = scored, len(done)
            result.rows_per_s = rows_scored / scoring_seconds if scoring_seconds > 0 else 0.0
            result.input_fingerprint, result.run_id = fingerprint, run_id
            _log_run(tracker, config, result, fresh, scoring_seconds, rows_scored, history_source)
        except BaseException:
            tracker.end_run("FAILED")
            raise
        tracker.end_run("FINISHED" if result.ok else "FAILED")
    return result


def _score_partitions(
    config: ScoreConfig,
    model: _Model,
    package_files: dict[str, bytes],
    tables: dict[str, pl.DataFrame],
    todo: list[Partition],
    skipped: int,
    manifest: dict[str, Any],
    out: Path,
) -> tuple[int, float, int]:
    """Scores the partitions of ``todo``; ranks and writes each one as soon as all its rows are scored.

    Rows of several partitions arrive interleaved (the actors run concurrently); the driver buffers the
    narrow scored rows (keys and probabilities) per partition until the partition's ``rows_in`` are there.

    Returns:
        Partitions written, seconds, rows scored.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    limit = config.max_partitions if config.max_partitions is not None else len(todo)
    total = skipped + len(todo)
    bar = tqdm(total=total, initial=skipped, unit="part", desc="score", disable=not config.progress)
    written, rows_scored = 0, 0
    pending = {p.index: p for p in todo}
    buffers: dict[int, list[pl.DataFrame]] = {}
    counts: dict[int, int] = {}

    def finish(part: Partition) -> None:
        nonlocal written, rows_scored
        frames = buffers.pop(part.index, [])
        n_scored = counts.pop(part.index, 0)
        _write_partition(config, model, part, pl.concat(frames) if frames else None, n_scored, manifest, out)
        del pending[part.index]
        written += 1
        rows_scored += n_scored
        bar.update(1)

    for part in [p for p in todo if p.rows_in == 0]:  # nothing reaches the driver for these
        if written < limit:
            finish(part)
    work = [p for p in todo if p.rows_in > 0]
    if work and written < limit:
        started_ray = init_ray(
            config.address, (config.concurrency or os.cpu_count() or 1) * config.threads_per_actor
        )
        try:
            frames = _scored_frames(config, package_files, tables, work, _actors(config))
            for frame in frames:
                for (index,), rows in frame.partition_by(_PARTITION, as_dict=True).items():
                    part = pending[int(index)]
                    buffers.setdefault(part.index, []).append(rows.drop(_PARTITION))
                    counts[part.index] = counts.get(part.index, 0) + rows.height
                    if counts[part.index] >= part.rows_in:
                        finish(part)
                if written >= limit:
                    break  # an interrupted run (max_partitions): the rest stays to do
            else:
                for index in sorted(counts):  # rows went missing: written as they are, flagged by the checks
                    finish(pending[index])
            frames.close()  # stops the dataset's execution when the loop stopped early
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    bar.close()
    return written, time.perf_counter() - started, rows_scored


def _scored_frames(
    config: ScoreConfig,
    package_files: dict[str, bytes],
    tables: dict[str, pl.DataFrame],
    work: list[Partition],
    actors: int,
) -> Iterator[pl.DataFrame]:
    """The Ray Data pipeline: partitions -> :class:`ScoreStage` -> scored rows.

    Yields:
        (B, keys + ``p_*`` + ``__partition``) frames, in no particular order.
    """
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one bar per operator floods the log; ours is per partition
    context.print_on_execution_start = False
    shared = {"package": ray.put(package_files)} | {k: ray.put(v.to_arrow()) for k, v in tables.items()}
    specs = [{"partition": json.dumps(asdict(p))} for p in work]
    threads = config.threads_per_actor
    dataset = ray.data.from_items(specs, override_num_blocks=len(specs)).map_batches(
        ScoreStage,
        fn_constructor_kwargs={"shared": shared, "batch_size": config.batch_size, "threads": threads},
        batch_size=1,  # one partition per call
        batch_format="numpy",
        # One partition per actor at a time: a partition queued behind a busy actor while another is
        # idle (or still starting) would leave a core idle for a whole partition.
        compute=ray.data.ActorPoolStrategy(size=min(actors, len(specs)), max_tasks_in_flight_per_actor=1),
        num_cpus=threads,
        # Polars sizes its thread pool when imported: set before the actor's process starts.
        runtime_env={
            "env_vars": {
                "POLARS_MAX_THREADS": str(threads),
                "OMP_NUM_THREADS": str(threads),
                **model_process_env(),
            }
        },
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        yield pl.from_arrow(batch)


def _actors(config: ScoreConfig) -> int:
    """Scoring actors: as configured, else one per CPU of this machine (local Ray) or of the cluster."""
    import ray

    if config.concurrency is not None:
        return config.concurrency
    if not (config.address or os.environ.get("RAY_ADDRESS")):
        return max(1, (os.cpu_count() or 1) // config.threads_per_actor)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, (cpus - 1) // config.threads_per_actor)  # one CPU left to Ray Data's own tasks


def _write_partition(
    config: ScoreConfig,
    model: _Model,
    part: Partition,
    scored: pl.DataFrame | None,
    n_scored: int,
    manifest: dict[str, Any],
    out: Path,
) -> None:
    """Ranks a scored partition, writes its file (temporary name, then rename) and records it."""
    t0 = time.perf_counter()
    if scored is None:
        columns = {c: pl.Int64 for c in KEY_COLUMNS} | {c: pl.Float64 for c in ("p_click", "p_purchase")}
        scored = pl.DataFrame(schema=columns)
    ranked = rank_requests(scored, config.score_formula, config.alpha, config.top_k)
    ranked = ranked.select(
        *KEY_COLUMNS,
        *[c for c in scored.columns if c not in KEY_COLUMNS],
        "score",
        "rank",
        pl.lit(model.column_value, pl.String).alias("model_version"),
    )
    path = out / part.name
    tmp = out / f"{part.name}.tmp"
    ranked.write_parquet(tmp, compression="zstd", compression_level=1, statistics=True)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    manifest["partitions"][str(part.index)] = {
        "file": part.name,
        "input_file": part.file,
        "start": part.start,
        "stop": part.stop,
        "rows_in": part.rows_in,
        "rows_scored": n_scored,
        "rows_out": ranked.height,
        "expected_out": expected_rows_out(scored["request_id"], config.top_k),
        "moved_requests": {"dropped": len(part.drop_requests), "pulled": sum(len(p[3]) for p in part.pull)},
        "model_version": model.column_value,
        "status": "done",
        "write_seconds": round(time.perf_counter() - t0, 3),
    }
    write_manifest(out / MANIFEST, manifest)


def _finish(
    config: ScoreConfig,
    model: _Model,
    manifest: dict[str, Any],
    partitions: list[Partition],
    out: Path,
    total_rows: int,
    started: float,
) -> ScoreResult:
    """Checks every count against the files on disk and marks the manifest complete if all agree."""
    problems: list[str] = []
    entries = manifest["partitions"]
    missing = [p.index for p in partitions if str(p.index) not in entries]
    if sum(p.rows_in for p in partitions) != total_rows:
        problems.append(
            f"plan: partitions hold {sum(p.rows_in for p in partitions)} rows, the input {total_rows}"
        )
    rows_out = expected = rows_in = 0
    for _, entry in sorted(entries.items(), key=lambda kv: int(kv[0])):
        on_disk = _parquet_rows(out / entry["file"])
        if entry["rows_scored"] != entry["rows_in"]:
            problems.append(f"{entry['file']}: {entry['rows_in']} rows in, {entry['rows_scored']} scored")
        if entry["rows_out"] != entry["expected_out"]:
            problems.append(
                f"{entry['file']}: {entry['rows_out']} rows out, {entry['expected_out']} expected"
            )
        if on_disk != entry["rows_out"]:
            problems.append(f"{entry['file']}: {on_disk} rows on disk, {entry['rows_out']} in the manifest")
        rows_in += entry["rows_in"]
        rows_out += entry["rows_out"]
        expected += entry["expected_out"]
    complete = not missing
    if complete and rows_in != total_rows:
        problems.append(f"rows: {rows_in} scored in all, the input has {total_rows}")
    manifest["complete"] = complete and not problems
    manifest["rows_out"] = rows_out
    manifest["expected_out"] = expected
    manifest["problems"] = problems
    write_manifest(out / MANIFEST, manifest)
    files = [out / entries[k]["file"] for k in sorted(entries, key=int)]
    columns = [c for c in ("p_click", "p_purchase", "score")]
    seconds = time.perf_counter() - started
    return ScoreResult(
        output=out,
        manifest=out / MANIFEST,
        model_uri=model.uri,
        pinned_uri=model.pinned_uri,
        model_version=model.column_value,
        input_fingerprint=manifest["input_fingerprint"],
        partitions=len(partitions),
        partitions_scored=0,
        partitions_skipped=0,
        rows_in=total_rows,
        rows_out=rows_out,
        expected_out=expected,
        seconds=seconds,
        rows_per_s=0.0,
        complete=complete,
        problems=problems,
        summary=score_summary(files, columns) if complete else {},
    )


def _log_run(
    tracker: Any,
    config: ScoreConfig,
    result: ScoreResult,
    manifest: dict[str, Any],
    scoring_seconds: float,
    rows_scored: int,
    history_source: str,
) -> None:
    """Logs the run to MLflow from the driver (the one place that talks to MLflow here)."""
    tracker.log_params(
        {
            "model": manifest["model"],
            "model_version": result.model_version,
            "input": config.input,
            "output": str(result.output),
            "input_fingerprint": result.input_fingerprint,
            "history": history_source,
            "settings": config.settings(),
            "batch_size": config.batch_size,
            "concurrency": config.concurrency,
        }
    )
    metrics = {
        "rows_in": result.rows_in,
        "rows_out": result.rows_out,
        "expected_out": result.expected_out,
        "rows_scored_this_run": rows_scored,
        "partitions": result.partitions,
        "partitions_scored": result.partitions_scored,
        "partitions_skipped": result.partitions_skipped,
        "duration_s": result.seconds,
        "scoring_s": scoring_seconds,
        "rows_per_s": result.rows_per_s,
        "complete": float(result.complete),
        "problems": len(result.problems),
    }
    metrics.update({f"score/{k}": v for k, v in result.summary.items()})
    tracker.log_metrics(metrics)
    tracker.log_dict(manifest, "scoring/manifest.json")


# --------------------------------------------------------------------------------------- helpers


def top_of_request(output: str | Path, request_id: int | None = None, k: int = 5) -> pl.DataFrame:
    """The best ``k`` rows of one request of a scoring output (the first request when None)."""
    lf = pl.scan_parquet(str(Path(output) / "part-*.parquet"))
    if request_id is None:
        request_id = lf.select(pl.col("request_id").min()).collect().item()
    return lf.filter(pl.col("request_id") == request_id, pl.col("rank") <= k).sort("rank").collect()


@dataclass(frozen=True)
class CandidateSet:
    """A generated candidate set: the scoring input and the tables beside it.

    Attributes:
        impressions: the candidates (contract impressions columns, no labels).
        users: the users table.
        items: the items table.
        history: the same impressions with their labels, as the click history.
        rows: candidate rows.
    """

    impressions: Path
    users: Path
    items: Path
    history: Path
    rows: int


def generate_candidates(out: str | Path, n_impressions: int, seed: int, **kwargs: Any) -> CandidateSet:
    """Generates a candidate set with :func:`synth.generate.generate`: labels dropped, kept as history.

    Writes ``OUT/impressions.parquet`` (no labels), ``OUT/users.parquet``, ``OUT/items.parquet`` and
    ``OUT/history.parquet`` (the labelled impressions: a row's history is the clicks before its ``ts``).

    Args:
        out: the folder.
        n_impressions: candidate rows.
        seed: the generator's seed.
        **kwargs: passed to :func:`synth.generate.generate` (``chunk_rows``, ``progress``, ...).
    """
    from synth.generate import generate

    out = Path(out)
    world = out / ".world"
    generate(world, n_impressions, seed, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    os.replace(world / "impressions.parquet", out / "history.parquet")
    os.replace(world / "users.parquet", out / "users.parquet")
    os.replace(world / "items.parquet", out / "items.parquet")
    shutil.rmtree(world, ignore_errors=True)
    # Row groups kept as generated (one per day or chunk); the labels are dropped.
    source = pq.ParquetFile(out / "history.parquet")
    tmp = out / ".impressions.parquet.tmp"
    schema = source.schema_arrow
    keep = [name for name in schema.names if name not in LABELS]
    with pq.ParquetWriter(tmp, pa.schema([f for f in schema if f.name not in LABELS])) as writer:
        for i in range(source.num_row_groups):
            writer.write_table(source.read_row_group(i, columns=keep))
    os.replace(tmp, out / "impressions.parquet")
    return CandidateSet(
        out / "impressions.parquet",
        out / "users.parquet",
        out / "items.parquet",
        out / "history.parquet",
        source.metadata.num_rows,
    )
