"""Which threads on this machine wake up, how often, and how often the busy ones are preempted.

Reads ``/proc/*/task/*/status`` and ``stat`` twice, ``--span`` seconds apart (after ``--delay``), and
prints per thread: voluntary context switches per second (wake-ups after sleeping), involuntary ones
(preempted while runnable) and CPU %. Run it beside a training run to see what preempts the training
threads; README (Benchmark, "Where the embedded Ray path lost time") has what it showed.

Usage::

    python benchmarks/thread_wakeups.py --delay 25 --span 10 &
    python -m pipelines.train ...
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path


def snapshot() -> dict[str, tuple[str, int, int, int]]:
    """Per ``/proc/PID/task/TID``: ``process/thread`` name, voluntary and involuntary switches, CPU ticks."""
    out = {}
    for task in glob.glob("/proc/[0-9]*/task/[0-9]*"):
        try:
            status = Path(task, "status").read_text()
            thread = Path(task, "comm").read_text().strip()
            process = Path("/proc", task.split("/")[2], "comm").read_text().strip()
            fields = Path(task, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended between listing and reading
            continue
        switches = [int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line]
        out[task] = (f"{process}/{thread}", switches[0], switches[1], int(fields[11]) + int(fields[12]))
    return out


def main(argv: list[str] | None = None) -> int:
    """Prints the threads with the most wake-ups and the most preemptions."""
    parser = argparse.ArgumentParser(prog="python benchmarks/thread_wakeups.py", description=__doc__)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait first (0)")
    parser.add_argument("--span", type=float, default=10.0, help="seconds between the two readings (10)")
    parser.add_argument("--top", type=int, default=15, help="threads listed (15)")
    args = parser.parse_args(argv)
    time.sleep(args.delay)
    before, started = snapshot(), time.time()
    time.sleep(args.span)
    after, span = snapshot(), time.time() - started
    ticks = os.sysconf("SC_CLK_TCK")
    rows = []
    for task, (name, vol, invol, cpu) in after.items():
        if task in before:
            _, vol0, invol0, cpu0 = before[task]
            pid = task.split("/")[2]
            cpu_percent = 100 * (cpu - cpu0) / ticks / span
            rows.append(((vol - vol0) / span, (invol - invol0) / span, cpu_percent, pid, name))
    print(f"over {span:.1f} s: voluntary (wake-ups) / involuntary (preempted) switches per second, CPU %")
    print("most wake-ups:")
    for vol, invol, cpu, pid, name in sorted(rows, reverse=True)[: args.top]:
        print(f"  {vol:7.0f} {invol:7.0f} {cpu:5.0f}%  {pid} {name}")
    print("most preempted:")
    for vol, invol, cpu, pid, name in sorted(rows, key=lambda r: -r[1])[:5]:
        print(f"  {vol:7.0f} {invol:7.0f} {cpu:5.0f}%  {pid} {name}")
    wakeups, preemptions = sum(r[0] for r in rows), sum(r[1] for r in rows)
    print(f"all threads: {wakeups:,.0f} wake-ups/s, {preemptions:,.0f} preemptions/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
