"""The performance benchmark's model shape, data and measurements.

Shared by ``python -m pipelines.benchmark`` (the whole table) and the scripts in ``benchmarks/``.

The shape: 16 single-id categorical features of cardinality 8 to 200,000 (log-spaced) and one multi-hot
bag of ~20 ids that shares the largest table, all of dimension 16; 8 numeric features; MMoE with 8
experts [256, 128], towers [64], 2 tasks (``recsys/configs/benchmark_mmoe.yaml``); batch 2048; fp32.

Example:
    >>> layout = benchmark_layout()
    >>> len(layout.sparse), len(layout.dense)
    (17, 8)
"""

from __future__ import annotations

import contextlib
import itertools
import platform
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import pyarrow as pa
import torch

from features.config import FeatureConfig
from recsys.config import ModelConfig
from recsys.data.batch import Batch, FeatureLayout, SparseFeature

if TYPE_CHECKING:  # the model measurements run without polars (on a GPU machine that lacks it)
    import polars as pl

BATCH = 2048
NUM_CATEGORICAL = 16
NUM_DENSE = 8
BAG_MEAN = 20
MAX_CARDINALITY = 200_000


def cpu_model() -> str:
    """The processor's name from /proc/cpuinfo (else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cardinalities() -> list[int]:
    """The 16 categorical features' cardinalities, log-spaced from 8 to 200,000."""
    return np.geomspace(8, MAX_CARDINALITY, NUM_CATEGORICAL).round().astype(int).tolist()


def benchmark_layout() -> FeatureLayout:
    """The model's input layout: ``cat_0..cat_15``, the bag ``hist`` on the largest table, ``num_0..7``."""
    sizes = cardinalities()
    sparse = [SparseFeature(f"cat_{i}", n) for i, n in enumerate(sizes)]
    sparse.append(SparseFeature("hist", sizes[-1], multi_hot=True, table=f"cat_{NUM_CATEGORICAL - 1}"))
    return FeatureLayout(
        sparse=tuple(sparse), dense=tuple(f"num_{i}" for i in range(NUM_DENSE)), labels=("click", "purchase")
    )


def synthetic_batch(layout: FeatureLayout, rows: int, generator: torch.Generator) -> Batch:
    """A batch of uniform random ids (bag lengths uniform in [10, 30], mean 20) and normal numerics."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

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


def model_ready_table(layout: FeatureLayout, rows: int, seed: int) -> pa.Table:
    """Random model-ready rows of ``layout``, as the feature pipeline writes them (numpy and Arrow only).

    Int64 id columns, a List(Int64) bag of 10 to 30 ids, Float32 numeric and label columns: the input of
    :func:`recsys.data.batch.batch_from_arrow`.
    """
    rng = np.random.default_rng(seed)
    columns: dict[str, pa.Array] = {}
    for f in layout.sparse:
        if f.multi_hot:
            offsets = np.concatenate([[0], np.cumsum(rng.integers(10, 2 * BAG_MEAN - 9, rows))])
            ids = pa.array(rng.integers(0, f.num_embeddings, int(offsets[-1])))
            columns[f.name] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), ids)
        else:
            columns[f.name] = pa.array(rng.integers(0, f.num_embeddings, rows))
    for name in layout.dense:
        columns[name] = pa.array(rng.standard_normal(rows, dtype=np.float32))
    click = rng.random(rows) < 0.1
    columns["click"] = pa.array(click.astype(np.float32))
    columns["purchase"] = pa.array((click & (rng.random(rows) < 0.2)).astype(np.float32))
    return pa.table(columns)


def make_table(rows: int, seed: int) -> pl.DataFrame:
    """Random rows of the benchmark shape (columns ``c0..c15``, ``bag``, ``x0..x7``, two labels).

    The labels depend on two features, so that training learns something and an AUC can be compared.
    """
    import polars as pl

    rng = np.random.default_rng(seed)
    sizes = cardinalities()
    columns: dict[str, object] = {f"c{i}": rng.integers(0, n, rows) for i, n in enumerate(sizes)}
    lengths = rng.poisson(BAG_MEAN, rows)
    flat = rng.integers(0, sizes[-1], int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)])  # the bag as Arrow offsets: no array per row
    columns["bag"] = pl.from_arrow(pa.LargeListArray.from_arrays(offsets, flat)).cast(pl.List(pl.Int64))
    for j in range(NUM_DENSE):
        columns[f"x{j}"] = rng.normal(size=rows)
    logit = -2.5 + 0.8 * columns["x0"] + 0.5 * (columns["c3"] % 2)
    click = rng.random(rows) < 1 / (1 + np.exp(-logit))
    columns["click"] = click.astype(np.int8)
    columns["purchase"] = (click & (rng.random(rows) < 0.2)).astype(np.int8)
    return pl.DataFrame(columns)


def feature_config() -> FeatureConfig:
    """The flat-table feature config of :func:`make_table` (hash split, 2% validation, 2% test)."""
    return FeatureConfig.from_dict(feature_config_dict())


def feature_config_dict() -> dict[str, Any]:
    """:func:`feature_config` as plain data (what a YAML feature config file holds)."""
    features = [{"name": f"c{i}", "kind": "categorical"} for i in range(NUM_CATEGORICAL)]
    features.append({"name": "bag", "kind": "multi_hot", "vocab_of": f"c{NUM_CATEGORICAL - 1}"})
    features += [
        {"name": f"x{j}", "kind": "numeric", "transforms": ["standardize"]} for j in range(NUM_DENSE)
    ]
    return {
        "name": "benchmark",
        "source": "flat",
        "rows_per_file": 100_000,
        "split": {"method": "hash", "validation_fraction": 0.02, "test_fraction": 0.02},
        "labels": [{"name": "click"}, {"name": "purchase"}],
        "features": features,
    }


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


def roofline(gflops: float, per_shape: list[tuple[str, float]], flops: dict[str, float]) -> dict[str, Any]:
    """The report's matmul rate, FLOPs per example and roofline examples/s (all FLOPs at that rate)."""
    return {
        "matmul_gflops": gflops,
        "matmul_per_shape": dict(per_shape),
        "flops_forward": flops["forward"],
        "flops_training": flops["forward_backward"],
        "roofline_prediction": gflops * 1e9 / flops["forward"],
        "roofline_training": gflops * 1e9 / flops["forward_backward"],
    }


