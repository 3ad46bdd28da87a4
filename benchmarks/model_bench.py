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

Run: .venv/bin/python benchmarks/model_bench.py [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.config import ModelConfig, builtin_config
from recsys.data import Batch, FeatureLayout, SparseFeature
from recsys.embedding import enable_sparse_gradients
from recsys.losses import RankingTrain
from recsys.model import build_model

BATCH = 2048
NUM_CATEGORICAL = 16
NUM_DENSE = 8
BAG_MEAN = 20


def benchmark_layout() -> FeatureLayout:
    """16 categorical features, cardinalities log-spaced from 8 to 200,000, and a bag on the largest table."""
    sizes = np.geomspace(8, 200_000, NUM_CATEGORICAL).round().astype(int).tolist()
    sparse = [SparseFeature(f"cat_{i}", n) for i, n in enumerate(sizes)]
    sparse.append(SparseFeature("hist", sizes[-1], multi_hot=True, table=f"cat_{NUM_CATEGORICAL - 1}"))
    return FeatureLayout(
        sparse=tuple(sparse), dense=tuple(f"num_{i}" for i in range(NUM_DENSE)), labels=("click", "purchase")
    )


def synthetic_batch(layout: FeatureLayout, rows: int, generator: torch.Generator) -> Batch:
    """Uniform random ids; bag lengths uniform in [10, 30] (mean 20)."""
    values, lengths = [], []
    for f in layout.sparse:
        n = (
            torch.randint(10, 2 * BAG_MEAN - 9, (rows,), generator=generator)
            if f.multi_hot
            else torch.ones(rows, dtype=torch.int64)
        )
        values.append(torch.randint(0, f.num_embeddings, (int(n.sum()),), generator=generator))
        lengths.append(n)
    sparse = KeyedJaggedTensor(keys=layout.keys, values=torch.cat(values), lengths=torch.cat(lengths))
    labels = {"click": (torch.rand(rows, generator=generator) < 0.1).float()}
    labels["purchase"] = labels["click"] * (torch.rand(rows, generator=generator) < 0.2).float()
    return Batch(torch.randn(rows, len(layout.dense), generator=generator), sparse, labels)


def flops_per_example(config: ModelConfig, layout: FeatureLayout, ids_per_example: float) -> dict[str, float]:
    """Forward FLOPs of one example, counted from the layer shapes: 2 per multiply-add.

    Counted: every matmul (experts, gates, towers: 2 * fan_in * fan_out per layer), the gate mixing
    (2 * E * H per task) and the embedding pooling (D adds per looked-up id). Not counted: biases,
    activations, softmax, the concatenation (a few % at most). Backward: 2x the forward matmuls
    (gradients with respect to the inputs and to the weights; the input gradient of the first layer is
    needed because the embeddings train), so forward + backward = 3x forward.
    """
    arch, d = config.arch, config.embedding.dim
    in_dim = len(layout.sparse) * d + len(layout.dense)
    tasks = len(config.tasks)
    sizes = [in_dim, *arch.expert_hidden]
    experts = arch.num_experts * sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    gates = tasks * 2 * in_dim * arch.num_experts
    mixing = tasks * 2 * arch.num_experts * arch.expert_hidden[-1]
    tower_sizes = [arch.expert_hidden[-1], *arch.tower_hidden, 1]
    towers = tasks * sum(2 * a * b for a, b in zip(tower_sizes[:-1], tower_sizes[1:], strict=True))
    pooling = ids_per_example * d
    total = experts + gates + mixing + towers + pooling
    return {
        "experts": experts,
        "gates": gates,
        "mixing": mixing,
        "towers": towers,
        "pooling": pooling,
        "forward": total,
        "forward_backward": 3 * total,
    }


def timed(fn: Callable[[], object], iters: int, reps: int) -> list[float]:
    """Seconds per call of ``fn``, one value per repetition of ``iters`` calls (after one warm-up rep)."""
    fn()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        out.append((time.perf_counter() - start) / iters)
    return out


def matmul_gflops(config: ModelConfig, in_dim: int, reps: int) -> tuple[float, list[tuple[str, float]]]:
    """fp32 GFLOP/s of torch.matmul on the experts' shapes; the overall figure weighs them by their FLOPs."""
    e, (h1, h2) = config.arch.num_experts, config.arch.expert_hidden[:2]
    shapes = [
        ("wide first layer (B, D) @ (D, E*H1)", torch.randn(BATCH, in_dim), torch.randn(in_dim, e * h1)),
        ("second layer (E, B, H1) @ (E, H1, H2)", torch.randn(e, BATCH, h1), torch.randn(e, h1, h2)),
    ]
    per_shape, total_flops, total_time = [], 0.0, 0.0
    for name, a, b in shapes:
        flops = 2 * a.numel() * b.shape[-1]  # 2 * (batch * M * K) * N
        seconds = statistics.median(timed(lambda a=a, b=b: torch.matmul(a, b), 20, reps))
        per_shape.append((name, flops / seconds / 1e9))
        total_flops += flops
        total_time += seconds
    return total_flops / total_time / 1e9, per_shape


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

    model.train()
    train = RankingTrain.from_config(model, config)
    sparse_params = enable_sparse_gradients(model.sparse_arch.embedding_bag_collection)
    sparse_ids = {id(p) for p in sparse_params}
    dense_opt = torch.optim.Adam([p for p in train.parameters() if id(p) not in sparse_ids], lr=1e-3)
    sparse_opt = torch.optim.SparseAdam(sparse_params, lr=1e-3)

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
