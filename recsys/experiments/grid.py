"""The grid of an experiment: its cells, the train config of every run, and the record of a finished run.

A cell is a data set, a model and a setting; it is trained once per seed. :func:`plan_runs` builds every
run's train config from the spec (base, data set, model and setting overrides, deep-merged), sizes the
``match_params`` models to the reference, and names the run.

Example:
    >>> runs = plan_runs(spec, prepared, Path("out/ray"), num_workers=None)  # doctest: +SKIP
    >>> runs[0].config.run.name  # doctest: +SKIP
    'gating-rho0.5-softmax-8-default-s0'
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys.experiments.data import PreparedData
from recsys.experiments.matching import ParameterCount, count_parameters, deep_merge, match_parameters
from recsys.experiments.spec import DatasetSpec, ExperimentSpec


@dataclass(frozen=True)
class Cell:
    """One cell of the grid: a data set, a model and a setting (trained once per seed)."""

    dataset: str
    model: str
    setting: str

    @property
    def label(self) -> str:
        """``model`` or ``model/setting`` (the setting only when it is not ``default``)."""
        return self.model if self.setting == "default" else f"{self.model}/{self.setting}"


@dataclass(frozen=True)
class GridRun:
    """One training run of the grid, ready to train.

    Attributes:
        cell: its cell.
        seed: its training seed.
        config: its :class:`~recsys.train.config.TrainConfig` (run name, storage and seed set).
        params: the parameter count of its model.
    """

    cell: Cell
    seed: int
    config: Any
    params: ParameterCount


@dataclass
class RunRecord:
    """One finished training run of the grid (kept in ``OUT/runs/<run>.json`` for reuse)."""

    cell: Cell
    seed: int
    run_name: str
    mlflow_run_id: str | None
    seconds: float
    params: ParameterCount
    metrics: dict[str, float]
    expert_load: dict[str, list[float]]
    tasks: list[str]
    reused: bool = False
    valid_curve: list[float] = dataclasses.field(default_factory=list)  # main metric per epoch

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """Reads :meth:`to_dict`'s output back."""
        data = dict(data)
        data["cell"] = Cell(**data["cell"])
        data["params"] = ParameterCount(**data["params"])
        return cls(**data)


def slug(text: str) -> str:
    """``text`` with every run of characters other than letters, digits, ``_``, ``.``, ``-`` as one ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _dataset_base(spec: ExperimentSpec, dataset: DatasetSpec, data: PreparedData) -> dict[str, Any]:
    """The train config (plain data) of a data set, before the model and setting overrides."""
    base = deep_merge(spec.base, dataset.train)
    base["features"], base["truth"] = str(data.features), data.truth
    return base


def _reference_size(spec: ExperimentSpec, base: dict[str, Any], feature_spec: Any) -> int | None:
    """Dense parameters of the reference model on this data set; None without a reference."""
    from recsys.train.config import TrainConfig

    if not spec.reference:
        return None
    reference = next(m for m in spec.models if m.name == spec.reference)
    return count_parameters(
        TrainConfig.from_dict(deep_merge(base, reference.train)).model, feature_spec
    ).dense


def _dataset_runs(
    spec: ExperimentSpec, dataset: DatasetSpec, data: PreparedData, storage: Path, num_workers: int | None
) -> list[GridRun]:
    """The runs of one data set: every model, setting and seed."""
    from features.spec import FeatureSpec
    from recsys.train.config import TrainConfig

    feature_spec = FeatureSpec.load(data.features / "spec.json")
    base = _dataset_base(spec, dataset, data)
    target = _reference_size(spec, base, feature_spec)
    runs = []
    for model in spec.models:
        for setting in spec.settings:
            cell = Cell(dataset.name, model.name, setting.name)
            config = TrainConfig.from_dict(deep_merge(deep_merge(base, model.train), setting.train))
            if model.match_params and target is not None:
                config = config.replace(model=match_parameters(config.model, feature_spec, target))
            params = count_parameters(config.model, feature_spec)
            for seed in spec.seeds:
                name = slug(f"{spec.name}-{dataset.name}-{model.name}-{setting.name}-s{seed}")
                run: dict[str, Any] = {"name": name, "storage_path": str(storage)}
                if num_workers is not None:
                    run["num_workers"] = num_workers
                runs.append(GridRun(cell, seed, config.replace(training={"seed": seed}, run=run), params))
    return runs


def plan_runs(
    spec: ExperimentSpec, prepared: Mapping[str, PreparedData], storage: Path, num_workers: int | None
) -> list[GridRun]:
    """Every run of the grid, in grid order: data set, model, setting, seed.

    Args:
        spec: the experiment.
        prepared: the prepared data sets by name.
        storage: Ray Train's storage folder of the runs.
        num_workers: Ray Train workers per run (None: the config's).
    """
    return [
        run for d in spec.datasets for run in _dataset_runs(spec, d, prepared[d.name], storage, num_workers)
    ]
