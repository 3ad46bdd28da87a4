"""The driver of a training run: validate, resolve the run's folder, record, train on Ray, summarise.

:func:`run_training` reads top to bottom: it checks its inputs, picks the run's folder (a new one, or the
latest for ``--resume``), opens the run's record (:class:`~recsys.train.recorder.RunRecorder`, the only
MLflow caller of training), starts Ray (:func:`recsys.runtime.init_ray`), builds a Ray Train
``TorchTrainer`` whose workers run :func:`recsys.train.worker.train_loop_per_worker`, fits it, and returns
the recorder's summary. Ray Train restarts failed workers from the latest checkpoint (``FailureConfig``), on
as many workers as fit when the run is elastic (``run.num_workers: [min, max]``).

Example:
    >>> config = TrainConfig.from_yaml(builtin_train_config("train_demo"))  # doctest: +SKIP
    >>> run_training(config).summary.test["test/click/auc"]  # doctest: +SKIP
    0.712
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from features.console import story
from recsys.train.checkpoints import checkpoint_files, read_checkpoint_file
from recsys.train.config import TrainConfig
from recsys.train.state import WorkerSettings
from recsys.train.summary import TrainingSummary

SPLIT_DIRS = ("train", "valid", "test")
INGEST_OBJECT_STORE_BYTES = 1 << 30  # Ray Data's read-ahead for training, all workers together


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        run_name: the run's name under ``run.storage_path``.
        storage: the run's folder (checkpoints, ``model/``, ``test_predictions.parquet``).
        summary: test metrics, the kept epoch and its validation metric, the MLflow run and the registered
            version.
    """

    run_name: str
    storage: Path
    summary: TrainingSummary


def run_training(
    config: TrainConfig,
    *,
    tracking_uri: str | None = None,
    require_tracking: bool = False,
    resume: bool = False,
    callbacks: list[Any] | None = None,
    start_from: str | Path | None = None,
    register: bool = True,
) -> TrainResult:
    """Trains with Ray Train: an embedded local Ray unless ``RAY_ADDRESS`` names a cluster.

    Args:
        config: the run's config.
        tracking_uri: MLflow tracking URI (default: a local SQLite store, ``mlflow.db``).
        require_tracking: fail if MLflow is unreachable (else training goes on without it, said once).
        resume: continue the latest run under ``run.storage_path`` (or ``run.name``) from its last checkpoint.
        callbacks: Ray Train callbacks of the run (e.g. Ray Tune's ``TuneReportCallback``, which passes each
            epoch's report on to a Tune trial; see :mod:`recsys.experiments.search`).
        start_from: a checkpoint folder of an earlier run (``<run>/checkpoint_*``, written by any number of
            workers with any sharding plan): a new run starts from its weights, optimizer state and place
            in the data (epoch, and share of the epoch).
        register: log and register the model (the store is then required from the start, and a model
            that could not be logged or registered is an error); False trains without registering.

    Returns:
        The run's name, storage folder and summary (test metrics, registered version).

    Raises:
        ValueError: a bad input, e.g. a validation split whose labels cannot give the main metric.
        TrackingError: MLflow is unreachable at the start and is required (``require_tracking``,
            ``register``).
        RegistrationError: the trained model could not be logged or registered.
        NonFiniteLossError: a training loss went NaN or infinite (the step and task named).
    """
    from recsys.runtime import init_ray
    from recsys.tracking import default_tracking_uri
    from recsys.train.recorder import RecorderChannel, RunRecorder

    config = _absolute_paths(config)
    _check_validation_labels(config)
    run_dir = _run_dir(config, resume)
    start = _checked_start(config, start_from, resume)
    uri = tracking_uri or default_tracking_uri()
    recorder = RunRecorder(config, run_dir, uri, require_tracking, register)
    # Created once every check has passed: a refused start leaves no folder for --resume to pick.
    run_dir.mkdir(parents=True, exist_ok=True)
    with recorder:  # the MLflow run, ended FAILED on any error from here on (KILLED on Ctrl-C)
        init_ray("training", num_cpus=_embedded_cpus(config))
        settings = WorkerSettings(config, str(run_dir), str(start or ""), recorder.run_id)
        with RecorderChannel(recorder) as channel:
            _trainer(settings, channel.callbacks(callbacks)).fit()
        if recorder.summary is None:
            raise RuntimeError(f"training ended without rank 0's final report; see the log of {run_dir}")
    _tell(recorder.summary, run_dir)
    return TrainResult(run_dir.name, run_dir, recorder.summary)


