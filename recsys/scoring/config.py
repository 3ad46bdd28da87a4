"""What a scoring run is asked to do (:class:`ScoreConfig`) and what it did (:class:`ScoreResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from features.checks import check_int, invalid, is_number
from recsys.package import DEFAULT_BATCH_SIZE
from recsys.precision import EMBEDDING_DTYPES, PRECISIONS

PRODUCT = "product"  # the one score formula that is not a task's name (see recsys.scoring.ranking)


@dataclass(frozen=True)
class ScoreSettings:
    """What decides the output besides the model and the input: a rerun must use the same.

    Attributes:
        score_formula: see :attr:`ScoreConfig.score_formula`.
        alpha: see :attr:`ScoreConfig.alpha`.
        top_k: see :attr:`ScoreConfig.top_k`.
        rows_per_partition: see :attr:`ScoreConfig.rows_per_partition`.
        embedding_dtype: the tables' precision the run scores with (the package's when not asked).
        compute_dtype: see :attr:`ScoreConfig.compute_dtype`.
    """

    score_formula: str
    alpha: float
    top_k: int | None
    rows_per_partition: int
    # Defaults: a manifest written before precision was a setting scored in fp32.
    embedding_dtype: str = "fp32"
    compute_dtype: str = "fp32"


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
            it has them, else no history (see :mod:`recsys.scoring.job`).
        top_k: keep the best K rows per request (None: all rows).
        score_formula: ``product`` (the first task's probability times the product of the others' to the
            power ``alpha``: ``p_click * p_purchase ** alpha`` for the demo model), or the name of one of
            the model's tasks (its output alone). Checked against the model's tasks once it is resolved.
        alpha: the exponent of the later tasks in ``product`` (0 ranks by the first task alone).
        batch_size: rows per model call (:data:`recsys.package.DEFAULT_BATCH_SIZE`).
        concurrency: scoring actors (each loads the model and the users, items and history tables once,
            and scores whole partitions); None: one per CPU (of this machine, or of the cluster).
        threads_per_actor: torch and polars threads of each actor.
        use_gpu: the actors share the cluster's GPUs (each asks Ray for an equal share of them) and run the
            model there; the features stay on the CPU. An error on a cluster without a GPU.
        rows_per_partition: most rows per partition (one output file each).
        embedding_dtype: the tables' precision, ``fp32``, ``fp16``, ``int8`` or ``int4``: fp32 tables are
            row-wise quantized as each actor loads the model (:func:`recsys.precision.quantize_embeddings`);
            None scores with the package's own tables (a quantized package scores in its precision only).
        compute_dtype: the dense layers' precision, ``fp32``, ``bf16`` (autocast) or ``auto`` (bf16 where
            the CPU or GPU has bf16 units, else fp32).
        tracking_uri: the MLflow store of the registry and of the scoring run's log (default
            :func:`recsys.tracking.default_tracking_uri`).
        experiment: the MLflow experiment to log the scoring run in (default ``<model name>-scoring``).
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
    score_formula: str = PRODUCT
    alpha: float = 1.0
    batch_size: int = DEFAULT_BATCH_SIZE
    concurrency: int | None = None
    threads_per_actor: int = 1
    use_gpu: bool = False
    rows_per_partition: int = 250_000
    tracking_uri: str | None = None
    experiment: str | None = None
    address: str | None = None
    overwrite: bool = False
    max_partitions: int | None = None
    progress: bool = True
    embedding_dtype: str | None = None
    compute_dtype: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("model", "input", "output", "score_formula"):
            _check_text(name, getattr(self, name))
        for name in ("experiment", "address", "tracking_uri", "users", "items", "history"):
            if getattr(self, name) is not None:
                _check_text(name, getattr(self, name))
        for name in ("batch_size", "threads_per_actor", "rows_per_partition"):
            check_int("score", name, getattr(self, name))
        for name in ("concurrency", "top_k", "max_partitions"):
            if getattr(self, name) is not None:
                check_int("score", name, getattr(self, name))
        if not is_number(self.alpha):
            raise invalid("score", "alpha", self.alpha, "expected a finite number")
        if not isinstance(self.use_gpu, bool):
            raise invalid("score", "use_gpu", self.use_gpu, "expected true or false")
        tables = self.embedding_dtype
        if tables is not None and tables not in EMBEDDING_DTYPES:
            raise invalid("score", "embedding_dtype", tables, f"expected one of {list(EMBEDDING_DTYPES)}")
        if self.compute_dtype not in PRECISIONS:
            raise invalid("score", "compute_dtype", self.compute_dtype, f"expected one of {list(PRECISIONS)}")
        if self.use_gpu and tables not in (None, "fp32"):
            raise invalid(
                "score", "embedding_dtype", tables, "quantized tables score on the CPU only (use_gpu)"
            )

    def settings(self) -> ScoreSettings:
        """What decides the output besides the model and the input: a rerun must use the same."""
        return ScoreSettings(
            self.score_formula,
            float(self.alpha),
            self.top_k,
            self.rows_per_partition,
            self.embedding_dtype or "fp32",
            self.compute_dtype,
        )


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise invalid("score", name, value, "expected a non-empty string")


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
        run_id: the MLflow run (None when the run is not logged).
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
