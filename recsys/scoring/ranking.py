"""The ranking score over the model's own tasks, the rank within each request, and reading results back.

A score formula is ``product`` or the name of one of the model's tasks (:class:`recsys.config.TaskConfig`):

* ``product``: the first task's probability times the product of the later tasks' probabilities to the
  power ``alpha``. For the demo model (tasks ``click``, then ``purchase`` given ``click``) that is
  ``p_click * p_purchase ** alpha``: alpha = 0 ranks by clicks, a large alpha by purchases. Every task
  must be binary (a probability).
* a task's name: that task's output column alone (``p_<task>``, or ``pred_<task>`` for regression).

Example:
    >>> from recsys.config import TaskConfig
    >>> tasks = [TaskConfig("click"), TaskConfig("purchase", given="click")]
    >>> ScoreFormula.for_tasks("product", 0.5, tasks).columns
    ('p_click', 'p_purchase')
    >>> ScoreFormula.for_tasks("purchase", 1.0, tasks).columns
    ('p_purchase',)
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recsys.config import TaskConfig
from recsys.package import output_column
from recsys.scoring.config import PRODUCT


@dataclass(frozen=True)
class ScoreFormula:
    """The ranking score of a run, over the output columns of the model's tasks.

    Attributes:
        name: ``product``, or the name of the task ranked by.
        columns: the output columns it reads, in the model's task order.
        alpha: in ``product``, the exponent of the product of the columns after the first.
    """

    name: str
    columns: tuple[str, ...]
    alpha: float = 1.0

    @classmethod
    def for_tasks(cls, name: str, alpha: float, tasks: Sequence[TaskConfig]) -> ScoreFormula:
        """The formula ``name`` over ``tasks`` (a model's :attr:`recsys.config.ModelConfig.tasks`).

        Raises:
            ValueError: ``name`` is neither ``product`` nor a task's name, or ``product`` meets a task that
                is not binary; the message names the formula and the model's tasks.
        """
        names = [t.name for t in tasks]
        if name == PRODUCT:
            not_binary = [f"{t.name} ({t.kind})" for t in tasks if t.kind != "binary"]
            if not_binary:
                raise ValueError(
                    f"score_formula: {PRODUCT!r} multiplies probabilities, but the model's tasks {names} "
                    f"include {not_binary}; rank by one task's name instead"
                )
            return cls(PRODUCT, tuple(output_column(t) for t in tasks), float(alpha))
        for task in tasks:
            if task.name == name:
                return cls(name, (output_column(task),), float(alpha))
        raise ValueError(
            f"score_formula: expected one of {[PRODUCT, *names]} ({PRODUCT!r} or one of the model's tasks "
            f"{names}), got {name!r}"
        )

    def expr(self) -> pl.Expr:
        """The ``score`` column."""
        first, *later = (pl.col(c) for c in self.columns)
        if not later:
            return first.alias("score")
        return (first * functools.reduce(operator.mul, later).pow(self.alpha)).alias("score")


def rank_requests(scored: pl.DataFrame, formula: ScoreFormula, top_k: int | None) -> pl.DataFrame:
    """Adds ``score`` and ``rank`` within ``request_id``, and keeps the top K of each request.

    The rank is a permutation of 1..n within each request: by score, highest first (a NaN score last),
    ties broken by ``impression_id``. Rows are returned sorted by ``(request_id, rank)``.

    Args:
        scored: (N, ...) rows with ``request_id``, ``impression_id`` and the formula's columns.
        formula: the ranking score.
        top_k: keep the rows of rank <= K (None: all).
    """
    ranked = (
        scored.with_columns(formula.expr().fill_nan(None))
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


def top_of_request(output: str | Path, request_id: int | None = None, k: int = 5) -> pl.DataFrame:
    """The best ``k`` rows of one request of a scoring output (the first request when None)."""
    lf = pl.scan_parquet(str(Path(output) / "part-*.parquet"))
    if request_id is None:
        request_id = lf.select(pl.col("request_id").min()).collect().item()
    return lf.filter(pl.col("request_id") == request_id, pl.col("rank") <= k).sort("rank").collect()