def _absolute_paths(config: TrainConfig) -> TrainConfig:
    """The config with absolute data paths (workers run in their own folders), once they are checked."""
    features = Path(config.features).resolve()
    for split in ("spec.json", *SPLIT_DIRS):
        if not (features / split).exists():
            raise FileNotFoundError(
                f"features: {features / split} not found; build the features first "
                "(python -m pipelines.features build ...)"
            )
    truth = str(Path(config.truth).resolve()) if config.truth else ""
    return config.replace(features=str(features), truth=truth)


def _check_validation_labels(config: TrainConfig) -> None:
    """Raises a named ValueError when the validation split cannot give the main metric (an AUC of one label).

    Else every epoch's metric would be NaN: no epoch could be selected, and no model registered.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    task_name, metric = config.training.main_metric.split("/")
    task = next(t for t in config.model.tasks if t.name == task_name)
    if task.kind != "binary" or metric not in ("auc", "gauc"):
        return
    folder = Path(config.features) / "valid"
    files = sorted(folder.glob("*.parquet"))
    labels = [pq.read_table(f, columns=[task.label]).column(0) for f in files]
    values = {v for col in labels for v in pc.unique(col).to_pylist() if v is not None}
    if len(values) < 2:
        rows = sum(len(col) for col in labels)
        raise ValueError(
            f"training.main_metric: valid/{config.training.main_metric} is undefined: the label "
            f"{task.label!r} in {folder} takes the values {sorted(values)} over {rows} rows (an AUC needs "
            "both); rebuild the features with another split, or choose another training.main_metric"
        )


def _run_dir(config: TrainConfig, resume: bool) -> Path:
    """The run's folder (not created): ``run.name``, else a new name, or with ``resume`` the latest run's."""
    storage = Path(config.run.storage_path).resolve()
    if resume:
        name = config.run.name or _latest_run(storage)
    else:
        name = config.run.name or _new_run_name(storage, config.run.model_name)
    run_dir = storage / name
    # Ray Train restores a run from the latest checkpoint under its storage path and name by itself;
    # --resume only picks that name (the latest run's), and checks there is something to resume.
    if resume and not any(run_dir.glob("checkpoint_*")):
        raise ValueError(f"--resume: run {name} has no checkpoint under {run_dir}")
    return run_dir


def _new_run_name(storage: Path, model_name: str) -> str:
    """``<model>-<time>-<4 hex>``: two runs started in the same second get their own folders."""
    import secrets

    while True:
        name = f"{model_name}-{dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
        if not (storage / name).exists():
            return name


def _latest_run(storage: Path) -> str:
    runs = [p for p in storage.iterdir() if p.is_dir()] if storage.exists() else []
    if not runs:
        raise ValueError(f"--resume: no earlier run under {storage}")
    return max(runs, key=lambda p: p.stat().st_mtime).name


def _checked_start(config: TrainConfig, start_from: str | Path | None, resume: bool) -> Path | None:
    """``start_from`` resolved, once it holds a file for every worker of the run that wrote it."""
    if start_from is None:
        return None
    if resume:
        raise ValueError("start_from: a new run starts from a checkpoint; --resume continues the last run")
    start = Path(start_from).resolve()
    try:
        files = checkpoint_files(start)  # any number of workers: the workers reshard it
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"start_from: {e}") from None
    for path in files:
        read_checkpoint_file(path, mmap=True)  # refused here, in the driver: a worker's error is retried
    return start


def _embedded_cpus(config: TrainConfig) -> int:
    """Logical CPUs of an embedded cluster: the workers' and two more.

    The two are for Ray Data's read tasks (``ingest: ray_data``); with none left, reading would wait forever.
    """
    import os

    return max(os.cpu_count() or 1, config.run.max_workers * config.run.cpus_per_worker) + 2


def _trainer(settings: WorkerSettings, callbacks: list[Any]) -> Any:
    """The ``TorchTrainer`` of the run: its workers, their resources, failures to recover from, data."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from recsys.runtime import model_process_env
    from recsys.train.worker import train_loop_per_worker

    run = settings.config.run
    ray_data = settings.config.training.ingest == "ray_data"
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": settings},
        # On GPUs, NCCL for the model's CUDA tensors and gloo for the loop's small CPU collectives (the
        # lockstep flags, gathered predictions).
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if run.use_gpu else "gloo"),
        # ``[min, max]`` workers: Ray Train's elastic scaling; every (re)start reshards the last checkpoint
        # to the workers it got (recsys.train.checkpoints).
        scaling_config=ScalingConfig(
            num_workers=run.num_workers,
            use_gpu=run.use_gpu,
            resources_per_worker={"CPU": run.cpus_per_worker},
            elastic_resize_monitor_interval_s=run.resize_check_s,
        ),
        run_config=RunConfig(
            name=Path(settings.run_dir).name,
            storage_path=str(Path(settings.run_dir).parent),
            failure_config=FailureConfig(max_failures=run.max_failures),
            # Ray deletes the older ones, keeping the latest (the best epoch's shards are kept apart).
            checkpoint_config=CheckpointConfig(num_to_keep=run.checkpoints_to_keep or None),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": model_process_env()},
        ),
        # The evaluation splits, and with ``parquet`` ingest the training split, are read by the workers.
        datasets=_training_dataset(settings.config) if ray_data else None,
        dataset_config=_data_config() if ray_data else None,
    )


