"""The driver side of a scoring run: collects the scored rows of each partition, ranks and writes it.

Rows of several partitions arrive interleaved (the actors run concurrently); the driver buffers the narrow
scored rows (keys and one column per task) per partition until the partition's ``rows_in`` are there,
then computes the ranking score and the rank within ``request_id``, keeps the top K per request if asked,
writes ``OUT/part-XXXXX.parquet`` atomically and records it in the manifest. The driver is the only
writer. A partition with a score that is not a finite number is never written: the run stops with
:class:`NonFiniteScoreError`.

Output columns: ``impression_id``, ``request_id``, ``user_id``, ``item_id`` (passed through), one
``p_<task>`` per task (``pred_<task>`` for regression), ``score``, ``rank`` (1 = best; a permutation of
1..n within each request, ties broken by ``impression_id``) and ``model_version``; each part file is
sorted by ``(request_id, rank)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from recsys.scoring.manifest import MANIFEST, Manifest, MovedRequests, PartitionRecord
from recsys.scoring.partitions import PARTITION, Partition, write_part
from recsys.scoring.ranking import ScoreFormula, expected_rows_out, rank_requests
from recsys.scoring.stage import KEY_COLUMNS


class NonFiniteScoreError(ValueError):
    """The model returned NaN or an infinite score; the message names the partition, its rows, an example."""


def check_finite(scored: pl.DataFrame, outputs: tuple[str, ...], keys: tuple[str, ...], where: str) -> None:
    """Raises :class:`NonFiniteScoreError` if an output column of ``scored`` holds NaN, an infinity or null.

    Args:
        scored: (N, keys + outputs) scored rows of one partition.
        outputs: the model's output columns.
        keys: the key columns, shown for an example row.
        where: the partition, in words (its file and input range).
    """
    finite = [pl.col(c).is_finite().fill_null(False) for c in outputs]
    bad = scored.filter(~pl.all_horizontal(finite)) if outputs else scored.clear()
    if bad.height == 0:
        return
    columns = [c for c in outputs if not bad[c].is_finite().fill_null(False).all()]
    example = ", ".join(f"{k}={bad[k][0]}" for k in keys if k in bad.columns)
    values = ", ".join(f"{c}={bad[c][0]}" for c in columns)
    raise NonFiniteScoreError(
        f"{where}: not written: {bad.height} of {scored.height} rows have a score that is not a finite "
        f"number in {columns} (first: {example}: {values}); the model returns NaN or infinite scores "
        "(check its weights): nothing of this partition is written, and the run stops"
    )


@dataclass
class PartitionWriter:
    """Ranks and writes each partition once all its rows are scored; counts what it wrote.

    Attributes:
        formula: the ranking score.
        top_k: keep the best K rows of each request (None: all).
        outputs: the model's output columns, one per task.
        manifest: the run's manifest, rewritten after each partition.
        out: the output folder.
        todo: the partitions still to write, by index.
        bar: the progress bar over partitions (updated once per partition written).
        keys: the input columns passed through (:func:`recsys.scoring.stage.key_columns`).
        written: partitions written so far.
        rows_scored: rows scored in them.
    """

    formula: ScoreFormula
    top_k: int | None
    outputs: tuple[str, ...]
    manifest: Manifest
    out: Path
    todo: dict[int, Partition]
    bar: Any
    keys: tuple[str, ...] = KEY_COLUMNS
    written: int = 0
    rows_scored: int = 0
    _frames: dict[int, list[pl.DataFrame]] = field(default_factory=dict)
    _counts: dict[int, int] = field(default_factory=dict)

    def add(self, frame: pl.DataFrame) -> None:
        """Takes (B, keys + outputs + ``__partition``) scored rows; writes every partition they complete."""
        for (index,), rows in frame.partition_by(PARTITION, as_dict=True).items():
            part = self.todo[int(index)]
            self._frames.setdefault(part.index, []).append(rows.drop(PARTITION))
            self._counts[part.index] = self._counts.get(part.index, 0) + rows.height
            if self._counts[part.index] >= part.rows_in:
                self.write(part)

    def flush(self) -> None:
        """Writes the partitions whose rows went missing as they are (the checks flag their counts)."""
        for index in sorted(self._counts):
            self.write(self.todo[index])

    def write(self, part: Partition) -> None:
        """Ranks ``part``'s scored rows, writes its file and records it."""
        frames = self._frames.pop(part.index, [])
        n_scored = self._counts.pop(part.index, 0)
        scored = pl.concat(frames) if frames else self._empty()
        where = f"{self.out / part.name} (partition {part.index}: {part.file} rows {part.start}-{part.stop})"
        check_finite(scored, self.outputs, self.keys, where)
        started = time.perf_counter()
        ranked = self._ranked(scored)
        write_part(ranked, self.out / part.name)
        entry = PartitionRecord(
            file=part.name,
            input_file=part.file,
            start=part.start,
            stop=part.stop,
            rows_in=part.rows_in,
            rows_scored=n_scored,
            rows_out=ranked.height,
            expected_out=expected_rows_out(scored["request_id"], self.top_k),
            moved_requests=MovedRequests(len(part.drop_requests), sum(len(p[3]) for p in part.pull)),
            model_version=self.manifest.model_version,
            status="done",
            write_seconds=round(time.perf_counter() - started, 3),
        )
        self.manifest.record(part.index, entry, self.out / MANIFEST)
        del self.todo[part.index]
        self.written += 1
        self.rows_scored += n_scored
        self.bar.update(1)

    def _ranked(self, scored: pl.DataFrame) -> pl.DataFrame:
        ranked = rank_requests(scored, self.formula, self.top_k)
        return ranked.select(
            *self.keys,
            *[c for c in scored.columns if c not in self.keys],
            "score",
            "rank",
            pl.lit(self.manifest.model_version, pl.String).alias("model_version"),
        )

    def _empty(self) -> pl.DataFrame:
        """The scored rows of a partition without rows."""
        return pl.DataFrame(schema={c: pl.Int64 for c in self.keys} | {c: pl.Float64 for c in self.outputs})
