"""Throughput of the benchmark ranking model on this machine's CPU, against a matmul roofline.

The model (recsys/configs/benchmark_mmoe.yaml): 17 sparse features of dimension 16 (16 single-id
categorical features of 8 to 200,000 ids, and one multi-hot bag of ~20 ids that shares the largest
table), 8 numeric features, MMoE with 8 experts [256, 128], towers [64], 2 tasks, batch 2048.

It prints:
* the fp32 matmul throughput measured with torch.matmul on the experts' own shapes;
* the model's FLOPs per example, counted analytically (below);
* examples/s for forward (eval mode, no grad) and for forward + backward + optimizer step (Adam on the
  dense parameters, SparseAdam on the embedding tables, which get sparse gradients);
* medians of repetitions with min-max, and the ratio to the roofline (examples/s the model would reach
  if all its FLOPs ran at the measured matmul throughput).

Run: .venv/bin/python -m benchmarks.model_bench [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.measure import (
    BATCH,
    benchmark_layout,
    flops_per_example,
    matmul_gflops,
    synthetic_batch,
    timed,
    train_step_parts,
)
from recsys.config import ModelConfig, builtin_config
from recsys.data.batch import Batch, FeatureLayout
from recsys.model import build_model


def describe(seconds: list[float]) -> tuple[float, str]:
    rates = sorted(BATCH / s for s in seconds)
    median = statistics.median(rates)
    return median, f"{median:,.0f} examples/s (min {rates[0]:,.0f}, max {rates[-1]:,.0f}, {len(rates)} reps)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions (>= 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dispatch-experts",
        type=int,
        default=32,
        help="also compare dense and dispatch top-2 gating over this many experts (0: skip)",
    )
    args = parser.parse_args()
    if args.reps < 3:
        parser.error(f"--reps: expected at least 3, got {args.reps}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig.from_yaml(builtin_config("benchmark_mmoe"))
    layout = benchmark_layout()
    generator = torch.Generator().manual_seed(0)
    batch = synthetic_batch(layout, BATCH, generator)
    model = build_model(config, layout)
    in_dim = len(layout.sparse) * config.embedding.dim + len(layout.dense)
    ids = batch.sparse.values().numel() / BATCH
    flops = flops_per_example(config, layout, ids)
    params = sum(p.numel() for p in model.parameters())
    dense_params = sum(p.numel() for n, p in model.named_parameters() if "embedding_bag" not in n)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, fp32")
    print(
        f"model: {len(layout.sparse)} sparse features x dim {config.embedding.dim} "
        f"({len(layout.tables)} tables, {params - dense_params:,} embedding parameters), {len(layout.dense)} "
        f"dense; MMoE {config.arch.num_experts} experts {list(config.arch.expert_hidden)}, towers "
        f"{list(config.arch.tower_hidden)}, {len(config.tasks)} tasks; input {in_dim}; "
        f"{dense_params:,} dense parameters; {ids:.1f} ids per example"
    )

    gflops, per_shape = matmul_gflops(config, in_dim, args.reps)
    print("\nmatmul throughput (torch.matmul, fp32, median):")
    for name, value in per_shape:
        print(f"  {name}: {value:,.1f} GFLOP/s")
    print(f"  FLOP-weighted: {gflops:,.1f} GFLOP/s")

    print("\nFLOPs per example (analytic, 2 per multiply-add):")
    for key in ("experts", "gates", "mixing", "towers", "pooling"):
        print(f"  {key:8s} {flops[key] / 1e6:8.3f} MFLOP")
    print(
        f"  forward  {flops['forward'] / 1e6:8.3f} MFLOP; forward+backward (3x) "
        f"{flops['forward_backward'] / 1e6:.3f} MFLOP"
    )

    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(batch.dense, batch.sparse)

    fwd_rate, fwd_text = describe(timed(forward, 5, args.reps))

    train, dense_opt, sparse_opt = train_step_parts(model, config)

    phases: dict[str, list[float]] = {"forward": [], "backward": [], "Adam": [], "SparseAdam": []}

    def step() -> None:
        t0 = time.perf_counter()
        loss, _ = train(batch)
        dense_opt.zero_grad(set_to_none=True)
        sparse_opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        dense_opt.step()
        t3 = time.perf_counter()
        sparse_opt.step()
        t4 = time.perf_counter()
        for key, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            phases[key].append(seconds)

    train_rate, train_text = describe(timed(step, 3, args.reps))

    roof_fwd = gflops * 1e9 / flops["forward"]
    roof_train = gflops * 1e9 / flops["forward_backward"]
    print("\nthroughput (median of reps, min-max):")
    print(f"  forward (eval, no grad):         {fwd_text}")
    print(f"    roofline {roof_fwd:,.0f} examples/s -> {fwd_rate / roof_fwd:.0%} of roofline")
    print(f"  forward+backward+Adam/SparseAdam: {train_text}")
    print(f"    roofline {roof_train:,.0f} examples/s -> {train_rate / roof_train:.0%} of roofline")
    split = ", ".join(f"{k} {statistics.median(v) * 1e3:.1f}" for k, v in phases.items())
    print(f"    per step (median ms): {split}")
    if args.dispatch_experts:
        dispatch_comparison(config, layout, batch, args.dispatch_experts, args.reps)


def dispatch_comparison(
    config: ModelConfig, layout: FeatureLayout, batch: Batch, experts: int, reps: int
) -> None:
    """Forward examples/s of noisy top-2 gating over more experts: every expert on every row, or dispatch."""
    print(f"\nnoisy top-2 over {experts} experts, forward (eval, no grad), capacity factor 1.25:")
    results = {}
    for dispatch in (False, True):
        cfg = ModelConfig.from_dict(
            {
                "tasks": [{"name": t.name} for t in config.tasks],
                "embedding": {"dim": config.embedding.dim},
                "arch": {
                    "num_experts": experts,
                    "expert_hidden": list(config.arch.expert_hidden),
                    "tower_hidden": list(config.arch.tower_hidden),
                },
                "gate": {"type": "noisy_topk", "k": 2, "dispatch": dispatch, "capacity_factor": 1.25},
            }
        )
        torch.manual_seed(0)
        model = build_model(cfg, layout).eval()

        def forward(model: torch.nn.Module = model) -> None:
            with torch.no_grad():
                model(batch.dense, batch.sparse)

        rate, text = describe(timed(forward, 2, reps))
        results[dispatch] = rate
        print(f"  {'dispatch' if dispatch else 'dense   '}: {text}")
    print(f"  dispatch / dense: {results[True] / results[False]:.2f}x")


if __name__ == "__main__":
    main()
