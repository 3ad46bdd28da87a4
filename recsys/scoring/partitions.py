"""Partitions: the units of work and of output of a scoring run, planned up front from the input files.

Each input file is cut into contiguous row ranges of at most ``rows_per_partition`` rows at row-group
boundaries (a larger row group is cut inside), numbered in file order: ``part-00000``, ``part-00001``, ...
A cut that would split a request moves back to the start of that request, so that contiguous requests
never straddle two partitions. A request whose rows still lie in several partitions (non-contiguous input,
or one request in two files) belongs to the first of them, which reads its other rows too; the others skip
them. Ranking within a request therefore always sees the whole request, at the cost of extra reads for
non-contiguous input only.

Example:
    >>> parts = plan_partitions([Path("cands/c0.parquet")], rows_per_partition=250_000)  # doctest: +SKIP
    >>> read_partition(parts[0]).height == parts[0].rows_in  # doctest: +SKIP
    True
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from features.contract import IMPRESSIONS
from features.files import atomic_write

log = logging.getLogger(__name__)

PARTITION = "__partition"  # the column that carries a scored row's partition from the actors to the driver
READ_COLUMNS = tuple(c.name for c in IMPRESSIONS.without_labels().columns)

Pull = tuple[str, int, int, tuple[int, ...]]  # (file, start, stop, request ids) rows read from elsewhere


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
    pull: tuple[Pull, ...] = ()

    @property
    def name(self) -> str:
        """The output file name."""
        return f"part-{self.index:05d}.parquet"

    def to_json(self) -> str:
        """The partition as JSON, to send to a scoring actor."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Partition:
        """The partition :meth:`to_json` wrote."""
        data = json.loads(text)
        data["drop_requests"] = tuple(data["drop_requests"])
        data["pull"] = tuple((f, s, e, tuple(ids)) for f, s, e, ids in data["pull"])
        return cls(**data)


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
    ranges, requests = _ranges(files, rows_per_partition)
    # (request_id, partition) -> rows, and the request's owner: the first partition that holds it.
    counts = (
        requests.group_by("request_id", PARTITION)
        .len()
        .with_columns(pl.col(PARTITION).min().over("request_id").alias("owner"))
    )
    rows_in = dict.fromkeys(range(len(ranges)), 0)
    for part, rows in counts.group_by("owner").agg(pl.col("len").sum()).iter_rows():
        rows_in[part] = int(rows)
    drops, pulls = _moved(counts.filter(pl.col(PARTITION) != pl.col("owner")), ranges)
    return [
        Partition(i, file, start, stop, rows_in[i], drops.get(i, ()), tuple(pulls.get(i, ())))
        for i, (file, start, stop) in enumerate(ranges)
    ]


def _ranges(files: list[Path], rows_per_partition: int) -> tuple[list[tuple[str, int, int]], pl.DataFrame]:
    """The row ranges ``(file, start, stop)`` of the partitions, and (N, request_id + partition) rows."""
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
                        pl.lit(len(ranges), pl.Int64).alias(PARTITION)
                    )
                )
                ranges.append((str(f), start, stop))
    return ranges, pl.concat(request_parts)


def _moved(
    moved: pl.DataFrame, ranges: list[tuple[str, int, int]]
) -> tuple[dict[int, tuple[int, ...]], dict[int, list[Pull]]]:
    """Requests each partition leaves to their owner, and the rows each owner reads from other ranges."""
    drops: dict[int, tuple[int, ...]] = {}
    pulls: dict[int, list[Pull]] = {}
    if not moved.height:
        return drops, pulls
    log.warning(
        "%d request(s) lie in several partitions (%d rows); each is scored by its first partition, "
        "which reads its other rows too (sort the input by request_id to avoid the extra reads)",
        moved["request_id"].n_unique(),
        int(moved["len"].sum()),
    )
    for (part,), group in moved.group_by(PARTITION, maintain_order=True):
        drops[int(part)] = tuple(sorted(int(r) for r in group["request_id"]))
        for (owner,), sub in group.group_by("owner", maintain_order=True):
            file, start, stop = ranges[int(part)]
            pulls.setdefault(int(owner), []).append(
                (file, start, stop, tuple(sorted(int(r) for r in sub["request_id"])))
            )
    return drops, pulls


def read_range(file: str, start: int, stop: int, columns: Sequence[str]) -> pl.DataFrame:
    """Rows ``[start, stop)`` of a Parquet file, reading only the row groups that hold them."""
    pf = pq.ParquetFile(file)
    meta = pf.metadata
    offsets = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    groups = [i for i in range(meta.num_row_groups) if offsets[i] < stop and offsets[i + 1] > start]
    if not groups:
        empty = pf.schema_arrow.empty_table()
        return pl.from_arrow(empty if columns is None else empty.select(list(columns)))
    table = pf.read_row_groups(groups, columns=None if columns is None else list(columns))
    return pl.from_arrow(table.slice(start - int(offsets[groups[0]]), stop - start))


def read_partition(part: Partition, columns: tuple[str, ...] | None = READ_COLUMNS) -> pl.DataFrame:
    """The candidate rows a partition scores (its range, less dropped requests, plus pulled rows).

    Args:
        part: the partition.
        columns: the columns to read (None: all, as a flat table's).
    """
    rows = read_range(part.file, part.start, part.stop, columns)
    if part.drop_requests:
        rows = rows.filter(~pl.col("request_id").is_in(list(part.drop_requests)))
    pulled = [
        read_range(file, start, stop, columns).filter(pl.col("request_id").is_in(list(ids)))
        for file, start, stop, ids in part.pull
    ]
    # Another file may have other extra columns (a flat table is read whole): kept, null where missing.
    return pl.concat([rows, *pulled], how="diagonal_relaxed") if pulled else rows


def write_part(frame: pl.DataFrame, path: Path) -> None:
    """Writes a ranked partition to ``path`` atomically (a temporary name in its folder, then a rename).

    Every page carries a CRC32 of its bytes, which :func:`check_part` verifies: a part damaged on disk is
    found when it is read back, not used. zstd level 1 with column statistics, as the feature files.

    Raises:
        OSError: the write failed (a full disk); the message names the file, and ``path`` is untouched.
    """
    buffer = io.BytesIO()
    pq.write_table(
        frame.to_arrow(),
        buffer,
        compression="zstd",
        compression_level=1,
        write_statistics=True,
        write_page_checksum=True,
    )
    try:
        atomic_write(path, buffer.getvalue())
    except OSError as e:
        raise OSError(e.errno, f"writing {path}: {e.strerror or e}") from e


def check_part(path: Path, rows: int) -> str | None:
    """Reads a written part file in full, verifying its page checksums.

    Returns:
        None if every page is intact and the file holds ``rows`` rows; else what is wrong, naming the file.
    """
    try:
        reader = pq.ParquetFile(path, page_checksum_verification=True)
        found = sum(batch.num_rows for batch in reader.iter_batches(batch_size=65_536))
    except (OSError, pa.ArrowException) as e:
        return f"{path}: damaged or unreadable ({type(e).__name__}: {e})"
    if found != rows:
        return f"{path}: {found} rows on disk, {rows} in the manifest"
    return None


def parquet_rows(path: Path) -> int | None:
    """Rows of a Parquet file from its footer; None for a missing or unreadable file."""
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, ValueError):
        return None