def timed(
    fn: Callable[[], object], iters: int, reps: int, sync: Callable[[], object] | None = None
) -> list[float]:
    """Seconds per call of ``fn``, one value per repetition of ``iters`` calls (after one warm-up call).

    ``sync`` waits for the work ``fn`` queued (``torch.cuda.synchronize`` on a GPU, whose calls return
    before their kernels finish); it runs after the warm-up and at the end of every repetition.
    """
    fn()
    if sync:
        sync()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        if sync:
            sync()
        out.append((time.perf_counter() - start) / iters)
    return out


def matmul_gflops(
    config: ModelConfig,
    in_dim: int,
    reps: int,
    device: torch.device | None = None,
    iters: int = 20,
    rows: int = BATCH,
) -> tuple[float, list[tuple[str, float]]]:
    """fp32 GFLOP/s of torch.matmul on the experts' shapes for a batch of ``rows``.

    The overall figure weighs the shapes by their FLOPs.
    """
    device = device or torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    e, (h1, h2) = config.arch.num_experts, config.arch.expert_hidden[:2]
    shapes = [
        ("wide first layer (B, D) @ (D, E*H1)", (rows, in_dim), (in_dim, e * h1)),
        ("second layer (E, B, H1) @ (E, H1, H2)", (e, rows, h1), (e, h1, h2)),
    ]
    per_shape, total_flops, total_time = [], 0.0, 0.0
    for name, a_shape, b_shape in shapes:
        a, b = torch.randn(a_shape, device=device), torch.randn(b_shape, device=device)
        flops = 2 * a.numel() * b.shape[-1]  # 2 * (batch * M * K) * N
        seconds = statistics.median(timed(lambda a=a, b=b: torch.matmul(a, b), iters, reps, sync))
        per_shape.append((name, flops / seconds / 1e9))
        total_flops += flops
        total_time += seconds
    return total_flops / total_time / 1e9, per_shape


def spread(rates: list[float]) -> tuple[float, float, float]:
    """Median, min and max of some rates."""
    ordered = sorted(rates)
    return statistics.median(ordered), ordered[0], ordered[-1]


def train_step_parts(model: torch.nn.Module, config: ModelConfig) -> tuple[torch.nn.Module, Any, Any]:
    """The training wrapper, Adam on the dense parameters and SparseAdam on the tables (sparse gradients).

    Returns:
        ``(train, dense_optimizer, sparse_optimizer)``; ``train(batch)`` returns ``(loss, outputs)``.
    """
    from recsys.losses import RankingTrain
    from recsys.modules.embedding import enable_sparse_gradients

    model.train()
    train = RankingTrain.from_config(model, config)
    sparse = enable_sparse_gradients(model.sparse_arch.embedding_bag_collection)
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in train.parameters() if id(p) not in sparse_ids]
    dense_opt = torch.optim.Adam(dense, lr=1e-3, fused=True)
    return train, dense_opt, torch.optim.SparseAdam(sparse, lr=1e-3)


