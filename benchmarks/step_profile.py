"""Where a training step of the benchmark model goes: a plain loop over the same sharded model as training.

The model is built exactly as a Ray Train worker builds it (``recsys.train.sharding.shard_model``: TorchRec
``DistributedModelParallel`` over a one-process gloo group, tables trained by the fused row-wise Adagrad
applied in backward, Adam on the dense parameters), but the loop is a plain Python loop over one synthetic
batch: no Ray, no data loading. Its examples/s is the ceiling of the end-to-end training path with the same
threads, and the gap to ``python -m pipelines.benchmark``'s end-to-end number is what Ray and data
loading cost.

It prints examples/s (median of --reps repetitions of --steps steps, min-max), the forward / backward /
optimizer split, and torch.profiler's top operators by self CPU time.

Run: .venv/bin/python -m benchmarks.step_profile [--threads 2] [--reps 3] [--steps 10] [--top 25]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.measure import BATCH, sharded_training_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="steps per repetition")
    parser.add_argument("--top", type=int, default=25, help="operators shown from the profile (0: none)")
    parser.add_argument("--model", default="benchmark_mmoe", help="model config name or YAML path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with sharded_training_step(args.model) as step:
        rates, parts = [], []
        for _ in range(args.reps):
            start = time.perf_counter()
            parts += [step() for _ in range(args.steps)]
            rates.append(BATCH * args.steps / (time.perf_counter() - start))
        rates.sort()
        fwd, bwd, opt = (statistics.median(p[i] for p in parts) * 1e3 for i in range(3))
        print(f"torch {torch.__version__}, {args.threads} threads, batch {BATCH}, model {args.model}")
        print(
            f"training step (DMP, fused row-wise Adagrad, fused Adam): {statistics.median(rates):,.0f} "
            f"examples/s (min {rates[0]:,.0f}, max {rates[-1]:,.0f}, {args.reps} reps of {args.steps} steps)"
        )
        print(
            f"per step (median ms): forward {fwd:.1f}, "
            f"backward + fused table update {bwd:.1f}, Adam {opt:.1f}"
        )
        if args.top:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    step()
            print(f"\ntorch.profiler, {args.steps} steps, top {args.top} operators by self CPU time:")
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
            print(table)


if __name__ == "__main__":
    from recsys.runtime import reexec_with_model_env

    reexec_with_model_env()  # the same allocator settings as the Ray workers
    main()
