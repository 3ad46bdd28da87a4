"""The Ray Data stage of a scoring run: partitions in, narrow scored rows out, on as many actors as CPUs.

One dataset over the partitions to do, mapped by :class:`ScoreStage` (``map_batches`` with a callable
class; ``concurrency`` actors, one per CPU by default, each with the model loaded once and the users,
items and click-history tables). An actor reads a partition, runs the training feature code
(:func:`recsys.package.model_ready`: :func:`features.pipeline.derived` then
:func:`features.spec.output_exprs`) and the model (``batch_size`` rows per call), and returns the key
columns and one output column per task. Ranking and writing happen on the driver
(:mod:`recsys.scoring.writer`).

With ``use_gpu`` the actors share the cluster's GPUs (:func:`actor_resources`): each runs the model on the
GPU Ray assigns it, and the feature code on its CPU as before.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from features.checks import invalid
from features.pipeline import Tables
from features.spec import FeatureSpec
from recsys.package import LoadedPackage, load_package, model_ready, output_column, score_ready
from recsys.rows import history_needs
from recsys.runtime import init_ray, model_process_env
from recsys.scoring.config import ScoreConfig
from recsys.scoring.inputs import FLAT_KEYS, Inputs
from recsys.scoring.partitions import PARTITION, READ_COLUMNS, Partition, read_partition

KEY_COLUMNS = ("impression_id", "request_id", "user_id", "item_id")


def key_columns(spec: FeatureSpec) -> tuple[str, ...]:
    """The input columns passed through to the output: :data:`KEY_COLUMNS`, or those of a flat table."""
    return FLAT_KEYS if spec.feature_config.source == "flat" else KEY_COLUMNS


# A bounded object store bounds the tables and scored blocks in flight, and so the memory.
OBJECT_STORE_BYTES = 2 * 1024**3
# Ray counts resources in steps of 1/10,000: a GPU share finer than that would round to another value.
RESOURCE_STEP = 10_000


def embedded_cpus(cpus_taken: int) -> int:
    """Logical CPUs of an embedded Ray for actors taking ``cpus_taken`` CPUs at once.

    Headroom: the actors take their CPUs, and Ray Data's own tasks need a free CPU besides, or they wait
    forever on a 2-core machine (as in :mod:`recsys.train`).
    """
    return max(os.cpu_count() or 1, cpus_taken) + 2


@dataclass(frozen=True)
class ActorResources:
    """What each scoring actor asks Ray for, and how many there are.

    Attributes:
        actors: scoring actors (at most one per partition is started).
        cpus: CPUs of each actor (its torch and polars threads).
        gpus: the GPU share of each actor; 0 runs the model on the CPU.
    """

    actors: int
    cpus: int
    gpus: float

    @property
    def device(self) -> str:
        """The torch device of the actors' model: ``cuda`` is the GPU Ray assigned to the actor."""
        return "cuda" if self.gpus > 0 else "cpu"


