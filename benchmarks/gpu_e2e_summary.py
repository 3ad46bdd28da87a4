"""Sums up an end-to-end GPU check (benchmarks/gpu_e2e.sh): each step's wall time, the GPU's utilization
while it ran, and what training and scoring said of themselves.

Reads OUT/steps.txt (``name start_ns end_ns status`` per step), OUT/dmon.log (``nvidia-smi dmon -s u -o T``)
and OUT/e2e.log (the steps' own output), and SCORES (the scoring output: its manifest and part files);
prints one line per step and writes OUT/summary.json.

Run: python -m benchmarks.gpu_e2e_summary OUT [SCORES ...]
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from pathlib import Path

STORY = re.compile(r"(examples/s|rows/s|auc|registered|version|rows in|rows out|calibration)", re.IGNORECASE)


def steps(out: Path) -> list[dict]:
    """The steps that ran: name, start and end (epoch seconds), exit status."""
    rows = []
    for line in (out / "steps.txt").read_text().splitlines():
        name, start, end, status = line.split()
        rows.append({"step": name, "start": int(start) / 1e9, "end": int(end) / 1e9, "status": int(status)})
    return rows


def gpu_samples(out: Path, day: dt.date) -> list[tuple[float, float]]:
    """(epoch seconds, SM utilization %) of each dmon sample (its clock, on ``day``, local time)."""
    samples = []
    path = out / "dmon.log"
    if not path.exists():
        return samples
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 3 or line.startswith("#") or not re.fullmatch(r"\d\d:\d\d:\d\d", parts[0]):
            continue
        try:
            sm = float(parts[2])  # Time gpu sm mem enc dec ...
        except ValueError:
            continue
        clock = dt.datetime.combine(day, dt.time.fromisoformat(parts[0]))
        samples.append((clock.timestamp(), sm))
    return samples


def steady_scoring(scores: Path) -> dict | None:
    """Rows per second between the first and the last part file written (their modification times).

    Leaves out what comes before the first partition is written: Ray's start, the actors' start (torch,
    CUDA, the model), and the first partition's own work.
    """
    manifest = scores / "manifest.json"
    if not manifest.exists():
        return None
    parts = json.loads(manifest.read_text())["partitions"].values()
    written = sorted(((scores / p["file"]).stat().st_mtime, p["rows_out"]) for p in parts)
    if len(written) < 2:
        return None
    seconds = written[-1][0] - written[0][0]
    rows = sum(rows for _, rows in written[1:])
    return {
        "partitions": len(written),
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_s": rows / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    """Prints and writes the summary of the check whose results are in ``argv[0]``."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m benchmarks.gpu_e2e_summary OUT [SCORES ...]", file=sys.stderr)
        return 2
    out = Path(args[0])
    steady = {name: steady_scoring(Path(name)) for name in args[1:]}
    ran = steps(out)
    day = dt.datetime.fromtimestamp(ran[0]["start"]).date() if ran else dt.date.today()
    samples = gpu_samples(out, day)
    print("step          seconds  GPU SM util mean / max (dmon, 1 s)")
    for row in ran:
        inside = [sm for t, sm in samples if row["start"] <= t <= row["end"]]
        row["seconds"] = round(row["end"] - row["start"], 1)
        row["gpu_sm_mean"] = round(sum(inside) / len(inside), 1) if inside else None
        row["gpu_sm_max"] = max(inside) if inside else None
        util = f"{row['gpu_sm_mean']}% / {row['gpu_sm_max']}%" if inside else "-"
        print(f"{row['step']:<12} {row['seconds']:>8}  {util}   exit {row['status']}")
    lines = (out / "e2e.log").read_text().splitlines()
    said = [line for line in lines if STORY.search(line) and not line.startswith((" ", '"', "{"))]
    print("\n".join(said[-40:]))
    for name, rate in steady.items():
        if rate:
            print(
                f"{name}: between the first and the last part file {rate['rows']:,} rows in "
                f"{rate['seconds']} s, {rate['rows_per_s']:,.0f} rows/s ({rate['partitions']} partitions)"
            )
    summary = {"steps": ran, "story": said, "steady_scoring": steady}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