@contextlib.contextmanager
def sharded_training_step(
    model: str = "benchmark_mmoe",
    device: torch.device | None = None,
    batch_size: int = BATCH,
    sharding: str = "table_wise",
) -> Iterator[Callable[[], tuple[float, float, float]]]:
    """A training step of the benchmark model as a Ray Train worker runs it, in a plain loop in this process.

    The model is built by :func:`recsys.train.sharding.shard_model` (TorchRec ``DistributedModelParallel``
    over a one-process group, gloo on CPU and NCCL on a GPU, tables trained by the fused row-wise Adagrad
    applied in backward, fused Adam on the dense parameters) and steps on one synthetic batch: no Ray, no
    data loading. The gap between its examples/s and end-to-end training is what Ray and data loading cost.

    Args:
        model: the model config, a shipped name or a YAML path.
        device: where the model and the batch live (CPU by default).
        batch_size: rows of the batch.
        sharding: ``training.sharding`` of the tables (``row_wise`` needs a GPU).

    Yields:
        ``step(batch=None)``, which trains once on the synthetic batch (or on the batch given, already on
        ``device``) and returns its forward, backward (with the fused table update) and optimizer seconds;
        on a GPU those are the seconds to queue the work, not to do it.
    """
    import torch.distributed as dist

    from recsys.train.config import TrainConfig
    from recsys.train.sharding import shard_model

    device = device or torch.device("cpu")
    owned = not dist.is_initialized()
    if owned:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        config = TrainConfig.from_dict(
            {
                "features": "unused",
                "model": model,
                "group_column": "",
                "training": {"batch_size": batch_size, "main_metric": "click/auc", "sharding": sharding},
            }
        )
        layout = benchmark_layout()
        sharded = shard_model(config, layout, device)
        batch = synthetic_batch(layout, batch_size, torch.Generator().manual_seed(0)).to(device)

        def step(given: Batch | None = None) -> tuple[float, float, float]:
            t0 = time.perf_counter()
            loss, _ = sharded.dmp(batch if given is None else given)
            t1 = time.perf_counter()
            sharded.optimizer.zero_grad()
            loss.backward()  # the tables' fused optimizer runs inside backward
            t2 = time.perf_counter()
            sharded.optimizer.step()
            return t1 - t0, t2 - t1, time.perf_counter() - t2

        for _ in range(3):  # warm-up: Adam's lazy state, the allocator
            step()
        yield step
    finally:
        if owned:
            dist.destroy_process_group()


class _Sampler:
    """Calls :meth:`sample` every ``interval_s`` seconds on a background thread while the block runs."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> bool:
        """Takes one sample; False ends the sampling."""
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set() and self.sample():
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class GpuUtilization(_Sampler):
    """The GPU's utilization (% of time a kernel ran, as NVML reports it) sampled while the block runs.

    ``mean`` is the mean of the samples in percent, or None where NVML cannot be read (no pynvml).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.05) -> None:
        super().__init__(interval_s)
        self.device = device
        self.samples: list[float] = []
        self.error: str | None = None

    def sample(self) -> bool:
        """Reads the utilization once; on an error, keeps it and stops."""
        try:
            self.samples.append(float(torch.cuda.utilization(self.device)))
        except Exception as error:  # pynvml missing or NVML unreadable: report why, measure on
            self.error = f"{type(error).__name__}: {error}"
            return False
        return True

    @property
    def mean(self) -> float | None:
        """The mean utilization in percent (None: no sample)."""
        return statistics.fmean(self.samples) if self.samples else None


def _from_arrow(
    step: Callable[..., object],
    layout: FeatureLayout,
    size: int,
    device: torch.device,
    reps: int,
    iterations: Callable[[Callable[[], object]], int],
    sync: Callable[[], object] | None,
) -> dict[str, Any]:
    """Host batch construction alone, and the training step fed by it in two ways.

    Serially (one thread, no overlap), and by a read-ahead thread that builds and pins the batches, which
    are then copied to the device without blocking.
    """
    from recsys.data.batch import batch_from_arrow

    tables = [model_ready_table(layout, size, seed=i) for i in range(4)]
    turn = itertools.count()

    def build() -> Batch:
        return batch_from_arrow(tables[next(turn) % len(tables)], layout)

    def fed() -> None:
        step(build().to(device))

    def pinned(batch: Batch) -> Batch:
        if device.type != "cuda":  # page-locked memory is for copies to a GPU
            return batch
        labels = {k: v.pin_memory() for k, v in batch.labels.items()}
        return Batch(batch.dense.pin_memory(), batch.sparse.pin_memory(), labels)

    def overlapped(steps: int) -> float:
        """Seconds per step, batches built (and pinned) on a read-ahead thread, copied without blocking."""
        from recsys.data.shard import read_ahead

        source = read_ahead((pinned(build()) for _ in range(steps + 1)), depth=4)
        step(next(source).to(device, non_blocking=True))  # the thread is running from here on
        if sync:
            sync()
        started = time.perf_counter()
        for batch in source:
            step(batch.to(device, non_blocking=True))
        if sync:
            sync()
        return (time.perf_counter() - started) / steps

    build_rates = [size / s for s in timed(build, iterations(build), reps)]
    n = iterations(fed)
    fed_rates = [size / s for s in timed(fed, n, reps, sync)]
    ahead_rates = [size / overlapped(n) for _ in range(reps)]
    return {
        "batch_from_arrow": spread(build_rates),
        "training_from_arrow": spread(fed_rates),
        "training_read_ahead": spread(ahead_rates),
    }


