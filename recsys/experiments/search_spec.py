"""The search spec: dotted paths of a train config mapped to distributions, and ASHA's settings.

A :class:`SearchSpec` (YAML, e.g. the shipped ``recsys/experiments/specs/search_mmoe.yaml``) maps dotted
paths of a train config (``training.dense_lr``, ``model.arch.num_experts``, ...) to distributions;
:func:`apply_params` sets a trial's values in the base config. Every error names the field and the value.

Example:
    >>> search = load_search("search_mmoe")
    >>> search.space["model.arch.num_experts"]
    Distribution(kind='choice', values=(4, 8))
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from features.checks import check_choice, check_int, config_path, from_mapping, invalid, is_number
from recsys.experiments.spec import SPEC_DIR

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")


@dataclass(frozen=True)
class Distribution:
    """A search dimension.

    Attributes:
        kind: ``loguniform`` or ``uniform`` (``[low, high]``), ``randint`` (``[low, high)``) or ``choice``
            (a list of values, which may be lists themselves, e.g. layer sizes).
        values: the bounds, or the choices.
    """

    kind: str
    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        where = "search.space"
        check_choice(where, "kind", self.kind, DISTRIBUTIONS)
        if not self.values:
            raise invalid(where, self.kind, list(self.values), "expected values")
        if self.kind != "choice":
            if len(self.values) != 2 or not all(is_number(v) for v in self.values):
                raise invalid(where, self.kind, list(self.values), "expected [low, high]")
            low, high = self.values
            if not low < high or (self.kind == "loguniform" and low <= 0):
                raise invalid(where, self.kind, list(self.values), "expected 0 < low < high for loguniform")

    @classmethod
    def from_yaml(cls, path: str, data: Any) -> Distribution:
        """``{loguniform: [1e-4, 1e-2]}``, ``{choice: [4, 8]}``, ...; a bare list means ``choice``."""
        if isinstance(data, list):
            return cls("choice", tuple(data))
        if not isinstance(data, dict) or len(data) != 1:
            raise invalid("search.space", path, data, "expected {kind: values}, e.g. {choice: [4, 8]}")
        ((kind, values),) = data.items()
        if not isinstance(values, list):
            raise invalid("search.space", path, data, "expected a list of values")
        return cls(kind, tuple(values))

    def to_tune(self) -> Any:
        """The Ray Tune search domain."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        return {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[self.kind](
            low, high
        )


@dataclass(frozen=True)
class SearchSpec:
    """A hyperparameter search.

    Attributes:
        space: dotted path in the train config (``training.dense_lr``) -> distribution.
        num_samples: trials.
        max_concurrent_trials: trials at once (each takes ``run.num_workers`` Ray Train workers); two
            at once on a 2-core machine have left both trials waiting on Ray Data reads (see README).
        grace_period: ASHA: epochs every trial gets before it can be stopped.
        reduction_factor: ASHA: 1 in this many trials goes on at each rung.
        seed: the random search's seed.
        name: the search's name (folders, the MLflow parent run).
    """

    space: dict[str, Distribution]
    num_samples: int = 8
    max_concurrent_trials: int = 1
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0
    name: str = "search"

    def __post_init__(self) -> None:
        w = "search"
        if not self.space:
            raise invalid(w, "space", self.space, "expected at least one dimension")
        for name, low in (
            ("num_samples", 1),
            ("max_concurrent_trials", 1),
            ("grace_period", 1),
            ("reduction_factor", 2),
            ("seed", 0),
        ):
            check_int(w, name, getattr(self, name), minimum=low)
        for path in self.space:
            if not path.startswith(("model.", "training.")):
                raise invalid(w, "space", path, "expected paths under 'model.' or 'training.'")

    @classmethod
    def from_dict(cls, data: Any) -> SearchSpec:
        """Builds a spec from plain data (as loaded from YAML)."""
        if not isinstance(data, dict):
            raise ValueError(f"search: expected a mapping, got {data!r}")
        data = dict(data)
        space = data.get("space")
        if not isinstance(space, dict):
            raise invalid("search", "space", space, "expected a mapping of dotted paths to distributions")
        data["space"] = {path: Distribution.from_yaml(path, d) for path, d in space.items()}
        return from_mapping(cls, data, "search")

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpec:
        """Loads and validates a YAML search spec."""
        with open(path) as fh:
            return cls.from_dict(yaml.safe_load(fh))


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """``base`` (a train config as plain data) with the dotted-path values of ``params`` set.

    Raises:
        ValueError: a path that does not name a field of the config (a typo would search nothing).

    Example:
        >>> apply_params({"training": {"dense_lr": 0.001}}, {"training.dense_lr": 0.01})
        {'training': {'dense_lr': 0.01}}
    """
    out = copy.deepcopy(base)
    for path, value in params.items():
        node = out
        *parents, leaf = path.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise invalid("search", "space", path, "expected a path of the train config")
            node = node[key]
        if leaf not in node:
            raise invalid("search", "space", path, "expected a field of the train config")
        node[leaf] = value
    return out


def load_search(name_or_path: str | Path) -> SearchSpec:
    """A search spec from a YAML path or a shipped name (``recsys/experiments/specs/<name>.yaml``)."""
    return SearchSpec.from_yaml(config_path(name_or_path, SPEC_DIR, "search"))
