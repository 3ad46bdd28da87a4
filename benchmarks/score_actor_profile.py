"""One scoring actor's work on one partition, without Ray: rows/s of each part, single-threaded.

Builds what a :class:`recsys.scoring.stage.ScoreStage` holds (the package, and the users, items and history
tables after their round trip through Arrow, as ``ray.get`` gives them), then times the parts of one
partition, as the actor runs them: reading the partition, the feature code (history filter, ``derived`` and
``output_exprs``, the conversion to Arrow), the model (``score_ready``) and the output table. The first
partition is a warm-up; the others are timed.

``--save`` writes the scored partition (keys and scores) to a file; ``--check`` compares a run against it,
bit for bit, so that a change to the hot path can be shown to leave every score as it was.

Data (candidates, tables and a random-weight package, see :func:`benchmarks.score_bench.prepare`)::

    .venv/bin/python -c "from pathlib import Path; from benchmarks.score_bench import prepare; \
prepare(Path('/tmp/sp/cands'), 2_000_000, 2)"
    .venv/bin/python -m benchmarks.score_actor_profile --data /tmp/sp/cands [--save F | --check F] [--profile]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# One thread each, as a scoring actor with threads_per_actor 1: polars reads this when it is imported.
# Only when run as a script: importing the module must not replace the importing process.
if __name__ == "__main__" and os.environ.get("POLARS_MAX_THREADS") != "1":
    os.environ.update(POLARS_MAX_THREADS="1", OMP_NUM_THREADS="1")
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.score_actor_profile", *sys.argv[1:]])

import cProfile  # noqa: E402
import pstats  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from benchmarks.measure import cpu_model  # noqa: E402
from recsys.data.batch import batch_from_arrow  # noqa: E402
from recsys.package import load_package  # noqa: E402
from recsys.scoring.config import ScoreConfig  # noqa: E402
from recsys.scoring.inputs import read_inputs  # noqa: E402
from recsys.scoring.partitions import plan_partitions  # noqa: E402
from recsys.scoring.stage import PartitionScorer  # noqa: E402


def actor_tables(data: Path) -> dict[str, pl.DataFrame]:
    """The users, items and history tables as an actor holds them (polars -> Arrow -> polars)."""
    config = ScoreConfig(
        model=str(data / "model"),
        input=str(data / "impressions.parquet"),
        output="-",
        history=str(data / "history.parquet"),
    )
    inputs = read_inputs(config)
    tables = {"users": inputs.users, "items": inputs.items, "history": inputs.history}
    return {k: pl.from_arrow(v.to_arrow()) for k, v in tables.items()}


def timed_partition(scorer: PartitionScorer, part, times: dict[str, float]) -> pa.Table:
    """Scores one partition part by part, adding each part's seconds to ``times``."""
    clock = time.perf_counter()
    for name, step in scorer.steps(part):
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - clock
        if name == "to_arrow":  # the host side of "model" alone (on a GPU it stays on the CPU)
            times["(batches)"] = times.get("(batches)", 0.0) + time_batches(scorer, step)
            now = time.perf_counter()
        clock = now
        if name == "output":
            return step
    raise AssertionError("no output step")


def time_batches(scorer: PartitionScorer, ready: pa.Table) -> float:
    """Seconds to build every model batch of ``ready`` (``batch_from_arrow``), as ``score_ready`` does."""
    started = time.perf_counter()
    for start in range(0, ready.num_rows, scorer.batch_size):
        batch_from_arrow(ready.slice(start, scorer.batch_size), scorer.package.layout, labels=False)
    return time.perf_counter() - started


def report(times: dict[str, float], rows: int) -> None:
    """Seconds and rows/s of each part; ``(batches)`` is within ``model`` and not in the total."""
    total = sum(t for name, t in times.items() if not name.startswith("("))
    print(f"{'part':<14}{'seconds':>9}{'rows/s':>14}{'share':>8}")
    for name, seconds in [*times.items(), ("total", total)]:
        print(f"{name:<14}{seconds:9.3f}{rows / seconds:14,.0f}{seconds / total:8.0%}")


def compare(out: pa.Table, reference: Path) -> None:
    """Raises unless ``out`` equals the saved table, every value bit for bit."""
    saved = pq.read_table(reference)
    if saved.schema != out.schema or saved.num_rows != out.num_rows:
        raise SystemExit(f"check: schema or rows differ\n{saved.schema}\n{out.schema}")
    for name in out.column_names:
        a, b = saved[name].to_numpy(), out[name].to_numpy()
        same = (
            np.array_equal(a.view(np.int64), b.view(np.int64))
            if a.dtype.kind == "f"
            else np.array_equal(a, b)
        )
        if not same:
            raise SystemExit(f"check: column {name} differs from {reference}")
    print(f"check: {out.num_rows:,} rows identical to {reference}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="/tmp/sp/cands", help="folder of benchmarks.score_bench.prepare")
    parser.add_argument("--rows-per-partition", type=int, default=250_000)
    parser.add_argument(
        "--partitions", type=int, default=3, help="partitions timed, spread over the input (after a warm-up)"
    )
    parser.add_argument("--save", type=Path, help="write the timed partitions' output here")
    parser.add_argument("--check", type=Path, help="compare the timed partitions' output with this file")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed partitions")
    parser.add_argument("--embedding-dtype", default="fp32", help="the tables' precision (fp32)")
    parser.add_argument("--compute-dtype", default="fp32", help="the dense layers' precision (fp32)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    data = Path(args.data)
    started = time.perf_counter()
    tables = actor_tables(data)
    package = load_package(
        data / "model", embedding_dtype=args.embedding_dtype, compute_dtype=args.compute_dtype
    )
    print(
        f"inputs and package: {time.perf_counter() - started:.1f} s; "
        f"history {tables['history'].height:,} rows"
    )
    started = time.perf_counter()
    scorer = PartitionScorer(package, tables["users"], tables["items"], tables["history"], 8192)
    print(f"scorer set up in {time.perf_counter() - started:.2f} s")
    parts = plan_partitions([data / "impressions.parquet"], args.rows_per_partition)
    timed_partition(scorer, parts[0], {})  # warm-up
    times: dict[str, float] = {}
    profiler = cProfile.Profile() if args.profile else None
    outs = []
    # Spread over the input (in time order): a partition's history grows with its time.
    picked = [parts[int(i)] for i in np.unique(np.linspace(1, len(parts) - 1, args.partitions).round())]
    for part in picked:
        if profiler:
            profiler.enable()
        out = timed_partition(scorer, part, times)
        if profiler:
            profiler.disable()
        outs.append(out)
    print(f"{cpu_model()}; polars {pl.__version__}, {pl.thread_pool_size()} thread(s); torch 1 thread")
    scored = pa.concat_tables(outs)
    print(f"partitions {[p.index for p in picked]} of {len(parts)}, {scored.num_rows:,} rows")
    report(times, scored.num_rows)
    if args.save:
        pq.write_table(scored, args.save)
        print(f"saved {scored.num_rows:,} rows to {args.save}")
    if args.check:
        compare(scored, args.check)
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
