"""Candidate sets: a generated world's impressions without their labels, ready to score.

The labelled impressions are kept as the click history, so that a candidate's history features are the
clicks before its ``ts``, as in training.

Example:
    >>> cands = generate_candidates("data/cands", 50_000, seed=8, progress=False)  # doctest: +SKIP
    >>> cands.rows, cands.impressions.name  # doctest: +SKIP
    (50000, 'impressions.parquet')
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from features.contract import LABELS
from features.files import staged_file
from synth.generate import generate


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


def generate_candidates(
    out: str | Path, n_impressions: int, seed: int, *, world: str = "default", **kwargs: Any
) -> CandidateSet:
    """Generates a candidate set with :func:`synth.generate.generate`: labels dropped, kept as history.

    Writes ``OUT/impressions.parquet`` (no labels), ``OUT/users.parquet``, ``OUT/items.parquet`` and
    ``OUT/history.parquet`` (the labelled impressions: a row's history is the clicks before its ``ts``).

    Args:
        out: the folder.
        n_impressions: candidate rows.
        seed: the generator's seed.
        world: the truth model (a key of :data:`synth.generate.WORLDS`).
        **kwargs: passed to :func:`synth.generate.generate` (``chunk_rows``, ``progress``, ...).
    """
    out = Path(out)
    staging = out / ".world"
    generate(staging, n_impressions, seed, world=world, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    os.replace(staging / "impressions.parquet", out / "history.parquet")
    os.replace(staging / "users.parquet", out / "users.parquet")
    os.replace(staging / "items.parquet", out / "items.parquet")
    shutil.rmtree(staging, ignore_errors=True)
    rows = _without_labels(out / "history.parquet", out / "impressions.parquet")
    return CandidateSet(
        out / "impressions.parquet",
        out / "users.parquet",
        out / "items.parquet",
        out / "history.parquet",
        rows,
    )


def _without_labels(source_path: Path, target: Path) -> int:
    """Copies ``source_path`` without the label columns, row group by row group; returns its rows.

    Row groups are kept as generated (one per day or chunk), so a scoring run can cut partitions at them.
    """
    source = pq.ParquetFile(source_path)
    schema = source.schema_arrow
    keep = [name for name in schema.names if name not in LABELS]
    with (
        staged_file(target) as tmp,
        pq.ParquetWriter(tmp, pa.schema([f for f in schema if f.name not in LABELS])) as writer,
    ):
        for i in range(source.num_row_groups):
            writer.write_table(source.read_row_group(i, columns=keep))
    return source.metadata.num_rows
