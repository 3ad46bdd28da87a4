"""Experiments: grids of training runs (data sets x models x settings x seeds) that anyone reruns.

An :class:`ExperimentSpec` (YAML, ``recsys/experiments/specs/*.yaml``) names the data sets (generated, e.g. at several
task correlations, or a flat table such as the census data), the model variants and the settings to cross
them with, and the seeds. :func:`run_experiment`

1. prepares every data set once (generate, build features), cached under ``OUT/data``;
2. sizes the variants marked ``match_params`` so that their dense parameter count (everything but the
   embedding tables, which all variants share) is the closest to the reference variant's;
3. opens one MLflow parent run and trains every cell and seed through :func:`recsys.train.loop.run_training`
   (the same code path as ``python -m pipelines.train``), each a child run (tag ``mlflow.parentRunId``);
4. writes the results table (mean +- std over seeds; CSV and Markdown), the advantage of every variant over
   a baseline (paired by seed), a findings text and PNG plots into ``OUT``, and logs them to the parent run.

A finished child run is kept in ``OUT/runs/<run>.json``; rerunning the command with the same spec reuses it
instead of training again, so an interrupted grid goes on where it stopped.

The second half of the module reads a training run back from MLflow (metric histories, test predictions,
expert load per epoch) for notebooks and reports.

Example:
    >>> spec = ExperimentSpec.from_yaml("recsys/experiments/specs/gating.yaml")  # doctest: +SKIP
    >>> result = run_experiment(spec, Path("artifacts/experiments/gating"), quick=True)  # doctest: +SKIP
    >>> print(result.markdown)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from features.config import from_mapping, invalid

SPEC_DIR = Path(__file__).parent / "specs"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------------------------- spec


def _check_name(where: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise invalid(where, "name", value, "expected a name of letters, digits, '_', '.' or '-'")
    return value


def _mapping(where: str, name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(where, name, value, "expected a mapping")
    return copy.deepcopy(value)


@dataclass(frozen=True)
class GeneratedData:
    """Arguments of :func:`synth.generate.generate` for a generated data set.

    Attributes:
        impressions: rows to generate.
        seed: the generator's seed (the same for every training seed: seeds vary the model, not the data).
        task_correlation: cosine between the click and purchase weight vectors, in [-1, 1].
        n_users: users (0: the generator's default for the size).
        n_items: items (0: the generator's default).
    """

    impressions: int = 100_000
    seed: int = 7
    task_correlation: float = 0.5
    n_users: int = 0
    n_items: int = 0

    def __post_init__(self) -> None:
        w = "dataset.generate"
        for name, low in (("impressions", 1), ("seed", 0), ("n_users", 0), ("n_items", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise invalid(w, name, value, f"expected an integer >= {low}")
        rho = self.task_correlation
        if not isinstance(rho, int | float) or isinstance(rho, bool) or not -1 <= rho <= 1:
            raise invalid(w, "task_correlation", rho, "expected a number in [-1, 1]")


@dataclass(frozen=True)
class DatasetSpec:
    """One data set of the grid.

    Attributes:
        name: the data set's name in tables, plots and run names.
        features: the feature config: a shipped name (``ecommerce``, ``census_group1``) or a YAML path.
        generate: generate the data (the ecommerce tables) with these arguments; or
        table: read this flat table (Parquet or CSV), for a feature config with ``source: flat``.
        train: overrides of the base train config for this data set (its tasks, its main metric).
        x: the data set's position on the plots' x axis (e.g. its task correlation); None: categorical.
    """

    name: str
    features: str = "ecommerce"
    generate: GeneratedData | None = None
    table: str = ""
    train: dict[str, Any] = field(default_factory=dict)
    x: float | None = None

    def __post_init__(self) -> None:
        w = f"datasets[{self.name}]"
        _check_name("datasets", self.name)
        if (self.generate is None) == (not self.table):
            raise invalid(w, "generate", self.generate, "expected exactly one of 'generate' and 'table'")
        if self.x is not None and (not isinstance(self.x, int | float) or isinstance(self.x, bool)):
            raise invalid(w, "x", self.x, "expected a number")

    @classmethod
    def from_dict(cls, data: Any, index: int) -> DatasetSpec:
        """Builds a data set from plain data (as loaded from YAML)."""
        where = f"datasets[{index}]"
        data = dict(_mapping("experiment", where, data))
        if isinstance(data.get("generate"), dict):
            data["generate"] = from_mapping(GeneratedData, data["generate"], f"{where}.generate")
        data["train"] = _mapping(where, "train", data.get("train"))
        return from_mapping(cls, data, where)


@dataclass(frozen=True)
class Variant:
    """A model or a setting: overrides of the train config, deep-merged (lists are replaced).

    Attributes:
        name: the variant's name in tables and run names.
        train: the overrides, e.g. ``{"model": {"arch": {"type": "shared_bottom"}}}``.
        match_params: resize the layers of ``model.arch.expert_hidden`` (keeping their ratios) so that the
            dense parameter count is the closest to the spec's ``reference`` variant's.
    """

    name: str
    train: dict[str, Any] = field(default_factory=dict)
    match_params: bool = False

    def __post_init__(self) -> None:
        _check_name("variant", self.name)
        if not isinstance(self.match_params, bool):
            raise invalid(
                f"variant[{self.name}]", "match_params", self.match_params, "expected true or false"
            )

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Variant:
        """Builds a variant from plain data."""
        data = dict(_mapping("experiment", where, data))
        data["train"] = _mapping(where, "train", data.get("train"))
        return from_mapping(cls, data, where)


@dataclass(frozen=True)
class QuickSettings:
    """What ``--quick`` changes: tiny data and one seed, for smoke tests.

    Attributes:
        impressions: generated data sets get this many impressions.
        max_rows: table data sets keep their first rows only (0: all).
        seeds: the seeds.
        train: train config overrides (e.g. one epoch).
    """

    impressions: int = 20_000
    max_rows: int = 20_000
    seeds: tuple[int, ...] = (0,)
    train: dict[str, Any] = field(default_factory=lambda: {"training": {"epochs": 1}})

    def __post_init__(self) -> None:
        for name in ("impressions", "max_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise invalid("quick", name, value, "expected an integer >= 0")
        object.__setattr__(self, "seeds", _seeds("quick", self.seeds))


def _seeds(where: str, seeds: Any) -> tuple[int, ...]:
    if not isinstance(seeds, list | tuple) or not seeds:
        raise invalid(where, "seeds", seeds, "expected a non-empty list of integers >= 0")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise invalid(where, "seeds", list(seeds), "expected a non-empty list of integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise invalid(where, "seeds", list(seeds), "expected distinct seeds")
    return tuple(seeds)


@dataclass(frozen=True)
class ExperimentSpec:
    """A grid of training runs.

    Attributes:
        name: the experiment's name (folders, the parent run's name).
        description: what it asks, one paragraph (goes into the report).
        base: the base train config (mapping, as ``recsys/configs/train_*.yaml`` without ``features``).
        datasets: the data sets.
        models: the model variants.
        settings: further variants crossed with every model (default: one, ``default``, that changes
            nothing).
        seeds: training seeds (model initialisation and shuffling) of every cell.
        metrics: test metrics reported for every binary task (``auc``, ``gauc``, ``oracle_auc``, ...).
        reference: the variant (model name) that ``match_params`` variants are sized against.
        baseline: the model the others are compared with, seed by seed; empty: no comparison.
        published: published numbers to print beside ours: data set -> model -> column -> text.
        published_source: where they come from.
        x_label: the x axis's name when the data sets have ``x`` values.
        quick: what ``--quick`` changes.
    """

    name: str
    base: dict[str, Any]
    datasets: tuple[DatasetSpec, ...]
    models: tuple[Variant, ...]
    settings: tuple[Variant, ...] = (Variant("default"),)
    seeds: tuple[int, ...] = (0, 1, 2)
    metrics: tuple[str, ...] = ("auc",)
    description: str = ""
    reference: str = ""
    baseline: str = ""
    published: dict[str, Any] = field(default_factory=dict)
    published_source: str = ""
    x_label: str = "x"
    quick: QuickSettings = field(default_factory=QuickSettings)

    def __post_init__(self) -> None:
        w = "experiment"
        _check_name(w, self.name)
        for what in ("datasets", "models", "settings"):
            items = getattr(self, what)
            if not items:
                raise invalid(w, what, items, "expected at least one")
            names = [i.name for i in items]
            if len(set(names)) != len(names):
                raise invalid(w, what, names, "expected distinct names")
        object.__setattr__(self, "seeds", _seeds(w, self.seeds))
        models = [m.name for m in self.models]
        if self.reference and self.reference not in models:
            raise invalid(w, "reference", self.reference, f"expected one of the models {models}")
        if any(m.match_params for m in self.models) and not self.reference:
            raise invalid(w, "reference", self.reference, "a model has match_params: name the reference")
        if self.baseline and self.baseline not in models:
            raise invalid(w, "baseline", self.baseline, f"expected one of the models {models}")
        if not self.metrics or not all(isinstance(m, str) and m for m in self.metrics):
            raise invalid(w, "metrics", self.metrics, "expected a non-empty list of metric names")

    @classmethod
    def from_dict(cls, data: Any) -> ExperimentSpec:
        """Builds a spec from plain data (as loaded from YAML)."""
        data = dict(_mapping("experiment", "spec", data))
        for key in ("name", "base", "datasets", "models"):
            if key not in data:
                raise ValueError(f"experiment.{key}: missing required field")
        base = data["base"]
        if isinstance(base, str):
            from recsys.train.config import builtin_train_config

            path = Path(base) if base.endswith((".yaml", ".yml")) else builtin_train_config(base)
            base = yaml.safe_load(path.read_text())
        data["base"] = _mapping("experiment", "base", base)
        for key in ("datasets", "models", "settings"):
            if key in data and not isinstance(data[key], list):
                raise invalid("experiment", key, data[key], "expected a list")
        data["datasets"] = tuple(DatasetSpec.from_dict(d, i) for i, d in enumerate(data["datasets"]))
        data["models"] = tuple(Variant.from_dict(m, f"models[{i}]") for i, m in enumerate(data["models"]))
        if "settings" in data:
            data["settings"] = tuple(
                Variant.from_dict(s, f"settings[{i}]") for i, s in enumerate(data["settings"])
            )
        if "metrics" in data:
            data["metrics"] = tuple(data["metrics"]) if isinstance(data["metrics"], list) else data["metrics"]
        if "seeds" in data and isinstance(data["seeds"], list):
            data["seeds"] = tuple(data["seeds"])
        if "quick" in data:
            quick = dict(_mapping("experiment", "quick", data["quick"]))
            if isinstance(quick.get("seeds"), list):
                quick["seeds"] = tuple(quick["seeds"])
            data["quick"] = from_mapping(QuickSettings, quick, "experiment.quick")
        data["published"] = _mapping("experiment", "published", data.get("published"))
        return from_mapping(cls, data, "experiment")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ExperimentSpec:
        """Loads and validates a YAML spec."""
        with open(path) as fh:
            return cls.from_dict(yaml.safe_load(fh))

    def for_quick(self) -> ExperimentSpec:
        """The spec as ``--quick`` runs it: tiny data sets, the quick seeds and training overrides."""
        q = self.quick
        datasets = []
        for d in self.datasets:
            if d.generate is not None:
                d = dataclasses.replace(
                    d, generate=dataclasses.replace(d.generate, impressions=q.impressions)
                )
            datasets.append(d)
        return dataclasses.replace(
            self,
            datasets=tuple(datasets),
            seeds=q.seeds,
            base=deep_merge(self.base, q.train),
        )


def shipped_spec(name: str) -> Path:
    """Path of a shipped experiment spec (``recsys/experiments/specs/<name>.yaml``)."""
    path = SPEC_DIR / f"{name}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))
        raise ValueError(f"spec: no shipped experiment {name!r}; shipped: {names}")
    return path


def load_spec(name_or_path: str | Path) -> ExperimentSpec:
    """A spec from a YAML path or a shipped name."""
    path = Path(name_or_path)
    return ExperimentSpec.from_yaml(path if path.suffix in (".yaml", ".yml") else shipped_spec(str(path)))


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in: mappings recursively, anything else (lists too) replaced.

    Example:
        >>> deep_merge({"a": {"b": 1, "c": [1]}}, {"a": {"c": [2]}})
        {'a': {'b': 1, 'c': [2]}}
    """
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class PreparedData:
    """A data set ready to train on."""

    name: str
    features: Path
    truth: str


def atomic_write(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_dataset(dataset: DatasetSpec, root: Path, max_rows: int = 0) -> PreparedData:
    """Generates (or reads) the data set and builds its features under ``root/<name>``, once.

    The folder keeps a ``prepared.json`` with the digest of what built it; a changed spec rebuilds it.

    Args:
        dataset: the data set.
        root: the data folder of the experiment.
        max_rows: a table data set keeps its first ``max_rows`` rows (0: all).
    """
    from features.config import FeatureConfig, builtin_config
    from features.pipeline import Tables, build, load_tables, scan_table
    from synth.generate import generate

    folder = root / dataset.name
    features_path = Path(dataset.features)
    feature_config = (
        features_path if features_path.suffix in (".yaml", ".yml") else builtin_config(dataset.features)
    )
    key = {
        "generate": dataclasses.asdict(dataset.generate) if dataset.generate else None,
        "table": dataset.table,
        "max_rows": max_rows if dataset.table else 0,
        "features": Path(feature_config).read_text(),
    }
    digest = _digest(key)
    marker = folder / "prepared.json"
    truth = str(folder / "raw" / "truth.parquet") if dataset.generate else ""
    if marker.exists() and json.loads(marker.read_text()).get("digest") == digest:
        return PreparedData(dataset.name, folder / "features", truth)
    config = FeatureConfig.from_yaml(feature_config)
    if dataset.generate is not None:
        g = dataset.generate
        generate(
            folder / "raw",
            g.impressions,
            g.seed,
            task_correlation=g.task_correlation,
            n_users=g.n_users or None,
            n_items=g.n_items or None,
            progress=False,
        )
        tables = load_tables(folder / "raw")
    else:
        frame = scan_table(dataset.table)
        tables = Tables(impressions=frame.head(max_rows) if max_rows else frame)
    build(config, tables, folder / "features", overwrite=True, progress=False)
    atomic_write(marker, json.dumps({"digest": digest, **key}, indent=1, default=str))
    return PreparedData(dataset.name, folder / "features", truth)


# ---------------------------------------------------------------------------------- parameter counts


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a built model.

    Attributes:
        dense: everything but the embedding tables (experts, gates, towers, interaction).
        embedding: the embedding tables (the same for every variant of a data set).
    """

    dense: int
    embedding: int


def count_parameters(model_config: Any, spec: Any) -> ParameterCount:
    """Counts the parameters of the model a config builds for a feature spec (tables on ``meta``).

    Args:
        model_config: a :class:`~recsys.config.ModelConfig`.
        spec: the data set's :class:`~features.spec.FeatureSpec`.
    """
    from recsys.data.batch import FeatureLayout
    from recsys.model import build_model

    layout = FeatureLayout.from_spec(spec, model_config.embedding)
    model = build_model(model_config, layout, embedding_device="meta")
    dense = embedding = 0
    for name, parameter in model.named_parameters():
        if name.startswith("sparse_arch."):
            embedding += parameter.numel()
        else:
            dense += parameter.numel()
    return ParameterCount(dense, embedding)


def match_parameters(model_config: Any, spec: Any, target: int, max_width: int = 8192) -> Any:
    """Resizes ``arch.expert_hidden`` so that the dense parameter count is the closest to ``target``.

    The layers keep their ratios to the first layer, whose width is searched by bisection (the count grows
    with it). For MMoE and PLE the experts are resized, for shared-bottom and single-task the bottom MLP.

    Returns:
        The model config with the new ``expert_hidden``.
    """
    hidden = model_config.arch.expert_hidden

    def sized(width: int) -> Any:
        layers = tuple(max(1, round(h * width / hidden[0])) for h in hidden)
        arch = dataclasses.replace(model_config.arch, expert_hidden=layers)
        return dataclasses.replace(model_config, arch=arch)

    low, high = 1, max_width
    while low < high:  # the smallest width whose count reaches the target
        mid = (low + high) // 2
        if count_parameters(sized(mid), spec).dense < target:
            low = mid + 1
        else:
            high = mid
    candidates = [w for w in (low - 1, low) if w >= 1]
    best = min(candidates, key=lambda w: abs(count_parameters(sized(w), spec).dense - target))
    return sized(best)


# ------------------------------------------------------------------------------------------- runs


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


@dataclass
class RunRecord:
    """One finished training run of the grid."""

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


def load_entropy(load: Sequence[float]) -> float:
    """Entropy of an expert load, normalised by ``log E``: 1 when balanced, 0 when one expert takes all.

    Example:
        >>> round(load_entropy([0.25, 0.25, 0.25, 0.25]), 3), load_entropy([1.0, 0.0, 0.0, 0.0])
        (1.0, 0.0)
    """
    p = np.asarray(load, dtype=np.float64)
    if p.size < 2 or p.sum() <= 0:
        return float("nan")
    p = p / p.sum()
    nonzero = p[p > 0]
    return max(0.0, float(-(nonzero * np.log(nonzero)).sum() / math.log(p.size)))  # no -0.0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _run_configs(
    spec: ExperimentSpec, prepared: Mapping[str, PreparedData], storage: Path, num_workers: int | None
) -> list[tuple[Cell, int, Any, ParameterCount]]:
    """Every run of the grid: its cell, seed, train config and parameter count."""
    from features.spec import FeatureSpec
    from recsys.train.config import TrainConfig

    runs = []
    for dataset in spec.datasets:
        data = prepared[dataset.name]
        feature_spec = FeatureSpec.load(data.features / "spec.json")
        base = deep_merge(spec.base, dataset.train)
        base["features"], base["truth"] = str(data.features), data.truth
        target = None
        if spec.reference:
            ref = next(m for m in spec.models if m.name == spec.reference)
            reference = TrainConfig.from_dict(deep_merge(base, ref.train))
            target = count_parameters(reference.model, feature_spec).dense
        for model in spec.models:
            for setting in spec.settings:
                cell = Cell(dataset.name, model.name, setting.name)
                merged = deep_merge(deep_merge(base, model.train), setting.train)
                config = TrainConfig.from_dict(merged)
                if model.match_params and target is not None:
                    config = config.replace(model=match_parameters(config.model, feature_spec, target))
                params = count_parameters(config.model, feature_spec)
                for seed in spec.seeds:
                    name = _slug(f"{spec.name}-{dataset.name}-{model.name}-{setting.name}-s{seed}")
                    run: dict[str, Any] = {"name": name, "storage_path": str(storage)}
                    if num_workers is not None:
                        run["num_workers"] = num_workers
                    runs.append((cell, seed, config.replace(training={"seed": seed}, run=run), params))
    return runs


# ---------------------------------------------------------------------------------------- results


@dataclass
class CellSummary:
    """Mean and standard deviation over seeds of one cell's metrics."""

    cell: Cell
    params: ParameterCount
    n: int
    mean: dict[str, float]
    std: dict[str, float]
    seconds: float


def metric_columns(spec: ExperimentSpec, tasks: Sequence[str]) -> list[str]:
    """The table's metric columns for a data set's binary tasks: ``task/metric`` in task order."""
    return [f"{task}/{metric}" for metric in spec.metrics for task in tasks]


def record_values(record: RunRecord, spec: ExperimentSpec) -> dict[str, float]:
    """A run's reported values: the spec's test metrics per task, and the expert-load entropy."""
    values = {}
    for column in metric_columns(spec, record.tasks):
        values[column] = record.metrics.get(f"test/{column}", float("nan"))
    if record.expert_load:
        entropies = [load_entropy(load) for load in record.expert_load.values()]
        values["load_entropy"] = float(np.nanmean(entropies))
        values["load_entropy_min"] = float(np.nanmin(entropies))
    return values


def summarize(records: Sequence[RunRecord], spec: ExperimentSpec) -> list[CellSummary]:
    """Mean and standard deviation (ddof 1; 0 for one seed) of every cell's values, in grid order."""
    by_cell: dict[Cell, list[RunRecord]] = {}
    for record in records:
        by_cell.setdefault(record.cell, []).append(record)
    out = []
    for cell, runs in by_cell.items():
        values = [record_values(r, spec) for r in runs]
        keys = list(values[0])
        mean, std = {}, {}
        for key in keys:
            column = np.array([v.get(key, np.nan) for v in values], dtype=np.float64)
            mean[key] = float(np.nanmean(column)) if np.isfinite(column).any() else float("nan")
            std[key] = float(np.nanstd(column, ddof=1)) if np.isfinite(column).sum() > 1 else 0.0
        seconds = float(np.mean([r.seconds for r in runs]))
        out.append(CellSummary(cell, runs[0].params, len(runs), mean, std, seconds))
    return out


@dataclass
class Advantage:
    """A cell's paired (same data set, setting and seed) difference to the baseline model's cell."""

    cell: Cell
    baseline: Cell
    mean: dict[str, float]
    std: dict[str, float]
    n: int


def advantages(records: Sequence[RunRecord], spec: ExperimentSpec) -> list[Advantage]:
    """Per cell, the mean and std over seeds of ``value - baseline value`` for every metric column."""
    if not spec.baseline:
        return []
    index = {(r.cell, r.seed): r for r in records}
    out = []
    cells = list(dict.fromkeys(r.cell for r in records))
    for cell in cells:
        if cell.model == spec.baseline:
            continue
        base_cell = Cell(cell.dataset, spec.baseline, cell.setting)
        pairs = [
            (record_values(index[(cell, s)], spec), record_values(index[(base_cell, s)], spec))
            for s in spec.seeds
            if (cell, s) in index and (base_cell, s) in index
        ]
        if not pairs:
            continue
        tasks = next(r.tasks for r in records if r.cell == cell)
        mean, std = {}, {}
        for column in metric_columns(spec, tasks):
            diffs = np.array([a[column] - b[column] for a, b in pairs])
            mean[column] = float(np.mean(diffs))
            std[column] = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0
        out.append(Advantage(cell, base_cell, mean, std, len(pairs)))
    return out


def _fmt(mean: float, std: float, n: int, digits: int = 4) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _signed(mean: float, std: float, n: int) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:+.4f} ± {std:.4f}" if n > 1 else f"{mean:+.4f}"


def findings(spec: ExperimentSpec, summaries: Sequence[CellSummary], advs: Sequence[Advantage]) -> list[str]:
    """Plain statements computed from the results (no judgement typed by hand).

    * with a baseline and numeric ``x`` values: for every other model and metric, the advantage at each
      ``x`` and whether it grows as ``x`` falls (Spearman's rank correlation between ``x`` and the
      advantage: negative means it grows as ``x`` falls);
    * with gates: the cell with the least balanced expert load and the most balanced one of the same model.
    """
    lines = []
    xs = {d.name: d.x for d in spec.datasets}
    if advs and all(x is not None for x in xs.values()) and len(xs) > 2:
        keys = sorted({(a.cell.model, a.cell.setting) for a in advs})
        for model, setting in keys:
            rows = sorted(
                (a for a in advs if (a.cell.model, a.cell.setting) == (model, setting)),
                key=lambda a: -xs[a.cell.dataset],
            )
            for column in rows[0].mean:
                x = np.array([xs[a.cell.dataset] for a in rows], dtype=np.float64)
                y = np.array([a.mean[column] for a in rows], dtype=np.float64)
                rho = _spearman(x, y)
                trend = (
                    "grows as x falls"
                    if rho < -0.5
                    else "shrinks as x falls"
                    if rho > 0.5
                    else "shows no clear trend"
                )
                points = ", ".join(f"{xs[a.cell.dataset]:g}: {a.mean[column]:+.4f}" for a in rows)
                label = model if setting == "default" else f"{model}/{setting}"
                lines.append(
                    f"{label} − {spec.baseline}, {column} by {spec.x_label} ({points}): the advantage "
                    f"{trend} (Spearman {rho:+.2f} between {spec.x_label} and the advantage)."
                )
    gated = [
        s for s in summaries if "load_entropy_min" in s.mean and math.isfinite(s.mean["load_entropy_min"])
    ]
    if len(gated) > 1:
        for s in sorted(gated, key=lambda s: s.mean["load_entropy_min"]):
            lines.append(
                f"{s.cell.dataset} {s.cell.label}: normalised expert-load entropy "
                f"{s.mean['load_entropy']:.3f} (mean over gates), "
                f"{s.mean['load_entropy_min']:.3f} (lowest gate)."
            )
        worst = min(gated, key=lambda s: s.mean["load_entropy_min"])
        best = max(gated, key=lambda s: s.mean["load_entropy_min"])
        lines.append(
            f"least balanced routing: {worst.cell.dataset} {worst.cell.label} (lowest gate's normalised "
            f"load entropy {worst.mean['load_entropy_min']:.3f}); most balanced: {best.cell.dataset} "
            f"{best.cell.label} ({best.mean['load_entropy_min']:.3f}); 1 is a uniform load, 0 one expert."
        )
    return lines


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    rx = np.argsort(np.argsort(x)).astype(np.float64)
    ry = np.argsort(np.argsort(y)).astype(np.float64)
    return float(np.corrcoef(rx, ry)[0, 1])


def results_markdown(
    spec: ExperimentSpec,
    summaries: Sequence[CellSummary],
    advs: Sequence[Advantage],
    facts: Sequence[str],
    header: str,
) -> str:
    """The report: per data set a table of mean ± std over seeds, the advantages, published numbers."""
    out = [f"### {spec.name}", "", header, ""]
    if spec.description:
        out += [spec.description.strip(), ""]
    for dataset in spec.datasets:
        rows = [s for s in summaries if s.cell.dataset == dataset.name]
        if not rows:
            continue
        columns = [k for k in dict.fromkeys(k for s in rows for k in s.mean) if k != "load_entropy_min"]
        title = dataset.name if dataset.x is None else f"{dataset.name} ({spec.x_label} = {dataset.x:g})"
        out += [f"**{title}** (test split, mean ± std over {rows[0].n} seed(s))", ""]
        out.append("| model | dense params | " + " | ".join(columns) + " | s/run |")
        out.append("|---|---:|" + "---:|" * len(columns) + "---:|")
        for s in rows:
            cells = [_fmt(s.mean.get(c, math.nan), s.std.get(c, 0.0), s.n) for c in columns]
            out.append(
                f"| {s.cell.label} | {s.params.dense:,} | " + " | ".join(cells) + f" | {s.seconds:.0f} |"
            )
        out.append("")
        published = spec.published.get(dataset.name)
        if published:
            pcols = list(next(iter(published.values())))
            out += [f"Published ({spec.published_source}):", ""]
            out.append("| model | " + " | ".join(pcols) + " |")
            out.append("|---|" + "---:|" * len(pcols))
            for model, values in published.items():
                out.append(f"| {model} | " + " | ".join(str(values.get(c, "")) for c in pcols) + " |")
            out.append("")
    if advs:
        out += [f"**Advantage over {spec.baseline}** (paired by seed; mean ± std of the difference)", ""]
        for dataset in dict.fromkeys(a.cell.dataset for a in advs):
            rows = [a for a in advs if a.cell.dataset == dataset]
            columns = list(dict.fromkeys(c for a in rows for c in a.mean))  # this data set's tasks
            out.append("| data set | model | " + " | ".join(columns) + " |")
            out.append("|---|---|" + "---:|" * len(columns))
            for a in rows:
                cells = [_signed(a.mean.get(c, float("nan")), a.std.get(c, 0.0), a.n) for c in columns]
                out.append(f"| {a.cell.dataset} | {a.cell.label} | " + " | ".join(cells) + " |")
            out.append("")
    if facts:
        out += ["Findings (computed):", ""] + [f"- {f}" for f in facts] + [""]
    return "\n".join(out)


def results_csv(summaries: Sequence[CellSummary]) -> str:
    """Long format: one row per cell and value, with mean, std and the number of seeds."""
    lines = ["dataset,model,setting,dense_params,embedding_params,metric,mean,std,n,seconds_per_run"]
    for s in summaries:
        for key in s.mean:
            lines.append(
                f"{s.cell.dataset},{s.cell.model},{s.cell.setting},{s.params.dense},{s.params.embedding},"
                f"{key},{s.mean[key]:.6f},{s.std[key]:.6f},{s.n},{s.seconds:.1f}"
            )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ plots


def metrics_figure(spec: ExperimentSpec, summaries: Sequence[CellSummary]) -> Any:
    """Test metrics per cell with std error bars: lines over ``x`` if every data set has one, else bars."""
    from recsys.report import plt

    xs = {d.name: d.x for d in spec.datasets}
    numeric = all(x is not None for x in xs.values()) and len(xs) > 1
    datasets = [d.name for d in spec.datasets if any(s.cell.dataset == d.name for s in summaries)]
    if numeric:
        columns = [k for k in summaries[0].mean if not k.startswith("load_entropy")]
        fig, axes = plt.subplots(1, len(columns), figsize=(5 * len(columns), 4), squeeze=False)
        labels = list(dict.fromkeys(s.cell.label for s in summaries))
        for ax, column in zip(axes[0], columns, strict=True):
            for label in labels:
                rows = sorted(
                    (s for s in summaries if s.cell.label == label), key=lambda s: xs[s.cell.dataset]
                )
                ax.errorbar(
                    [xs[s.cell.dataset] for s in rows],
                    [s.mean[column] for s in rows],
                    yerr=[s.std[column] for s in rows],
                    marker="o",
                    capsize=3,
                    label=label,
                )
            ax.set(xlabel=spec.x_label, ylabel=column, title=column)
            ax.legend(fontsize=8)
    else:
        fig, axes = plt.subplots(
            len(datasets), 1, figsize=(max(6.0, 1.6 * len(summaries)), 3.6 * len(datasets)), squeeze=False
        )
        for ax, dataset in zip(axes[:, 0], datasets, strict=True):
            rows = [s for s in summaries if s.cell.dataset == dataset]
            columns = [k for k in rows[0].mean if not k.startswith("load_entropy")]
            width = 0.8 / len(rows)
            for i, s in enumerate(rows):
                positions = np.arange(len(columns)) + (i - (len(rows) - 1) / 2) * width
                ax.bar(
                    positions,
                    [s.mean[c] for c in columns],
                    width,
                    yerr=[s.std[c] for c in columns],
                    capsize=2,
                    label=s.cell.label,
                )
            low = min(s.mean[c] - s.std[c] for s in rows for c in columns if math.isfinite(s.mean[c]))
            high = max(s.mean[c] + s.std[c] for s in rows for c in columns if math.isfinite(s.mean[c]))
            margin = max((high - low) * 0.3, 0.002)
            ax.set_ylim(low - margin, high + margin)
            ax.set_xticks(np.arange(len(columns)), columns)
            ax.set_title(dataset)
            ax.legend(fontsize=7, ncol=min(4, len(rows)))
    fig.suptitle(f"{spec.name}: test metrics (mean ± std over seeds)")
    fig.tight_layout()
    return fig


def advantage_figure(spec: ExperimentSpec, advs: Sequence[Advantage]) -> Any:
    """Paired advantage over the baseline per metric: over ``x`` when the data sets have one, else bars."""
    from recsys.report import plt

    xs = {d.name: d.x for d in spec.datasets}
    columns = list(dict.fromkeys(c for a in advs for c in a.mean))  # data sets may differ in tasks
    fig, axes = plt.subplots(1, len(columns), figsize=(5 * len(columns), 4), squeeze=False)
    labels = list(dict.fromkeys(a.cell.label for a in advs))
    numeric = all(xs[a.cell.dataset] is not None for a in advs)
    for ax, column in zip(axes[0], columns, strict=True):
        ax.axhline(0, color="0.5", linewidth=1)
        for i, label in enumerate(labels):
            rows = [a for a in advs if a.cell.label == label and column in a.mean]
            if numeric:
                rows.sort(key=lambda a: xs[a.cell.dataset])
                position = [xs[a.cell.dataset] for a in rows]
            else:
                names = list(dict.fromkeys(a.cell.dataset for a in advs))
                position = [names.index(a.cell.dataset) + i * 0.8 / len(labels) for a in rows]
            ax.errorbar(
                position,
                [a.mean[column] for a in rows],
                yerr=[a.std[column] for a in rows],
                marker="o",
                capsize=3,
                linestyle="-" if numeric else "none",
                label=label,
            )
        if not numeric:
            names = list(dict.fromkeys(a.cell.dataset for a in advs))
            ax.set_xticks(range(len(names)), names)
        ax.set(xlabel=spec.x_label if numeric else "data set", ylabel=f"Δ {column}", title=column)
        ax.legend(fontsize=8)
    fig.suptitle(f"{spec.name}: advantage over {spec.baseline} (paired by seed, mean ± std)")
    fig.tight_layout()
    return fig


def expert_load_grid_figure(spec: ExperimentSpec, records: Sequence[RunRecord]) -> Any:
    """Test-split expert load of every gated cell (its first seed): one panel per cell, bars per gate."""
    from recsys.report import plt

    firsts: dict[Cell, RunRecord] = {}
    for r in records:
        if r.expert_load and r.cell not in firsts:
            firsts[r.cell] = r
    cols = min(4, len(firsts))
    rows = math.ceil(len(firsts) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(firsts) :]:
        ax.set_visible(False)
    for ax, (cell, record) in zip(axes.flat, firsts.items(), strict=False):
        gates = list(record.expert_load)
        width = 0.8 / len(gates)
        for g, gate in enumerate(gates):
            load = np.asarray(record.expert_load[gate])
            ax.bar(np.arange(load.size) + (g - (len(gates) - 1) / 2) * width, load, width, label=gate)
            ax.axhline(1 / load.size, color="0.5", linestyle="--", linewidth=0.8)
        entropy = np.mean([load_entropy(v) for v in record.expert_load.values()])
        title = f"{cell.label}" if len(spec.datasets) == 1 else f"{cell.dataset}: {cell.label}"
        ax.set(title=f"{title}\nload entropy {entropy:.2f}", xlabel="expert", ylabel="share of rows")
        ax.legend(fontsize=6)
    fig.suptitle(f"{spec.name}: expert load per gate on the test split (seed {spec.seeds[0]})")
    fig.tight_layout()
    return fig


# -------------------------------------------------------------------------------------- the driver


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` produced."""

    out: Path
    parent_run_id: str | None
    records: list[RunRecord]
    summaries: list[CellSummary]
    advantages: list[Advantage]
    findings: list[str]
    markdown: str
    files: dict[str, Path]
    seconds: float


def machine_line() -> str:
    """``<cpus> CPUs, <platform>, <date>``: where and when results were produced."""
    return (
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {platform.system()}, "
        f"{dt.date.today().isoformat()}"
    )


def run_experiment(
    spec: ExperimentSpec,
    out: Path,
    *,
    tracking_uri: str | None = None,
    quick: bool = False,
    num_workers: int | None = None,
    fresh: bool = False,
    command: str = "",
    seeds: Sequence[int] | None = None,
    publish: Path | None = None,
    datasets: Sequence[str] | None = None,
) -> ExperimentResult:
    """Runs the grid (see the module docstring) and writes the results into ``out``.

    Args:
        spec: the experiment.
        out: the results folder (``data/``, ``ray/``, ``runs/``, the tables and plots).
        tracking_uri: MLflow tracking URI (default: ``sqlite:///OUT/mlflow.db``).
        quick: tiny data and one seed (``spec.quick``), for smoke tests.
        num_workers: Ray Train workers per run (default: the base config's).
        fresh: train every run again instead of reusing finished ones.
        command: the command line, written into the report.
        seeds: train these seeds instead of the spec's (e.g. one seed for a first look).
        publish: also copy the report (results.md, results.csv and the plots) into this folder, e.g. one
            that is committed (``out`` holds data, checkpoints and the MLflow store, and is not).
        datasets: run these data sets of the spec only (by name).

    Returns:
        The records, summaries, report and files.
    """
    from recsys.report import plt
    from recsys.tracking import Tracker
    from recsys.train.loop import run_training

    started = time.perf_counter()
    if quick:
        spec = spec.for_quick()
    if seeds is not None:
        spec = dataclasses.replace(spec, seeds=_seeds("--seeds", list(seeds)))
    if datasets is not None:
        names = [d.name for d in spec.datasets]
        unknown = sorted(set(datasets) - set(names))
        if unknown or not datasets:
            raise ValueError(
                f"--datasets: expected names of the spec's data sets {names}, got {list(datasets)}"
            )
        spec = dataclasses.replace(spec, datasets=tuple(d for d in spec.datasets if d.name in datasets))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    max_rows = spec.quick.max_rows if quick else 0
    prepared = {d.name: prepare_dataset(d, out / "data", max_rows) for d in spec.datasets}
    runs = _run_configs(spec, prepared, out / "ray", num_workers)
    experiment = runs[0][2].run.experiment
    tracker = Tracker(tracking_uri, experiment)
    parent = tracker.start_run(
        run_name=f"{spec.name}{'-quick' if quick else ''}",
        tags={"experiment.spec": spec.name, "experiment.quick": str(quick), "experiment.kind": "grid"},
    )
    status = "FAILED"
    try:
        tracker.log_params(
            {
                "spec": spec.name,
                "quick": quick,
                "seeds": list(spec.seeds),
                "datasets": [d.name for d in spec.datasets],
                "models": [m.name for m in spec.models],
                "settings": [s.name for s in spec.settings],
                "runs": len(runs),
            }
        )
        tracker.log_dict(dataclasses.asdict(spec), "spec.json")
        records = []
        for i, (cell, seed, config, params) in enumerate(runs):
            cache = out / "runs" / f"{config.run.name}.json"
            key = _digest(config.replace(run={"parent_run_id": "", "tags": {}}).to_dict())
            if cache.exists() and not fresh:
                saved = json.loads(cache.read_text())
                if saved.get("config_digest") == key:
                    record = RunRecord.from_dict(saved["record"])
                    record.reused = True
                    records.append(record)
                    print(f"[{i + 1}/{len(runs)}] {config.run.name}: reused ({cache})")
                    continue
            config = config.replace(
                run={
                    "parent_run_id": parent or "",
                    "tags": {
                        "experiment.spec": spec.name,
                        "experiment.dataset": cell.dataset,
                        "experiment.model": cell.model,
                        "experiment.setting": cell.setting,
                        "experiment.seed": str(seed),
                    },
                }
            )
            print(f"[{i + 1}/{len(runs)}] {config.run.name}: training ({params.dense:,} dense parameters)")
            t0 = time.perf_counter()
            trained = run_training(config, tracking_uri=tracking_uri)
            seconds = time.perf_counter() - t0
            tasks = [t.name for t in config.model.tasks if t.kind == "binary"]
            record = RunRecord(
                cell=cell,
                seed=seed,
                run_name=config.run.name,
                mlflow_run_id=trained.summary.get("mlflow_run_id"),
                seconds=seconds,
                params=params,
                metrics=dict(trained.summary.get("test", {})),
                expert_load=dict(trained.summary.get("expert_load", {})),
                tasks=tasks,
            )
            atomic_write(cache, json.dumps({"config_digest": key, "record": record.to_dict()}, indent=1))
            records.append(record)
            print(
                f"    {seconds:.0f} s: "
                + ", ".join(f"{k}={v:.4f}" for k, v in record_values(record, spec).items())
            )

        summaries = summarize(records, spec)
        advs = advantages(records, spec)
        facts = findings(spec, summaries, advs)
        training = sum(r.seconds for r in records) / 60
        header = (
            f"`{command or 'python -m pipelines.experiment --spec ' + spec.name}`: {len(records)} runs, "
            f"{training:.0f} min of training (1 run at a time) on {machine_line()}"
        )
        figures = {"metrics.png": metrics_figure(spec, summaries)}
        if advs:
            figures["advantage.png"] = advantage_figure(spec, advs)
        if any(r.expert_load for r in records):
            figures["expert_load.png"] = expert_load_grid_figure(spec, records)
        markdown = results_markdown(spec, summaries, advs, facts, header)
        markdown += "\n" + "\n".join(f"![{name}]({name})" for name in figures) + "\n"  # beside results.md
        files = {"results.md": out / "results.md", "results.csv": out / "results.csv"}
        atomic_write(files["results.md"], markdown)
        atomic_write(files["results.csv"], results_csv(summaries))
        files["records.json"] = out / "records.json"
        atomic_write(files["records.json"], json.dumps([r.to_dict() for r in records], indent=1))
        for name, figure in figures.items():
            files[name] = out / name
            tmp = out / f".{name}.tmp.png"
            figure.savefig(tmp, dpi=110)
            os.replace(tmp, files[name])
            plt.close(figure)
        for path in files.values():
            tracker.log_artifact(path, "results")
        if publish is not None:
            publish.mkdir(parents=True, exist_ok=True)
            for name in [n for n in files if n != "records.json"]:
                tmp = publish / f".{name}.tmp"
                shutil.copyfile(files[name], tmp)
                os.replace(tmp, publish / name)
        for s in summaries:
            for key, value in s.mean.items():
                if math.isfinite(value):
                    tracker.log_metrics(
                        {_slug(f"{s.cell.dataset}.{s.cell.label}.{key}").replace("/", "."): value}
                    )
        status = "FINISHED"
    finally:
        tracker.end_run(status)
    return ExperimentResult(
        out, parent, records, summaries, advs, facts, markdown, files, time.perf_counter() - started
    )


# ------------------------------------------------------------------------------ reading runs back


def run_metric_history(
    tracking_uri: str, run_id: str, experiment: str = "recsys"
) -> dict[str, list[tuple[int, float]]]:
    """Every metric of an MLflow run with its history: name -> ``[(step, value), ...]`` sorted by step.

    Args:
        tracking_uri: the MLflow store.
        run_id: the run.
        experiment: an experiment name for the tracker (the run may be in any experiment).
    """
    from recsys.tracking import Tracker

    client = Tracker(tracking_uri, experiment).client
    run = client.get_run(run_id)
    out = {}
    for key in run.data.metrics:
        history = client.get_metric_history(run_id, key)
        out[key] = sorted((int(m.step), float(m.value)) for m in history)
    return out


def expert_load_history(
    history: Mapping[str, Sequence[tuple[int, float]]], split: str = "valid"
) -> dict[str, np.ndarray]:
    """Expert load per gate at every evaluation: gate -> ``(evaluations, experts)`` array, by step.

    Args:
        history: :func:`run_metric_history`'s output.
        split: ``valid`` (every epoch) or ``test`` (the end).
    """
    cells: dict[str, dict[int, dict[int, float]]] = {}
    prefix = f"{split}/"
    for key, points in history.items():
        if key.startswith(prefix) and "/load/expert" in key:
            gate, expert = key[len(prefix) :].split("/load/expert")
            for step, value in points:
                cells.setdefault(gate, {}).setdefault(step, {})[int(expert)] = value
    out = {}
    for gate, by_step in sorted(cells.items()):
        steps = sorted(by_step)
        experts = max(max(row) for row in by_step.values()) + 1
        grid = np.full((len(steps), experts), np.nan)
        for i, step in enumerate(steps):
            for e, v in by_step[step].items():
                grid[i, e] = v
        out[gate] = grid
    return out


def run_test_predictions(
    tracking_uri: str, run_id: str, features: str | Path, experiment: str = "recsys"
) -> Any:
    """A run's test predictions (``p_<task>``) joined with the labels of the features' test split.

    Args:
        tracking_uri: the MLflow store.
        run_id: the run.
        features: the model-ready data set the run trained on (its ``test`` split has the labels).
        experiment: an experiment name for the tracker (the run may be in any experiment).

    Returns:
        A polars DataFrame: ``impression_id``, the label columns and ``p_<task>`` columns.
    """
    import polars as pl

    from features.spec import FeatureSpec
    from recsys.tracking import Tracker

    client = Tracker(tracking_uri, experiment).client
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "report/test_predictions.parquet", tmp)
        preds = pl.read_parquet(path)
    spec = FeatureSpec.load(Path(features) / "spec.json")
    labels = [label.name for label in spec.feature_config.labels]
    test = pl.read_parquet(Path(features) / "test" / "*.parquet", columns=["impression_id", *labels])
    return preds.join(test, on="impression_id", how="inner")


def latest_run(tracking_uri: str, experiment: str, run_id: str = "") -> dict[str, Any]:
    """A training run of an MLflow experiment: ``run_id`` if given, else the latest finished one.

    Grid and search parent runs (which train nothing) are skipped: a training run has a ``features``
    parameter.

    Returns:
        ``{"run_id", "run_name", "params"}``.

    Raises:
        ValueError: the experiment has no finished training run.
    """
    from recsys.tracking import Tracker

    tracker = Tracker(tracking_uri, experiment)
    client = tracker.client
    if run_id:
        run = client.get_run(run_id)
    else:
        runs = client.search_runs(
            [tracker.experiment_id],
            filter_string="attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=100,
        )
        run = next((r for r in runs if "features" in r.data.params), None)
        if run is None:
            raise ValueError(f"experiment {experiment!r} at {tracking_uri}: no finished training run")
    return {"run_id": run.info.run_id, "run_name": run.info.run_name, "params": dict(run.data.params)}
