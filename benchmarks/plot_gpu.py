"""Plots `pipelines.benchmark --use-gpu` reports: training examples/s and GPU utilization by batch size.

Usage::

    python -m benchmarks.plot_gpu --out experiments/results/benchmark/gpu_h200.png \\
        fp32=experiments/results/benchmark/h200_fp32_run1.json \\
        tf32=experiments/results/benchmark/h200_tf32_run3.json

Each ``LABEL=FILE`` adds, for the report's first sharding, the training step (median with min-max) and,
where the report has them, the step fed by batches built on the host (serially, and by a read-ahead
thread); the right panel shows the GPU's utilization during the step. A grey dashed line marks the
issue's target of 1M training examples/s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Draws the figure."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot_gpu", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("reports", nargs="+", help="LABEL=benchmark_gpu.json")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate_ax, util_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    device = ""
    for spec in args.reports:
        label, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"reports: expected LABEL=FILE of an existing file, got {spec!r}")
        report = json.loads(Path(path).read_text())
        device = report.get("device", device)
        first = report["batches"][0]["sharding"]
        rows = [r for r in report["batches"] if r["sharding"] == first and "training_step" in r]
        sizes = [r["batch_size"] for r in rows]
        median = [r["training_step"][0] for r in rows]
        low = [m - r["training_step"][1] for m, r in zip(median, rows, strict=True)]
        high = [r["training_step"][2] - m for m, r in zip(median, rows, strict=True)]
        step_label = f"{label}: step"
        line = rate_ax.errorbar(sizes, median, yerr=[low, high], marker="o", capsize=3, label=step_label)
        color = line[0].get_color()
        for key, style, text in (
            ("training_from_arrow", ":", "fed serially"),
            ("training_read_ahead", "--", "read-ahead"),
        ):
            fed = [r[key][0] for r in rows if key in r]
            if len(fed) == len(rows):
                rate_ax.plot(sizes, fed, marker="x", ls=style, color=color, label=f"{label}: {text}")
        util_ax.plot(sizes, [r["gpu_utilization"] for r in rows], marker="o", label=label)
    rate_ax.axhline(1e6, color="grey", ls="--", lw=1, label="target 1M/s")
    for ax in (rate_ax, util_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    rate_ax.set_yscale("log")
    rate_ax.set_ylabel("training examples/s (DMP step, one GPU)")
    util_ax.set_ylabel("GPU utilization during the step (%)")
    util_ax.set_ylim(0, 105)
    fig.suptitle(f"benchmark_mmoe on {device}: training throughput by batch size")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
