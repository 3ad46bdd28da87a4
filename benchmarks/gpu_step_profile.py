"""Where a training step of the benchmark model spends its time on a GPU, at a few batch sizes.

For each batch size: the step of ``benchmarks.measure.sharded_training_step`` (DMP over a one-process NCCL
group, fused row-wise Adagrad on the tables, fused Adam) is timed with a synchronize per step, then run
under ``torch.profiler`` (CPU and CUDA). Printed: wall ms per step, GPU kernel ms per step (the sum of the
kernels' device time), kernel launches per step, and the operators with the most CPU time of their own
and the most GPU time. When the kernel time is far below the wall time the step is bound by the host
(Python, dispatch and launches), and a larger batch buys examples at no extra host time.

Usage (on a GPU machine; benchmarks/gpu_device_run.sh shows how to install TorchRec there)::

    python -m benchmarks.gpu_step_profile --batch-sizes 2048 65536
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    """Times and profiles the step at each batch size."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_step_profile", description=__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2048, 65536])
    parser.add_argument("--steps", type=int, default=30, help="profiled steps per batch size (30)")
    parser.add_argument("--rows", type=int, default=20, help="operators listed per table (20)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(f"gpu_step_profile: torch {torch.__version__} sees no CUDA device")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.measure import sharded_training_step

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    for size in args.batch_sizes:
        with sharded_training_step(device=device, batch_size=size) as step:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
            started = time.perf_counter()
            host = 0.0
            for _ in range(args.steps):
                host += sum(step())
            torch.cuda.synchronize()
            wall = (time.perf_counter() - started) / args.steps
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    step()
                torch.cuda.synchronize()
        events = prof.key_averages()
        # The device time of the kernels (and copies) themselves, as the table's "Self CUDA time total"
        # counts it: CUDA events that are not user annotations, which span the kernels they hold.
        kernel_us = (
            sum(
                e.self_device_time_total
                for e in events
                if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            )
            / args.steps
        )
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel"))
        print(
            f"\n=== batch {size:,}: wall {wall * 1e3:.2f} ms/step ({size / wall:,.0f} examples/s); "
            f"host time to queue the step {host / args.steps * 1e3:.2f} ms; GPU kernels "
            f"{kernel_us / 1e3:.2f} ms/step; {launches / args.steps:.0f} kernel launches/step"
        )
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
