"""The experiment spec: a grid of data sets x models x settings x seeds, loaded from YAML and validated.

Specs ship as package data in ``recsys/experiments/specs/``; :func:`load_spec` takes a shipped name or a
YAML path. Every error names the field and the value.

Example:
    >>> spec = load_spec("gating")
    >>> len(spec.models), spec.seeds
    (6, (0, 1, 2))
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from features.checks import check_choice, check_int, config_path, from_mapping, invalid, is_int, is_number
from recsys.experiments.matching import deep_merge

SPEC_DIR = Path(__file__).parent / "specs"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
        world: the truth model, one of :data:`synth.worlds.WORLDS` (``default``, ``interest``, ``daypart``).
    """

    impressions: int = 100_000
    seed: int = 7
    task_correlation: float = 0.5
    n_users: int = 0
    n_items: int = 0
    world: str = "default"

    def __post_init__(self) -> None:
        from synth.worlds import WORLDS

        w = "dataset.generate"
        for name, low in (("impressions", 1), ("seed", 0), ("n_users", 0), ("n_items", 0)):
            check_int(w, name, getattr(self, name), minimum=low)
        check_choice(w, "world", self.world, tuple(WORLDS))
        rho = self.task_correlation
        if not is_number(rho) or not -1 <= rho <= 1:
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
        if self.x is not None and not is_number(self.x):
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
            check_int("quick", name, getattr(self, name), minimum=0)
        object.__setattr__(self, "seeds", check_seeds("quick", self.seeds))


def check_seeds(where: str, seeds: Any) -> tuple[int, ...]:
    """``seeds`` as a tuple of distinct integers >= 0; the error names ``where.seeds`` and the value."""
    if not isinstance(seeds, list | tuple) or not seeds:
        raise invalid(where, "seeds", seeds, "expected a non-empty list of integers >= 0")
    if not all(is_int(s) and s >= 0 for s in seeds):
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
        object.__setattr__(self, "seeds", check_seeds(w, self.seeds))
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
        data["base"] = _mapping("experiment", "base", _base_config(data["base"]))
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


def _base_config(base: Any) -> Any:
    """The base train config: a mapping as given, else the YAML of a path or of a shipped train config."""
    if not isinstance(base, str):
        return base
    from recsys.train.config import CONFIG_DIR

    return yaml.safe_load(config_path(base, CONFIG_DIR, "train config").read_text())


def spec_path(name_or_path: str | Path) -> Path:
    """The YAML file of a spec: a path, or a shipped name."""
    return Path(config_path(name_or_path, SPEC_DIR, "spec"))


def load_spec(name_or_path: str | Path) -> ExperimentSpec:
    """An experiment spec from a YAML path or a shipped name."""
    return ExperimentSpec.from_yaml(spec_path(name_or_path))
