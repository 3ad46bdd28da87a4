"""One worker's share of a split, read straight from its Parquet files, and batches in lockstep.

:class:`ParquetShard` cuts a split's rows into one contiguous range per worker, worked out by every worker
alike from the Parquet metadata (no coordinator), and yields fixed-size Arrow batches, optionally shuffled
within a buffer, read ahead on a background thread (:func:`read_ahead`). :func:`lockstep_batches` makes
every worker take the same number of batches, as the collectives of a sharded model need: training stops
when any worker runs out of full batches; evaluation goes on while any worker has rows, the others feeding
a padding batch (:func:`padding_row`) whose predictions are dropped.

Training batches do not depend on the number of workers: the rows are cut into ``shards`` ranges (the
number of workers the run started with), each read in batches of ``batch_size``; a step's global batch is
the shards' batches put together, and each of the workers takes its contiguous part of it. On as many
workers as shards each reads its own range; a run resumed on fewer or more workers trains on the very same
global batches.

Reading directly needs no coordinator: Ray Data's split coordinator took ~70% of a core on the 2-core
machine at 20M rows (193 files), and its read tasks ran in other processes competing for the same cores.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from recsys.data.batch import FeatureLayout

PREPARED_AHEAD = 3  # prepared batches waiting: one being copied, two ready (a GPU's pinned batches)


def pad(table: pa.Table, size: int) -> pa.Table:
    """``table`` with its first row repeated up to ``size`` rows (padding rows are dropped later)."""
    index = np.concatenate([np.arange(table.num_rows), np.zeros(size - table.num_rows, dtype=np.int64)])
    return table.take(pa.array(index))


def _any_rank(flag: bool, op: dist.ReduceOp) -> bool:
    value = torch.tensor([1 if flag else 0])
    dist.all_reduce(value, op=op)
    return bool(value.item())


def _group_slice(path: Path, group: int, lo: int, hi: int, read_rows: int) -> Iterator[pa.Table]:
    """Rows ``lo:hi`` of a row group of a Parquet file, read in chunks of ``read_rows``."""
    import pyarrow.parquet as pq

    # Our feature parts carry page checksums: a corrupted page fails here instead of training on.
    parquet = pq.ParquetFile(path, page_checksum_verification=True)
    pos = 0
    for chunk in parquet.iter_batches(batch_size=read_rows, row_groups=[group]):
        a, b = max(lo, pos), min(hi, pos + chunk.num_rows)
        if a < b:
            yield pa.Table.from_batches([chunk.slice(a - pos, b - a)])
        pos += chunk.num_rows
        if pos >= hi:
            break


class _Stream:
    """Tables taken from an iterator in exact numbers of rows."""

    def __init__(self, tables: Iterator[pa.Table]) -> None:
        self.tables, self.head = tables, None

    def take(self, rows: int) -> list[pa.Table]:
        """The next ``rows`` rows (fewer at the end of the tables)."""
        out: list[pa.Table] = []
        while rows > 0:
            table = self.head if self.head is not None else next(self.tables, None)
            if table is None:
                break
            self.head = table.slice(rows) if table.num_rows > rows else None
            out.append(table.slice(0, rows))
            rows -= out[-1].num_rows
        return out


def _buffers(
    n_rows: int, batch_size: int, shuffle_rows: int, seed: int
) -> Iterator[tuple[int, np.ndarray, int]]:
    """How a worker's ``n_rows`` rows become batches: for each shuffle buffer ``(fresh, order, n_full)``.

    A buffer holds the rows carried over from the previous one, then ``fresh`` rows of the stream, up to
    ``max(batch_size, shuffle_rows)`` rows; ``order`` is the permutation of its rows (read order without
    ``shuffle_rows``), whose first ``n_full`` entries make its batches and whose rest (less than a batch) is
    carried into the next buffer. It depends on the sizes and the seed only, never on the rows' contents
    or how they were read.
    """
    rng = np.random.default_rng(seed)
    fill = max(batch_size, shuffle_rows)
    taken = carried = 0
    while taken < n_rows:
        fresh = min(fill - carried, n_rows - taken)
        size = carried + fresh
        order = rng.permutation(size) if shuffle_rows else np.arange(size)
        n_full = size // batch_size * batch_size
        yield fresh, order, n_full
        taken, carried = taken + fresh, size - n_full


def padding_row(layout: FeatureLayout, key_columns: list[str]) -> pa.Table:
    """One row of zeros (out-of-vocabulary ids, empty bags) with the model's and the keys' columns."""
    columns: dict[str, pa.Array] = {}
    for feature in layout.sparse:
        columns[feature.name] = pa.array(
            [[]] if feature.multi_hot else [0], pa.large_list(pa.int64()) if feature.multi_hot else pa.int64()
        )
    for name in (*layout.dense, *layout.labels):
        columns[name] = pa.array([0.0], pa.float32())
    for name in key_columns:
        columns[name] = pa.array([0], pa.int64())
    return pa.table(columns)


def lockstep_batches(
    shard: Any,
    batch_size: int,
    *,
    complete: bool,
    padding: pa.Table | None = None,
    max_steps: int = 0,
    shuffle_rows: int = 0,
    seed: int = 0,
    prepare: Callable[[pa.Table], Any] | None = None,
    prepare_threads: int = 1,
    stop: Callable[[], bool] | None = None,
) -> Iterator[tuple[Any, int]]:
    """Arrow batches of exactly ``batch_size`` rows, the same number on every worker.

    Args:
        shard: this worker's rows: a :class:`ParquetShard` or a Ray Data ``DataIterator``.
        batch_size: rows per batch.
        complete: evaluation mode: go on while any worker has rows (others yield padding, and partial
            batches are padded); else stop when any worker runs out of full batches (training).
        padding: evaluation mode: the row a worker without rows repeats (see :func:`padding_row`).
        max_steps: stop after this many batches (0: no cap).
        shuffle_rows: shuffle within a buffer of this many rows (0: read order).
        seed: the shuffle's seed.
        prepare: training mode only: applied to each table off this thread (on ``prepare_threads``
            threads, in order), and what it returns is yielded instead of the table: a GPU's batches are
            built and pinned there, off the training thread (see :func:`recsys.train.worker.train_epoch`).
        prepare_threads: threads that copy the batches' rows out of the shuffle buffer and ``prepare``
            them (Arrow's ``take`` and most of NumPy's work release the GIL).
        stop: training mode only: this worker's vote to stop before the next batch (asked at every
            batch); all workers stop together when any votes so (see :mod:`recsys.train.divergence`).

    Yields:
        ``(table, n_real)``: the batch (or what ``prepare`` made of it) and how many of its first rows are
        real.
    """
    if prepare is not None and complete:
        raise ValueError("lockstep_batches: prepare: only in training mode (complete=False): no padding")
    if prepare is not None and isinstance(shard, ParquetShard):
        # Reading on the read-ahead thread; copying each batch's rows out of the shuffle buffer and
        # preparing it on ``prepare_threads``; the collectives below stay on this thread.
        rows = read_ahead(shard.iter_rows(batch_size, True, shuffle_rows, seed), PREPARED_AHEAD)
        it = parallel_map(lambda r: (prepare(r.table()), r.num_rows), rows, prepare_threads)
    else:
        batches = shard.iter_batches(
            batch_size=batch_size,
            batch_format="pyarrow",
            drop_last=not complete,
            prefetch_batches=2,
            local_shuffle_buffer_size=shuffle_rows or None,
            local_shuffle_seed=seed if shuffle_rows else None,
        )
        it = ((t, t.num_rows) for t in batches if t is not None and t.num_rows)
        if prepare is not None:  # a Ray Data shard: prepared on this thread
            it = ((prepare(t), n) for t, n in it)
    steps = 0
    while not max_steps or steps < max_steps:
        table, n_real = next(it, (None, 0))
        wants = n_real > 0 and not (stop is not None and not complete and stop())
        go_on = _any_rank(wants, dist.ReduceOp.MAX if complete else dist.ReduceOp.MIN)
        if not go_on:
            return
        if n_real:
            if complete and n_real < batch_size:  # evaluation's last batch (training's parts are whole)
                table = pad(table, batch_size)
        else:
            # This worker is out of rows: it feeds padding so that the others can finish.
            table, n_real = pad(padding, batch_size), 0
        steps += 1
        yield table, n_real


class ParquetShard:
    """One worker's share of a split's rows, read straight from its Parquet files.

    The split's row groups, in sorted file order (or, with ``order_seed``, in an order drawn from it), make
    one sequence of rows; it is cut into ``shards`` contiguous ranges of sizes differing by at most one,
    each read row group by row group in slices of at most 65,536 rows (memory flat in the split's size).
    Every worker works out the same ranges from the Parquet metadata alone, with no coordinator. With as
    many shards as workers (the default), rank ``r`` reads range ``r``. Otherwise (a run resumed on another
    number of workers) each batch is a part of a global batch made of one batch of every range: rank
    ``r`` of ``world`` takes rows ``[G * r // world, G * (r + 1) // world)`` of it (``G = shards *
    batch_size``), reading the ranges that part overlaps, so the global batches, and the model trained on
    them, are those of the ``shards`` workers the run started with.

    It offers the part of Ray Data's ``DataIterator.iter_batches`` that training and evaluation use:
    batches of a fixed size, optionally shuffled within a buffer of rows, read ahead on a background thread
    (Parquet decoding and Arrow's ``take`` release the GIL, so reading overlaps the training step).

    Args:
        directory: the split's folder of Parquet files.
        rank: this worker's rank.
        world: the number of workers.
        order_seed: draw the order of the row groups from this seed (None: file order).
        shards: the ranges the rows are cut into, whose batches make the global batch (None: ``world``).

    Example:
        >>> shard = ParquetShard("features/train", rank=0, world=2, order_seed=7)
        >>> for table in shard.iter_batches(1024, drop_last=True, local_shuffle_buffer_size=100_000,
        ...                                 local_shuffle_seed=7):
        ...     ...  # pyarrow.Table of 1024 rows
    """

    READ_ROWS = 65_536

    def __init__(
        self,
        directory: str | Path,
        rank: int,
        world: int,
        order_seed: int | None = None,
        shards: int | None = None,
    ) -> None:
        import pyarrow.parquet as pq

        files = sorted(Path(directory).glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{directory}: no Parquet files")
        self.groups: list[tuple[Path, int, int]] = []  # (file, row group, rows)
        for path in files:
            meta = pq.read_metadata(path)
            self.groups += [(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        if order_seed is not None:
            order = np.random.default_rng(order_seed).permutation(len(self.groups))
            self.groups = [self.groups[i] for i in order]
        total = sum(n for _, _, n in self.groups)
        self.rank, self.world, self.shards = rank, world, shards or world
        self.ranges = [(total * v // self.shards, total * (v + 1) // self.shards) for v in range(self.shards)]
        self.start, self.stop = total * rank // world, total * (rank + 1) // world

    @property
    def num_rows(self) -> int:
        """The rows of this worker's range (as many shards as workers)."""
        return self.stop - self.start

    def num_batches(self, batch_size: int) -> int:
        """The full training batches this worker's share holds (``batch_size``: each shard's)."""
        return min(
            (self.ranges[v][1] - self.ranges[v][0]) // batch_size for v, _, _ in self.parts(batch_size)
        )

    def parts(self, batch_size: int) -> list[tuple[int, int, int]]:
        """``(shard, lo, hi)``: the rows ``lo:hi`` of each shard's batch that make this worker's part.

        Worker ``r`` takes rows ``[G * r // world, G * (r + 1) // world)`` of the global batch's ``G``
        (parts differing by one row at most where ``world`` does not divide ``G``).
        """
        size = batch_size * self.shards  # the global batch
        first, last = size * self.rank // self.world, size * (self.rank + 1) // self.world
        found = []
        for v in range(self.shards):
            lo, hi = (
                max(first, v * batch_size) - v * batch_size,
                min(last, (v + 1) * batch_size) - v * batch_size,
            )
            if lo < hi:
                found.append((v, lo, hi))
        return found

    def _tables(self, start: int, stop: int) -> Iterator[pa.Table]:
        offset = 0
        for path, group, n in self.groups:
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                try:
                    yield from _group_slice(path, group, lo - offset, hi - offset, self.READ_ROWS)
                except OSError as error:  # a corrupted page (checksum), a truncated file
                    raise OSError(f"features part {path}, row group {group}: {error}") from error
            offset += n

    def _batches(
        self, start: int, stop: int, batch_size: int, drop_last: bool, shuffle_rows: int, seed: int
    ) -> Iterator[Rows]:
        # Each buffer takes in rows until it holds ``shuffle_rows`` (at least one batch), is permuted and cut
        # into batches; what is left over (less than a batch) starts the next buffer (:func:`_buffers`).
        # A batch is yielded as the buffer and its rows' positions, copied out only by ``Rows.table``.
        stream = _Stream(self._tables(start, stop))
        carried: list[pa.Table] = []
        for fresh, order, n_full in _buffers(stop - start, batch_size, shuffle_rows, seed):
            whole = pa.concat_tables([*carried, *stream.take(fresh)])
            for first in range(0, n_full, batch_size):
                yield Rows(whole, order[first : first + batch_size], shuffled=bool(shuffle_rows))
            carried = [Rows(whole, order[n_full:], shuffled=bool(shuffle_rows)).table()]
        rest = carried[0] if carried else None
        if rest is not None and rest.num_rows and not drop_last:
            yield Rows(rest, np.arange(rest.num_rows), shuffled=False)

    def _parts_of_global_batches(self, batch_size: int, shuffle_rows: int, seed: int) -> Iterator[Rows]:
        """This worker's part of each global batch, while every shard it reads has a full batch."""
        parts = self.parts(batch_size)
        streams = [self._batches(*self.ranges[v], batch_size, True, shuffle_rows, seed) for v, _, _ in parts]
        for batches in zip(*streams, strict=False):  # stops at the first shard out of batches
            yield Rows.joined([b.sliced(lo, hi) for b, (_, lo, hi) in zip(batches, parts, strict=True)])

    def iter_batches(
        self,
        batch_size: int,
        drop_last: bool = False,
        prefetch_batches: int = 2,
        local_shuffle_buffer_size: int | None = None,
        local_shuffle_seed: int | None = None,
        **_: Any,
    ) -> Iterator[pa.Table]:
        """Arrow tables of ``batch_size`` rows (the last one shorter unless ``drop_last``).

        Args:
            batch_size: rows per batch.
            drop_last: leave out the last, shorter batch.
            prefetch_batches: batches read ahead on a background thread (0: read on the caller's thread).
            local_shuffle_buffer_size: shuffle within a buffer of this many rows (None or 0: read order).
            local_shuffle_seed: the shuffle's seed; the same seed gives the same batches.
        """
        rows = self.iter_rows(batch_size, drop_last, local_shuffle_buffer_size, local_shuffle_seed)
        batches = (r.table() for r in rows)
        return read_ahead(batches, prefetch_batches) if prefetch_batches else batches

    def iter_rows(
        self,
        batch_size: int,
        drop_last: bool = False,
        shuffle_rows: int | None = None,
        seed: int | None = None,
    ) -> Iterator[Rows]:
        """The batches of :meth:`iter_batches` (no read-ahead), each not yet copied out of its buffer.

        With fewer or more shards than workers: this worker's parts of the global batches of full
        ``batch_size`` batches of every shard (training only: ``drop_last``).
        """
        if self.shards == self.world:
            return self._batches(self.start, self.stop, batch_size, drop_last, shuffle_rows or 0, seed or 0)
        if not drop_last:
            raise ValueError("ParquetShard: parts of global batches are for training only (drop_last=True)")
        return self._parts_of_global_batches(batch_size, shuffle_rows or 0, seed or 0)


class Rows:
    """A batch not yet copied out of its buffer: the buffer and the batch's row positions in it.

    Copying the rows out (:meth:`table`: Arrow's ``take``, or a slice made contiguous) is left to whoever
    builds the batch, so that several threads can do it (:func:`parallel_map`). A batch made of parts of
    several buffers (:meth:`joined`) copies each part out and puts them together.
    """

    def __init__(self, buffer: pa.Table, positions: np.ndarray, shuffled: bool) -> None:
        self.buffer, self.positions, self.shuffled = buffer, positions, shuffled
        self.others: list[Rows] = []  # the parts after this one (a joined batch)

    @classmethod
    def joined(cls, parts: list[Rows]) -> Rows:
        """One batch of ``parts``' rows, in order."""
        first = cls(parts[0].buffer, parts[0].positions, parts[0].shuffled)
        first.others = parts[1:]
        return first

    def sliced(self, lo: int, hi: int) -> Rows:
        """The batch's rows ``lo:hi``."""
        return Rows(self.buffer, self.positions[lo:hi], self.shuffled)

    @property
    def num_rows(self) -> int:
        """The batch's rows."""
        return len(self.positions) + sum(part.num_rows for part in self.others)

    def table(self) -> pa.Table:
        """The batch's rows as one contiguous Arrow table."""
        if self.shuffled:
            own = self.buffer.take(pa.array(self.positions))
        else:
            start = int(self.positions[0]) if len(self.positions) else 0
            own = self.buffer.slice(start, len(self.positions)).combine_chunks()
        if not self.others:
            return own
        return pa.concat_tables([own, *(part.table() for part in self.others)]).combine_chunks()


def parallel_map(fn: Callable[[Any], Any], items: Iterator[Any], workers: int) -> Iterator[Any]:
    """``fn`` of each item, on ``workers`` threads, in the items' order, at most ``2 * workers`` ahead.

    Items are taken from ``items`` on the caller's thread (wrap a slow source in :func:`read_ahead`). An
    exception of ``fn`` is raised in the consumer; a consumer that stops early cancels what is queued.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers, thread_name_prefix="batch-prepare")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def read_ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """``items``, produced on a background thread up to ``depth`` ahead of the consumer.

    An exception of the producer is raised in the consumer; a consumer that stops early (a generator
    closed or dropped) stops the producer too.
    """
    import queue
    import threading

    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer is gone

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as error:  # handed to the consumer, raised there
            put((done, error))

    def consume() -> Iterator[Any]:
        # Started on the first ``next``, so that a reader never iterated leaves no thread behind.
        thread = threading.Thread(target=produce, name="parquet-read-ahead", daemon=True)
        _READERS.add((stop, thread))
        thread.start()
        try:
            while True:
                item, error = slots.get()
                if item is done:
                    if error is not None:
                        raise error
                    return
                yield item
        finally:
            stop.set()
            thread.join()
            _READERS.discard((stop, thread))

    return consume()


_READERS: set[tuple[Any, Any]] = set()  # read-ahead threads still running: (stop event, thread)


@atexit.register
def _stop_readers() -> None:
    # A daemon thread still inside Arrow's C++ code when the interpreter finalizes aborts the process
    # ("terminate called without an active exception"): stop and join the ones whose consumer is still
    # alive at exit (each notices within 0.1 s).
    for stop, thread in list(_READERS):
        stop.set()
        thread.join(timeout=5)
