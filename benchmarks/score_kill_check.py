"""Kill -9 a scoring run at a random moment, rerun the same command, and check the output is exact.

1. Generates (or reuses) candidates and a random-weight model package (as benchmarks/score_bench.py).
2. Starts ``python -m pipelines.score`` in its own process group; once its first partition is written,
   waits a random 0-4 s and sends SIGKILL to the whole group (the driver and its local Ray).
3. Reruns the same command until it exits 0.
4. Checks that the output holds exactly one row per input row: the sorted impression_ids of the output
   equal those of the input (none missing, none duplicated), and that every request's ranks are 1..n.

Run: .venv/bin/python -m benchmarks.score_kill_check [--rows 300000] [--seed 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).parent))
from score_bench import prepare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def done_partitions(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["partitions"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--data", default="/tmp/score_kill")
    parser.add_argument("--seed", type=int, help="seed of the random kill moment (default: random)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(10**6)
    rng = random.Random(seed)

    data = Path(args.data)
    prepare(data, args.rows, 23)
    out = data / "out"
    if out.exists():  # a previous check's output: its manifest would read as this run's progress
        shutil.rmtree(out)
    command = [
        sys.executable,
        "-m",
        "pipelines.score",
        "--model",
        str(data / "model"),
        "--input",
        str(data / "impressions.parquet"),
        "--history",
        str(data / "history.parquet"),
        "--output",
        str(out),
        "--rows-per-partition",
        "25000",
        "--tracking-uri",
        f"sqlite:///{data / 'mlflow.db'}",
        "--no-progress",
    ]
    first = subprocess.Popen(
        command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while done_partitions(out) == 0 and first.poll() is None:  # only this run's manifest counts
        time.sleep(0.2)
    if first.poll() is not None:
        raise SystemExit(f"the first run ended (exit {first.returncode}) before it wrote a partition")
    delay = rng.uniform(0, 4)
    time.sleep(delay)
    at_kill = done_partitions(out)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    leftovers = sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))
    print(
        f"seed {seed}: killed -9 {delay:.2f} s after the first partition, with {at_kill} partition(s) in the "
        f"manifest, {len(list(out.glob('part-*.parquet')))} part file(s), temporary files: {leftovers}"
    )

    rerun = command
    started = time.perf_counter()
    finished = subprocess.run(rerun, cwd=ROOT, capture_output=True, text=True)
    print(f"rerun: exit {finished.returncode} in {time.perf_counter() - started:.0f} s")
    print("\n".join(line for line in finished.stdout.splitlines() if line.startswith(("scored", "output"))))
    if finished.returncode != 0:
        print(finished.stderr[-3000:])
        raise SystemExit(1)

    expected = pl.read_parquet(data / "impressions.parquet", columns=["impression_id"])[
        "impression_id"
    ].sort()
    output = pl.read_parquet(str(out / "part-*.parquet"), columns=["impression_id", "request_id", "rank"])
    got = output["impression_id"].sort()
    duplicates = output.height - output["impression_id"].n_unique()
    missing = expected.to_frame().join(got.to_frame(), on="impression_id", how="anti").height
    ranks_ok = (
        output.group_by("request_id")
        .agg((pl.col("rank").sort() == pl.int_range(1, pl.len() + 1)).all().alias("ok"))["ok"]
        .all()
    )
    exact = got.equals(expected)
    print(
        f"input rows {len(expected):,}, output rows {output.height:,}, duplicates {duplicates}, "
        f"missing {missing}, ranks 1..n per request: {ranks_ok}, exactly one row per input row: {exact}"
    )
    raise SystemExit(0 if exact and ranks_ok else 1)


if __name__ == "__main__":
    main()
