"""Benchmark: fit + transform (``build``) of N generated impressions with every derived feature.

    python -m benchmarks.features_bench --impressions 10000000 [--data DIR] [--repeat 3] [--config NAME]

Generates the data once (cached in ``--data``), then runs ``features.pipeline.build`` with a shipped
feature config (``ecommerce`` by default: joins, time features, history lists, windowed click counts,
vocabularies, numeric statistics, writing model-ready Parquet; ``ecommerce_affinity`` adds the affinity
features) ``--repeat`` times, each in a fresh child process, so that the peak RSS it reports is that of
one build alone (``ru_maxrss`` of the child). Reports the median wall time and rows/s with min-max over
the repetitions. Reading the input and writing the output are included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synth.worlds import WORLDS

CHILD = """
import json, sys, time
from features.config import FeatureConfig, builtin_config
from features.pipeline import build, load_tables
t = time.perf_counter()
spec, result = build(FeatureConfig.from_yaml(builtin_config(sys.argv[3])), load_tables(sys.argv[1]),
                     sys.argv[2], overwrite=True, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "rows": result.rows}))
"""


def run_once(data: Path, out: Path, config: str = "ecommerce") -> tuple[float, dict[str, int], float]:
    """One build in a child process: (seconds, rows per split, peak RSS in GiB of that child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(data), str(out), config], capture_output=True, text=True, check=True
    )
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # RUSAGE_CHILDREN holds the largest child so far; each run is at least as large as the first.
    peak = max(peak_kib, before) / 2**20
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report["seconds"], report["rows"], peak


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--impressions", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--world", choices=tuple(WORLDS), default="default", help="the generator's truth model"
    )
    parser.add_argument("--data", type=Path, default=None, help="cache folder for the generated data")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--config",
        default="ecommerce",
        help="the shipped feature config to build (ecommerce_affinity: with the affinity features)",
    )
    args = parser.parse_args()

    world = "" if args.world == "default" else f"-{args.world}"
    data = args.data or Path(tempfile.gettempdir()) / f"recsys-bench-{args.impressions}-{args.seed}{world}"
    if not (data / "impressions.parquet").exists():
        from synth.generate import generate

        t = time.perf_counter()
        generate(data, args.impressions, args.seed, world=args.world)
        print(f"generated {args.impressions:,} impressions in {time.perf_counter() - t:.1f} s -> {data}")
    out = Path(tempfile.mkdtemp(prefix="recsys-bench-features-"))
    try:
        runs = [run_once(data, out / "features", args.config) for _ in range(args.repeat)]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    seconds = [r[0] for r in runs]
    rows = sum(runs[0][1].values())
    rates = [rows / s for s in seconds]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"fit+transform (build) of {rows:,} impressions, {args.config} config, {args.repeat} runs:")
    med_s, med_r = statistics.median(seconds), statistics.median(rates)
    print(f"  wall time  median {med_s:6.2f} s   (min {min(seconds):.2f}, max {max(seconds):.2f})")
    print(f"  rows/s     median {med_r:,.0f}   (min {min(rates):,.0f}, max {max(rates):,.0f})")
    print(f"  peak RSS   {max(r[2] for r in runs):.2f} GiB (largest child process)")
    print(f"  splits     {runs[0][1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
