"""Training steps of the benchmark model in fp32 and bf16 (``training.precision``), interleaved.

One process, a gloo group of one, TorchRec's DMP as a training worker holds it (tables sharded table-wise
on the one rank), the benchmark model (recsys/configs/benchmark_mmoe.yaml, batch 2048): the sharded
``train_step`` of each precision on the same random batches, repetitions interleaved, medians with min-max.

Run: .venv/bin/python -m benchmarks.precision_bench [--steps 20] [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from benchmarks.measure import BATCH, benchmark_layout, synthetic_batch
from recsys.config import builtin_config
from recsys.precision import bf16_supported
from recsys.train.config import TrainConfig
from recsys.train.sharding import shard_model
from recsys.train.worker import train_step


def main() -> None:
    """Prints examples/s of the sharded training step per precision."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repetition")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per precision, interleaved")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        layout = benchmark_layout()
        generator = torch.Generator().manual_seed(0)
        batches = [synthetic_batch(layout, BATCH, generator) for _ in range(4)]
        models = {}
        for precision in ("fp32", "bf16"):
            config = TrainConfig.from_dict(
                {
                    "features": tmp,
                    "model": str(builtin_config("benchmark_mmoe")),
                    "training": {"precision": precision},
                }
            )
            models[precision] = shard_model(config, layout, torch.device("cpu"))
            for b in batches:  # warm-up
                train_step(models[precision], b)
        rates: dict[str, list[float]] = {p: [] for p in models}
        for _ in range(args.reps):
            for precision, sharded in models.items():
                started = time.perf_counter()
                for s in range(args.steps):
                    losses, _ = train_step(sharded, batches[s % len(batches)])
                float(losses["loss"])
                rates[precision].append(args.steps * BATCH / (time.perf_counter() - started))
        dist.destroy_process_group()
    print(f"CPU bf16 units: {bf16_supported(torch.device('cpu'))}; threads {args.threads}; batch {BATCH}")
    for precision, values in rates.items():
        print(
            f"{precision}: {statistics.median(values):,.0f} examples/s "
            f"(min {min(values):,.0f}, max {max(values):,.0f}, {len(values)} reps of {args.steps} steps)"
        )
    print(f"bf16 / fp32: {statistics.median(rates['bf16']) / statistics.median(rates['fp32']):.2f}")


if __name__ == "__main__":
    main()
