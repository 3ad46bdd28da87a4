"""Which threads on this machine wake up, how often, and how often the busy ones are preempted.

Reads ``/proc/*/task/*/status`` and ``schedstat`` twice, ``--span`` seconds apart (after ``--delay``),
and prints per thread: voluntary context switches per second (wake-ups after sleeping), involuntary ones
(preempted while runnable), the share of the time it ran on a CPU and the share it was runnable but
waited for one (the rest it slept). Run it beside a training run to see what preempts the training
threads; README (Benchmark, "Where the embedded Ray path lost time") has what it showed.

Usage::

    python -m benchmarks.thread_wakeups --delay 25 --span 10 &
    python -m pipelines.train ...
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path


def snapshot() -> dict[str, tuple[str, int, int, int, int]]:
    """Per ``/proc/PID/task/TID``: ``process/thread`` name, voluntary and involuntary switches, and the
    nanoseconds it ran and waited to run (``schedstat``)."""
    out = {}
    for task in glob.glob("/proc/[0-9]*/task/[0-9]*"):
        try:
            status = Path(task, "status").read_text()
            thread = Path(task, "comm").read_text().strip()
            process = Path("/proc", task.split("/")[2], "comm").read_text().strip()
            ran, waited, _ = (int(x) for x in Path(task, "schedstat").read_text().split())
        except OSError:  # the thread ended between listing and reading
            continue
        switches = [int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line]
        out[task] = (f"{process}/{thread}", switches[0], switches[1], ran, waited)
    return out


def main(argv: list[str] | None = None) -> int:
    """Prints the threads with the most wake-ups and the most preemptions."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.thread_wakeups", description=__doc__)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait first (0)")
    parser.add_argument("--span", type=float, default=10.0, help="seconds between the two readings (10)")
    parser.add_argument("--top", type=int, default=15, help="threads listed (15)")
    args = parser.parse_args(argv)
    time.sleep(args.delay)
    before, started = snapshot(), time.time()
    time.sleep(args.span)
    after, span = snapshot(), time.time() - started
    rows = []
    for task, (name, vol, invol, ran, waited) in after.items():
        if task in before:
            _, vol0, invol0, ran0, waited0 = before[task]
            per_s = [(vol - vol0) / span, (invol - invol0) / span]
            shares = [100 * (ran - ran0) / 1e9 / span, 100 * (waited - waited0) / 1e9 / span]
            rows.append((*per_s, *shares, task.split("/")[2], name))
    header = "wake-ups/s preempted/s  on CPU  waiting  pid process/thread"
    print(f"over {span:.1f} s; 'waiting': runnable, but another thread had the CPU")

    def show(title: str, chosen: list[tuple]) -> None:
        print(f"{title}:\n  {header}")
        for vol, invol, ran, waited, pid, name in chosen:
            print(f"  {vol:10.0f} {invol:11.0f} {ran:6.1f}% {waited:7.1f}%  {pid} {name}")

    show("busiest", sorted(rows, key=lambda r: -r[2])[:5])
    show("most wake-ups", sorted(rows, reverse=True)[: args.top])
    wakeups, preemptions = sum(r[0] for r in rows), sum(r[1] for r in rows)
    print(f"all threads: {wakeups:,.0f} wake-ups/s, {preemptions:,.0f} preemptions/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