def _training_dataset(config: TrainConfig) -> dict[str, Any]:
    """The training split as a Ray Data dataset (``ingest: ray_data``)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one bar per batch floods the logs
    # Ray 2.60's Parquet datasource V2 (ListFiles -> ReadFilesParquetV2) took 4.5-5 s to read a 10k-row
    # file on a warm local Ray here, V1 0.23 s: a fixed cost per execution, i.e. per epoch.
    context.use_datasource_v2 = False
    return {"train": ray.data.read_parquet(str(Path(config.features) / "train"))}


def _data_config() -> Any:
    """Ray Train's data config for the training split, in file order.

    Order is preserved, so that a run (and a resumed run) reads its data in the same order.
    """
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    # Ray Data reads ahead into the object store up to its own budget, a share of the whole store (GBs),
    # so the memory of training grew with the data set until the split was larger than that budget
    # (6.6 GiB RSS at 2M rows, 12.3 GiB at 20M). A fixed cap keeps it flat in the number of rows.
    limits = options.resource_limits
    cap = min(limits.object_store_memory or float("inf"), INGEST_OBJECT_STORE_BYTES)
    options.resource_limits = limits.copy(object_store_memory=cap)
    return DataConfig(execution_options=options)


def _tell(summary: TrainingSummary, run_dir: Path) -> None:
    """The run's last lines of story: test metrics, the registered version, where the run is."""
    aucs = {k.removeprefix("test/"): v for k, v in summary.test.items() if k.endswith("/auc")}
    story("test  " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(aucs.items())))
    if summary.version is not None:
        story(f"registered {summary.registered_model} version {summary.version} as {summary.alias}")
    story(f"run folder {run_dir}")