def actor_resources(config: ScoreConfig, cpus: int, gpus: float) -> ActorResources:
    """The scoring actors for a cluster: as configured, else one per ``threads_per_actor`` CPUs.

    With ``use_gpu``, the actors share the GPUs: each GPU takes ``ceil(actors / gpus)`` of them, each with
    that fraction of it (rounded down to Ray's step), so that every actor fits on some GPU; an actor
    never gets more than one GPU, since the model runs on one device.

    Args:
        config: the run's config (``concurrency``, ``threads_per_actor``, ``use_gpu``).
        cpus: the CPUs the actors may take: an embedded Ray's, this machine's cores (it has Ray Data's
            headroom besides, :func:`embedded_cpus`); a cluster's, its CPUs less one for Ray Data's tasks.
        gpus: the cluster's GPUs (Ray's ``GPU`` resource).

    Raises:
        ValueError: ``use_gpu`` on a cluster without a GPU, or more actors per GPU than Ray can share one
            among.

    Example:
        >>> actor_resources(ScoreConfig(model="m", input="i", output="o", use_gpu=True), cpus=16, gpus=1)
        ActorResources(actors=16, cpus=1, gpus=0.0625)
    """
    threads = config.threads_per_actor
    actors = config.concurrency if config.concurrency is not None else max(1, cpus // threads)
    if not config.use_gpu:
        return ActorResources(actors, threads, 0.0)
    devices = math.floor(gpus)  # a fractional GPU resource (a shared card) holds no whole device
    if devices < 1:
        raise ValueError(
            f"score.use_gpu: true, but the Ray cluster has no GPU (its GPU resource: {gpus:g}); "
            "score without use_gpu (--use-gpu), or on a cluster with GPUs"
        )
    per_device = math.ceil(actors / devices)
    share = math.floor(RESOURCE_STEP / per_device) / RESOURCE_STEP
    if share <= 0:  # Ray's finest share is 1 / RESOURCE_STEP of a GPU
        raise invalid("score", "concurrency", actors, f"expected at most {RESOURCE_STEP} actors per GPU")
    return ActorResources(actors, threads, share)


def plan_resources(config: ScoreConfig) -> ActorResources:
    """The scoring actors on the running Ray (inside :func:`ray_for`), by :func:`actor_resources`."""
    import ray

    cluster = ray.cluster_resources()
    if config.address or os.environ.get("RAY_ADDRESS"):
        cpus = int(cluster.get("CPU", 1)) - 1  # one CPU left to Ray Data's own tasks
    else:
        cpus = os.cpu_count() or 1
    return actor_resources(config, cpus, float(cluster.get("GPU", 0.0)))


@contextlib.contextmanager
def ray_for(config: ScoreConfig) -> Iterator[None]:
    """Ray for the block: the config's cluster, else ``RAY_ADDRESS``'s, else an embedded one, shut down after.

    A Ray already running in this process is used as it is, and left running.
    """
    taken = (config.concurrency or os.cpu_count() or 1) * config.threads_per_actor
    started = init_ray(
        "scoring",
        address=config.address,
        num_cpus=embedded_cpus(taken),
        object_store_memory=OBJECT_STORE_BYTES,
    )
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def package_files(directory: Path) -> dict[str, bytes]:
    """The package folder as bytes, so that actors on any node can rebuild it (no shared disk needed)."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _materialize(files: dict[str, bytes]) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="recsys-package-"))
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


class PartitionScorer:
    """The work of one partition, without Ray: read it, build the model's features, run the model.

    Args:
        package: the loaded model package.
        users: the users table.
        items: the items table.
        history: (H, ``HISTORY_COLUMNS``) click events for the history features.
        batch_size: rows per model call.
    """

    def __init__(
        self,
        package: LoadedPackage,
        users: pl.DataFrame,
        items: pl.DataFrame,
        history: pl.DataFrame,
        batch_size: int,
    ) -> None:
        self.package = package
        self.users = users
        self.items = items
        self.history = history
        self.batch_size = batch_size
        self.columns = {t.name: output_column(t) for t in package.model_config.tasks}
        self.every_user = history_needs(package.spec)[1].every_user
        self.keys = key_columns(package.spec)
        self.flat = package.spec.feature_config.source == "flat"

    def score(self, part: Partition) -> pa.Table:
        """(rows, keys + one column per task + ``__partition``): the scored rows of ``part``."""
        *_, (_, out) = self.steps(part)
        return out

    def steps(self, part: Partition) -> Iterator[tuple[str, Any]]:
        """The parts of :meth:`score`, each yielded as ``(name, result)`` when done (to time them)."""
        rows = read_partition(part, None if self.flat else READ_COLUMNS)
        yield "read", rows
        if self.flat:  # one table: its rows are the model's input, no history
            yield from self._model_steps(part, model_ready(self.package.spec, Tables(rows.lazy()), self.keys))
            return
        # A row's history features read events strictly before its ts, and only its own user's unless an
        # affinity feature counts everybody's: the rest need not be derived.
        history = self.history.filter(pl.col("ts") < rows["ts"].max())
        if not self.every_user:
            users = rows["user_id"].drop_nulls().unique().implode()
            history = history.filter(pl.col("user_id").is_in(users))
        yield "history", history
        tables = Tables(rows.lazy(), self.users.lazy(), self.items.lazy(), history.lazy())
        yield from self._model_steps(part, model_ready(self.package.spec, tables))

    def _model_steps(self, part: Partition, frame: pl.DataFrame) -> Iterator[tuple[str, Any]]:
        """The steps of :meth:`steps` from the model-ready rows on."""
        yield "features", frame
        ready = frame.to_arrow()
        yield "to_arrow", ready
        scores = score_ready(self.package, ready, self.batch_size)
        yield "model", scores
        out = ready.select(list(self.keys)).append_column(
            PARTITION, pa.array(np.full(ready.num_rows, part.index, np.int64))
        )
        for task, column in self.columns.items():
            out = out.append_column(column, pa.array(scores[task], pa.float64()))
        yield "output", out


class ScoreStage:
    """Ray Data stage: partition specs in; per partition, key columns and one ``p_<task>`` per task out.

    Each actor does all the work of a partition (:class:`PartitionScorer`): it reads the rows, runs the
    training feature code (:func:`recsys.package.model_ready`) and the model
    (:func:`recsys.package.score_ready`, ``batch_size`` rows per call). The model is rebuilt once per actor
    from the package bytes in the object store; the users, items and click-history tables are fetched once
    per actor. The feature rows never leave the actor: only the narrow scored rows go to the driver.

    One stage rather than a feature stage feeding a model stage: two stages' actors fight over the cores
    of a small machine, and every feature block would be copied through the object store.

    Args:
        shared: object references of ``package`` (file name -> bytes) and the ``users``, ``items`` and
            ``history`` Arrow tables.
        batch_size: rows per model call.
        threads: torch threads of the actor.
        device: where the model runs: ``cpu``, or ``cuda`` (the GPU Ray assigned to this actor, the only
            one it sees).
        precision: ``embedding_dtype`` and ``compute_dtype`` for :func:`recsys.package.load_package`.

    Raises:
        RuntimeError: ``cuda`` and this actor's torch sees no CUDA device.
    """

    def __init__(
        self,
        shared: dict[str, Any],
        batch_size: int,
        threads: int,
        device: str = "cpu",
        precision: dict[str, Any] | None = None,
    ) -> None:
        import ray
        import torch

        torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"score.use_gpu: this scoring actor sees no CUDA device (torch {torch.__version__}, CUDA "
                f"{torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
            )
        package_dir = _materialize(ray.get(shared["package"]))
        package = load_package(package_dir, map_location=device, **(precision or {}))
        shutil.rmtree(package_dir, ignore_errors=True)
        tables = {k: pl.from_arrow(ray.get(shared[k])) for k in ("users", "items", "history")}
        self.scorer = PartitionScorer(
            package, tables["users"], tables["items"], tables["history"], batch_size
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        """Yields (rows, keys + one column per task + ``__partition``) Arrow tables, one per partition."""
        for raw in batch["partition"]:
            yield self.scorer.score(Partition.from_json(raw))


def scored_frames(
    config: ScoreConfig,
    resources: ActorResources,
    package: dict[str, bytes],
    inputs: Inputs,
    work: list[Partition],
) -> Iterator[pl.DataFrame]:
    """The Ray Data pipeline: partitions -> :class:`ScoreStage` -> scored rows (inside :func:`ray_for`).

    ``resources`` (:func:`plan_resources`) sizes the actor pool and says what each actor asks Ray for.

    Yields:
        (B, keys + one column per task + ``__partition``) frames, in no particular order.
    """
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one bar per operator floods the screen; ours is per partition
    context.print_on_execution_start = False
    tables = {"users": inputs.users, "items": inputs.items, "history": inputs.history}
    shared = {"package": ray.put(package)} | {k: ray.put(v.to_arrow()) for k, v in tables.items()}
    threads = resources.cpus
    specs = [{"partition": p.to_json()} for p in work]
    kwargs = {
        "shared": shared,
        "batch_size": config.batch_size,
        "threads": threads,
        "device": resources.device,
        "precision": {"embedding_dtype": config.embedding_dtype, "compute_dtype": config.compute_dtype},
    }
    dataset = ray.data.from_items(specs, override_num_blocks=len(specs)).map_batches(
        ScoreStage,
        fn_constructor_kwargs=kwargs,
        batch_size=1,  # one partition per call
        batch_format="numpy",
        # One partition per actor at a time: a partition queued behind a busy actor while another is
        # idle (or still starting) would leave a core idle for a whole partition.
        compute=ray.data.ActorPoolStrategy(
            size=min(resources.actors, len(specs)), max_tasks_in_flight_per_actor=1
        ),
        num_cpus=threads,
        num_gpus=resources.gpus,  # 0, or this actor's share of a GPU: Ray sets its CUDA_VISIBLE_DEVICES
        # Polars sizes its thread pool when imported: set before the actor's process starts.
        runtime_env={
            "env_vars": {
                "POLARS_MAX_THREADS": str(threads),
                "OMP_NUM_THREADS": str(threads),
                **model_process_env(),
            }
        },
    )
    # Closing this generator closes Ray Data's iterator at once, which stops the executor and its actors
    # while Ray is up; left to the garbage collector, that could happen after ray.shutdown().
    batches = iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
    with contextlib.closing(batches):  # a generator: it has close()
        for batch in batches:
            yield pl.from_arrow(batch)