def device_measurements(
    device: torch.device,
    batch_sizes: list[int],
    shardings: list[str],
    reps: int,
    seconds_per_rep: float = 1.0,
    model: str = "benchmark_mmoe",
) -> dict[str, Any]:
    """The model alone on ``device`` (a GPU for ``pipelines.benchmark --use-gpu``) at several batch sizes.

    For every batch size: the forward (eval, no grad) and, for every sharding of the tables, the training
    step of :func:`sharded_training_step`; for the first sharding also the host's batch construction from
    model-ready Arrow rows (``batch_from_arrow``, one thread) and the step fed by it (``_from_arrow``).
    Each as examples/s (median, min, max of ``reps`` repetitions of about ``seconds_per_rep`` each), with the
    GPU's utilization during the training repetitions and the peak memory allocated. Also the fp32 matmul
    rate on the experts' shapes and the FLOPs per example. A training step that fails leaves ``error`` in
    its row instead of the figures.
    """
    from recsys.config import builtin_config
    from recsys.model import build_model

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    config = ModelConfig.from_yaml(builtin_config(model))
    layout = benchmark_layout()
    in_dim = len(layout.sparse) * config.embedding.dim + len(layout.dense)
    # On a GPU the rate depends on the batch: measured at the largest one, the roofline of the best case.
    gflops, per_shape = matmul_gflops(config, in_dim, reps, device, 200 if cuda else 20, max(batch_sizes))
    probe = synthetic_batch(layout, BATCH, torch.Generator().manual_seed(0))
    flops = flops_per_example(config, layout, probe.sparse.values().numel() / BATCH)

    def iterations(fn: Callable[[], object]) -> int:
        """Calls of ``fn`` in about ``seconds_per_rep``."""
        once = statistics.median(timed(fn, 3, 1, sync))
        return max(3, min(2000, int(seconds_per_rep / max(once, 1e-6))))

    rows = []
    for size in batch_sizes:
        torch.manual_seed(0)
        net = build_model(config, layout).to(device).eval()
        batch = synthetic_batch(layout, size, torch.Generator().manual_seed(0)).to(device)

        def forward(net: torch.nn.Module = net, batch: Batch = batch) -> None:
            with torch.no_grad():
                net(batch.dense, batch.sparse)

        forward_rates = [size / s for s in timed(forward, iterations(forward), reps, sync)]
        del net, batch
        for sharding in shardings:
            row: dict[str, Any] = {"batch_size": size, "sharding": sharding, "forward": spread(forward_rates)}
            rows.append(row)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            try:
                with sharded_training_step(model, device, size, sharding) as step:
                    n = iterations(step)
                    with contextlib.ExitStack() as stack:
                        usage = stack.enter_context(GpuUtilization(device)) if cuda else None
                        step_rates = [size / s for s in timed(step, n, reps, sync)]
                    # the step's own peak, before the feed measurements add their batches
                    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
                    if sharding == shardings[0]:
                        row.update(_from_arrow(step, layout, size, device, reps, iterations, sync))
            except Exception as error:  # one failing sharding (out of memory, say) leaves the others' rows
                row["error"] = f"{type(error).__name__}: {error}"
                continue
            row.update(
                {
                    "training_step": spread(step_rates),
                    "steps_per_rep": n,
                    "gpu_utilization": usage.mean if usage else None,
                    "gpu_utilization_error": usage.error if usage else None,
                    "peak_memory_gib": peak,
                }
            )
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        **roofline(gflops, per_shape, flops),
        "batches": rows,
    }


class TreeMemory(_Sampler):
    """Peak memory of this process and its descendants (an embedded Ray's workers included).

    ``peak_rss`` and ``peak_pss`` are the peaks, in bytes, of the RSS and PSS (shared pages counted once)
    summed over the tree, sampled every ``interval_s`` seconds.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        super().__init__(interval_s)
        self.peak_rss = self.peak_pss = 0

    def sample(self) -> bool:
        """Sums the tree's memory once and keeps the peaks."""
        import psutil

        root = psutil.Process()
        rss = pss = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)  # shared pages counted once in all
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        return True
