"""Typed, validated configuration of a training run, loaded from YAML.

Example (``recsys/configs/train_demo.yaml``)::

    features: data/demo/features          # a folder written by `python -m pipelines.features build`
    truth: data/demo/raw/truth.parquet    # optional: oracle AUC on synthetic data
    model: ecommerce_mmoe                 # a shipped model config, a YAML path, or an inline mapping
    training: {epochs: 2, batch_size: 1024}
    run: {experiment: recsys-demo, model_name: ecommerce-ranker, num_workers: 2}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from features.checks import (
    check_choice,
    check_int,
    check_number,
    config_path,
    from_mapping,
    invalid,
    shipped_config,
)
from recsys.balancing import BALANCING
from recsys.calibration import METHODS as CALIBRATION_METHODS
from recsys.config import ModelConfig
from recsys.precision import PRECISIONS

EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adam", "sgd")
SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "row_wise", "auto")
INGEST_MODES = ("parquet", "ray_data")
CONFIG_DIR = Path(__file__).parents[1] / "configs"  # recsys/configs: model and training configs


@dataclass(frozen=True)
class TrainingSettings:
    """How to train.

    Attributes:
        epochs: passes over the training split.
        batch_size: rows per step on each worker; a step trains ``batch_size`` times the run's starting
            number of workers, also when restarted on another number (``TrainingState.data_shards``).
        dense_lr: Adam learning rate of the dense parameters (experts, gates, towers).
        embedding_optimizer: the fused sparse optimizer of the embedding tables: ``rowwise_adagrad``,
            ``adam`` or ``sgd`` (TorchRec's fused optimizers update only the rows a batch touches).
        embedding_lr: its learning rate.
        embedding_weight_decay: weight decay of the embedding rows a batch touches, applied by the fused
            optimizer at each step, decoupled from the gradient (FBGEMM's ``WeightDecayMode.DECOUPLE``;
            its ``L2`` mode barely moved the rows of the CPU kernel); 0: none.
        dense_weight_decay: decoupled weight decay of the dense parameters (AdamW instead of Adam); 0: Adam.
        sharding: how the planner may place tables: ``table_wise`` (whole tables on one worker each),
            ``column_wise``, ``table_column_wise``, ``row_wise`` (CUDA only) or ``auto`` (the planner's
            choice, which may replicate small tables).
        seed: the random seed of the model's initialisation.
        log_every_steps: log train loss and throughput every N steps.
        checkpoint_every_steps: also checkpoint every N steps (0: at the end of each epoch only).
        early_stopping_patience: stop after N epochs without improvement of the main metric (0: never).
        main_metric: the validation metric that selects the model, as ``task/metric`` (higher is better).
        max_steps_per_epoch: cap on steps per epoch (0: no cap); for smoke runs.
        shuffle_rows: shuffle training rows within a buffer of this many rows on each worker (0: read
            order). The data is in time order, so some shuffling keeps batches from being one hour each.
            With ``parquet`` ingest the order of the Parquet row groups is also drawn anew every epoch.
        ingest: how workers read the training split: ``parquet`` (each worker reads its own share of the
            files, on a background thread; the default) or ``ray_data`` (one Ray Data execution per epoch,
            streamed to the workers by a split coordinator).
        lr_decay: each epoch's learning rates (dense and embedding) are the first epoch's times
            ``lr_decay ** epoch`` (epochs counted from 0); 1 (the default): constant. Later passes over the
            same rows then move the weights less. With ``embedding_reinit`` the tables, drawn anew each
            epoch, keep the first epoch's rate: the decay applies to the dense layers only.
        embedding_epochs: the tables train during the first N epochs only, then stay as they are while the
            dense layers go on (0, the default: every epoch). Neither this nor ``lr_decay`` alone stopped
            the validation metric from falling after the first epoch on the generated worlds.
        embedding_reinit: draw the tables anew (and clear their optimizer state) at the start of every
            epoch after the first, keeping the dense layers (MEDA,
            :func:`recsys.train.sharding.reinit_tables`). With it and ``lr_decay: 0.5`` the validation
            metric of the generated worlds fell by at most 0.0025 from one epoch to the next over 4 epochs
            (docs/results.md, "Worlds: later epochs that hold").
        calibration: ``platt`` (the default): after training, fit Platt scaling per binary task on the
            validation split's predictions of the kept model, store it in the package and report the test
            metrics after it (and before it, as ``..._raw``); ``none``: the package scores the model's own
            probabilities (:mod:`recsys.calibration`).
        task_balancing: how the task losses are combined (:mod:`recsys.balancing`): ``fixed`` (the
            tasks' weights; the default), ``uncertainty`` (learned log-variances, Kendall et al. 2018),
            ``gradnorm`` (Chen et al. 2018) or ``pcgrad`` (Yu et al. 2020). The weights (and for GradNorm
            and PCGrad the tasks' gradient norms and cosine) are logged with the training loss.
        gradnorm_alpha: GradNorm's asymmetry (1.5 as in the paper).
        gradnorm_lr: the learning rate of GradNorm's loss weights (Adam).
        precision: ``auto`` (the default: bf16 where the CPU or GPU has bf16 units, else fp32), ``fp32``,
            or ``bf16`` (the dense layers' matrix products under bf16 autocast; tables, losses and optimizer
            state stay fp32); see :mod:`recsys.precision`. bf16 kept the test AUC of fp32 within 0.0003 on
            three generated worlds and on census (experiments/results/precision).
    """

    epochs: int = 2
    batch_size: int = 1024
    dense_lr: float = 1e-3
    embedding_optimizer: str = "rowwise_adagrad"
    embedding_lr: float = 0.05
    embedding_weight_decay: float = 0.0
    dense_weight_decay: float = 0.0
    sharding: str = "table_wise"
    seed: int = 0
    log_every_steps: int = 50
    checkpoint_every_steps: int = 0
    early_stopping_patience: int = 0
    main_metric: str = "click/auc"
    max_steps_per_epoch: int = 0
    shuffle_rows: int = 100_000
    ingest: str = "parquet"
    lr_decay: float = 1.0
    embedding_epochs: int = 0
    embedding_reinit: bool = False
    calibration: str = "platt"
    task_balancing: str = "fixed"
    gradnorm_alpha: float = 1.5
    gradnorm_lr: float = 0.025
    precision: str = "auto"

    def __post_init__(self) -> None:
        w = "training"
        check_choice(w, "task_balancing", self.task_balancing, BALANCING)
        check_choice(w, "precision", self.precision, PRECISIONS)
        check_number(w, "gradnorm_alpha", self.gradnorm_alpha, low_open=False)
        check_number(w, "gradnorm_lr", self.gradnorm_lr)
        check_int(w, "epochs", self.epochs)
        check_int(w, "batch_size", self.batch_size)
        check_number(w, "dense_lr", self.dense_lr)
        check_number(w, "embedding_lr", self.embedding_lr)
        check_number(w, "lr_decay", self.lr_decay, high=1.0)
        for name in ("embedding_weight_decay", "dense_weight_decay"):
            check_number(w, name, getattr(self, name), low_open=False)
        check_choice(w, "embedding_optimizer", self.embedding_optimizer, EMBEDDING_OPTIMIZERS)
        check_choice(w, "sharding", self.sharding, SHARDING_TYPES)
        check_int(w, "seed", self.seed, minimum=0)
        check_int(w, "log_every_steps", self.log_every_steps)
        for name in (
            "checkpoint_every_steps",
            "early_stopping_patience",
            "max_steps_per_epoch",
            "shuffle_rows",
            "embedding_epochs",
        ):
            check_int(w, name, getattr(self, name), minimum=0)  # 0: off
        check_choice(w, "ingest", self.ingest, INGEST_MODES)
        if not isinstance(self.embedding_reinit, bool):
            raise invalid(w, "embedding_reinit", self.embedding_reinit, "expected true or false")
        check_choice(w, "calibration", self.calibration, CALIBRATION_METHODS)
        if not isinstance(self.main_metric, str) or self.main_metric.count("/") != 1:
            raise invalid(w, "main_metric", self.main_metric, "expected 'task/metric', e.g. 'click/auc'")


@dataclass(frozen=True)
class RunSettings:
    """Where and how the run executes and is recorded.

    Attributes:
        experiment: the MLflow experiment.
        model_name: the registered model's name in the MLflow model registry.
        num_workers: Ray Train workers (each one process holding its share of the tables); ``[min, max]``
            for elastic training: the run starts with as many workers as the cluster fits (at least
            ``min``), goes on with fewer when a worker or node is lost (resharding the last checkpoint),
            and grows back when resources return (checked every ``resize_check_s``).
        use_gpu: one GPU per worker, NCCL instead of gloo.
        storage_path: where Ray Train keeps checkpoints (a local folder or a cluster storage URI).
        name: the run's name under ``storage_path`` (default: model name and start time).
        max_failures: worker failures to recover from (from the latest checkpoint) before giving up (-1:
            without limit). A lost node counts as one.
        resize_check_s: with ``num_workers: [min, max]``, how often a healthy run checks whether more
            workers fit (growing restarts the workers from the last checkpoint).
        checkpoints_to_keep: the latest checkpoints kept in the run's folder (older ones are deleted; the
            best epoch's shards are kept apart); 0 keeps them all.
        cpus_per_worker: CPUs reserved per worker (and torch threads in it).
        parent_run_id: the MLflow run this run is nested under (tag ``mlflow.parentRunId``); empty: none.
            An experiment grid or a hyperparameter search sets it for each of its runs.
        tags: further MLflow tags of the run (e.g. the experiment cell it belongs to).
    """

    experiment: str = "recsys"
    model_name: str = "ranking-model"
    num_workers: int | tuple[int, int] = 2
    use_gpu: bool = False
    storage_path: str = "artifacts/ray"
    name: str = ""
    max_failures: int = 2
    resize_check_s: float = 60.0
    checkpoints_to_keep: int = 3
    cpus_per_worker: int = 1
    parent_run_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        w = "run"
        for name in ("experiment", "model_name"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise invalid(w, name, getattr(self, name), "expected a non-empty string")
        object.__setattr__(self, "num_workers", _worker_count(self.num_workers))
        # Ray Train's FailureConfig: -1 retries without limit, 0 never.
        check_int(w, "max_failures", self.max_failures, minimum=-1)
        check_int(w, "cpus_per_worker", self.cpus_per_worker)
        check_int(w, "checkpoints_to_keep", self.checkpoints_to_keep, minimum=0)
        if not isinstance(self.resize_check_s, int | float) or not 0 < self.resize_check_s < float("inf"):
            raise invalid(w, "resize_check_s", self.resize_check_s, "expected a number of seconds > 0")
        if not isinstance(self.use_gpu, bool):
            raise invalid(w, "use_gpu", self.use_gpu, "expected true or false")
        if not isinstance(self.parent_run_id, str):
            raise invalid(w, "parent_run_id", self.parent_run_id, "expected an MLflow run id (a string)")
        if not isinstance(self.tags, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in self.tags.items()
        ):
            raise invalid(w, "tags", self.tags, "expected a mapping of non-empty strings to strings")

    @property
    def max_workers(self) -> int:
        """The most workers the run takes (its CPUs are reserved for that many)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]


def _worker_count(value: Any) -> int | tuple[int, int]:
    """``num_workers`` checked: an int >= 1, or ``[min, max]`` with 1 <= min < max (equal ones: an int)."""
    if isinstance(value, list | tuple):
        ok = len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not ok or not 1 <= value[0] <= value[1]:
            raise invalid("run", "num_workers", list(value), "expected [min, max] with 1 <= min <= max")
        return value[0] if value[0] == value[1] else (value[0], value[1])
    check_int("run", "num_workers", value)
    return value


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run.

    Attributes:
        features: the model-ready dataset folder (``spec.json`` and ``train``/``valid``/``test``).
        model: the model config.
        training: training settings.
        run: run settings.
        truth: optional ``truth.parquet`` of generated data, for the oracle AUC.
        group_column: the column GAUC groups by (``user_id``); empty to skip GAUC.
    """

    features: str
    model: ModelConfig
    training: TrainingSettings = field(default_factory=TrainingSettings)
    run: RunSettings = field(default_factory=RunSettings)
    truth: str = ""
    group_column: str = "user_id"

    def __post_init__(self) -> None:
        task, _ = self.training.main_metric.split("/")
        names = [t.name for t in self.model.tasks]
        if task not in names:
            raise invalid("training", "main_metric", self.training.main_metric, f"expected a task of {names}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path | None = None) -> TrainConfig:
        """Builds a config from plain data; relative paths are read against ``base``."""
        if not isinstance(data, dict):
            raise ValueError(f"train config: expected a mapping, got {data!r}")
        data = dict(data)
        for key in ("features", "model"):
            if key not in data:
                raise ValueError(f"train config.{key}: missing required field")
        model = data["model"]
        if isinstance(model, str):
            if base is not None and model.endswith((".yaml", ".yml")):
                model = str(base / model)  # a YAML path is read against ``base`` (an absolute one stays)
            data["model"] = ModelConfig.from_yaml(config_path(model, CONFIG_DIR, "model config"))
        elif isinstance(model, dict):
            data["model"] = ModelConfig.from_dict(model)
        elif not isinstance(model, ModelConfig):
            raise invalid("train config", "model", model, "expected a config name, a YAML path or a mapping")
        data["training"] = from_mapping(TrainingSettings, data.get("training") or {}, "training")
        data["run"] = from_mapping(RunSettings, data.get("run") or {}, "run")
        return from_mapping(cls, data, "train config")

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Loads and validates a YAML train config."""
        with open(path) as fh:
            return cls.from_dict(yaml.safe_load(fh))

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :meth:`from_dict` reads back."""
        return asdict(self)

    def replace(self, **sections: dict[str, Any]) -> TrainConfig:
        """A copy with fields of the ``training`` or ``run`` sections (or top-level fields) changed."""
        data = self.to_dict()
        for key, value in sections.items():
            if isinstance(value, dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return TrainConfig.from_dict(data)


def builtin_train_config(name: str) -> Path:
    """Path of a shipped training config (``train_demo``, ``train_census``, ...)."""
    return shipped_config(CONFIG_DIR, name, "train config")
