"""Declarative feature configuration: typed dataclasses loaded from YAML and validated on construction.

A config names every model input and how it is computed from the (derived) columns of the data:

* ``categorical``: one id per row, from a vocabulary (values seen at least ``min_count`` times in the
  training window; index 0 is the out-of-vocabulary and null bucket) or hashed into ``hash_buckets``
  buckets (integer sources only; 0 is null).
* ``numeric``: a float, with nulls and NaNs filled (``fill_null``), optionally divided by a fitted group
  median (``relative_to``), then a chain of ``transforms`` (``log1p``, ``standardize``, ``bucketize``).
  With ``bucketize`` last, the output is an id (bucket index) instead of a float.
* ``multi_hot``: a list of ids (a bag), with its own vocabulary, hashing, or the vocabulary of another
  categorical feature (``vocab_of``) so that both can share one embedding table.
* ``affinity``: a count, rate, share or mean over the events before the row (what the user, or everybody,
  did with the candidate's item, category, brand or shop; :mod:`features.affinity`), then fitted and
  transformed like a numeric feature.

Labels are declared separately; a feature may never read a label column.

Example:
    >>> cfg = FeatureConfig.from_dict({
    ...     "name": "tiny", "source": "flat",
    ...     "labels": [{"name": "y", "column": "y"}],
    ...     "features": [{"name": "city", "kind": "categorical"}],
    ... })
    >>> cfg.features[0].source
    'city'
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# invalid, from_mapping and shipped_config live in features.checks; other modules still import them from here.
from features import affinity
from features.affinity import AFFINITY
from features.checks import (
    as_tuple,
    check_choice,
    check_int,
    from_mapping,
    invalid,
    is_int,
    is_number,
    shipped_config,
)

CATEGORICAL, NUMERIC, MULTI_HOT = "categorical", "numeric", "multi_hot"
FEATURE_KINDS = (CATEGORICAL, NUMERIC, MULTI_HOT, AFFINITY)
AFFINITY_FIELDS = ("by", "key", "event", "stat", "per", "window_days", "smoothing", "value")
TRANSFORMS = ("log1p", "standardize", "bucketize")
SOURCES = ("ecommerce", "flat")


@dataclass(frozen=True)
class LabelConfig:
    """One task label.

    Attributes:
        name: the label's name in the model-ready output (and the task's name).
        column: the raw column it is computed from (defaults to ``name``).
        kind: ``binary`` (0/1) or ``regression``.
        positive_values: for binary labels from a raw categorical column: the values that mean 1.
        positive_prefix: for binary labels: a raw string value starting with this prefix means 1.
    """

    name: str
    column: str = ""
    kind: str = "binary"
    positive_values: tuple[Any, ...] = ()
    positive_prefix: str = ""

    def __post_init__(self) -> None:
        where = f"labels[{self.name}]"
        if not isinstance(self.name, str) or not self.name:
            raise invalid("labels", "name", self.name, "expected a non-empty string")
        if not self.column:
            object.__setattr__(self, "column", self.name)
        object.__setattr__(self, "positive_values", as_tuple(where, "positive_values", self.positive_values))
        check_choice(where, "kind", self.kind, ("binary", "regression"))
        if self.kind == "regression" and (self.positive_values or self.positive_prefix):
            raise invalid(where, "kind", self.kind, "positive_values/positive_prefix need kind 'binary'")
        if self.positive_values and self.positive_prefix:
            raise invalid(
                where, "positive_prefix", self.positive_prefix, "give positive_values or it, not both"
            )


@dataclass(frozen=True)
class FeatureDef:
    """One model input.

    Attributes:
        name: the column name in the model-ready output.
        kind: ``categorical``, ``numeric`` or ``multi_hot``.
        source: the input column (defaults to ``name``); derived columns are listed in README.
        min_count: vocabulary: keep values seen at least this often in the training window.
        max_size: vocabulary: keep at most this many values (most frequent first); 0 means no limit.
        hash_buckets: hash integer ids into this many buckets instead of fitting a vocabulary.
        vocab_of: multi_hot only: map ids with the vocabulary of this categorical feature.
        fill_null: numeric: ``mean``, ``median``, ``zero`` or a number; applied to nulls and NaNs.
        relative_to: numeric: divide by the training-window median of ``source`` within this column's
            groups (e.g. price relative to its category's median); unseen groups use the global median.
        transforms: numeric: ``log1p`` (of max(x, 0)), ``standardize`` (fitted mean and std),
            ``bucketize`` (last; turns the feature into an id).
        boundaries: bucketize: fixed boundaries; if empty, ``num_buckets`` quantiles are fitted.
        num_buckets: bucketize: number of fitted quantile buckets.
        max_length: multi_hot: keep at most this many ids (the most recent, for history lists).
        by, key, event, stat, per, window_days, smoothing, value: affinity only; see
            :mod:`features.affinity`.
    """

    name: str
    kind: str
    source: str = ""
    min_count: int = 1
    max_size: int = 0
    hash_buckets: int = 0
    vocab_of: str = ""
    fill_null: Any = "mean"
    relative_to: str = ""
    transforms: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()
    num_buckets: int = 0
    max_length: int = 0
    by: str = "user"
    key: str = ""
    event: str = "click"
    stat: str = "count"
    per: str = ""
    window_days: int = 0
    smoothing: float = 10.0
    value: str = ""

    def __post_init__(self) -> None:
        where = f"features[{self.name}]"
        if not isinstance(self.name, str) or not self.name:
            raise invalid("features", "name", self.name, "expected a non-empty string")
        check_choice(where, "kind", self.kind, FEATURE_KINDS)
        if self.kind == AFFINITY:
            self._check_affinity(where)
            if self.source and self.source != affinity.derived_column(self.name):
                raise invalid(where, "source", self.source, "affinity features compute their own column")
            object.__setattr__(self, "source", affinity.derived_column(self.name))
        else:
            defaults = {f: FeatureDef.__dataclass_fields__[f].default for f in AFFINITY_FIELDS}
            for name, default in defaults.items():
                if getattr(self, name) != default:
                    raise invalid(where, name, getattr(self, name), "only affinity features take it")
        if not self.source:
            object.__setattr__(self, "source", self.name)
        object.__setattr__(self, "transforms", as_tuple(where, "transforms", self.transforms))
        boundaries = as_tuple(where, "boundaries", self.boundaries)
        bad = [b for b in boundaries if not is_number(b)]
        if bad:
            raise invalid(where, "boundaries", bad[0], "expected finite numbers")
        object.__setattr__(self, "boundaries", tuple(float(b) for b in boundaries))
        check_int(where, "min_count", self.min_count, minimum=1)
        for name in ("max_size", "hash_buckets", "num_buckets", "max_length"):
            check_int(where, name, getattr(self, name), minimum=0)
        if self.kind in (NUMERIC, AFFINITY):
            self._check_numeric(where)
        else:
            for name in ("transforms", "relative_to", "boundaries", "num_buckets"):
                if getattr(self, name):
                    raise invalid(where, name, getattr(self, name), f"only numeric features take {name}")
            if self.hash_buckets and self.vocab_of:
                raise invalid(where, "vocab_of", self.vocab_of, "give hash_buckets or vocab_of, not both")
        if self.vocab_of and self.kind != MULTI_HOT:
            raise invalid(where, "vocab_of", self.vocab_of, "only multi_hot features take vocab_of")
        if self.max_length and self.kind != MULTI_HOT:
            raise invalid(where, "max_length", self.max_length, "only multi_hot features take max_length")

    def _check_numeric(self, where: str) -> None:
        if self.hash_buckets or self.vocab_of:
            raise invalid(where, "kind", self.kind, "numeric features take no hash_buckets/vocab_of")
        bad = [t for t in self.transforms if t not in TRANSFORMS]
        if bad:
            raise invalid(where, "transforms", bad[0], f"expected each of {list(TRANSFORMS)}")
        if "bucketize" in self.transforms[:-1]:
            raise invalid(where, "transforms", list(self.transforms), "bucketize must be the last transform")
        if "bucketize" in self.transforms:
            if not self.boundaries and self.num_buckets < 2:
                raise invalid(where, "num_buckets", self.num_buckets, "bucketize needs boundaries or >= 2")
            if list(self.boundaries) != sorted(set(self.boundaries)):
                raise invalid(where, "boundaries", list(self.boundaries), "expected strictly increasing")
        elif self.boundaries or self.num_buckets:
            raise invalid(where, "transforms", list(self.transforms), "boundaries need a bucketize transform")
        fill = self.fill_null
        if not (fill in ("mean", "median", "zero") or is_number(fill)):
            raise invalid(where, "fill_null", fill, "expected 'mean', 'median', 'zero' or a number")

    def _check_affinity(self, where: str) -> None:
        check_choice(where, "by", self.by, affinity.BY)
        check_choice(where, "key", self.key, ("", *affinity.KEYS))
        check_choice(where, "event", self.event, affinity.EVENTS)
        check_choice(where, "stat", self.stat, affinity.STATS)
        check_int(where, "window_days", self.window_days, minimum=0)
        if not is_number(self.smoothing) or self.smoothing < 0:
            raise invalid(where, "smoothing", self.smoothing, "expected a number >= 0")
        if self.by == "all" and not self.key:
            raise invalid(where, "key", self.key, "by: all counts everybody's events on a key; name one")
        if self.stat == "rate":
            check_choice(where, "per", affinity.rate_per(self), ("impression", "click"))
            if affinity.EVENTS.index(self.event) <= affinity.EVENTS.index(affinity.rate_per(self)):
                follows = f"a rate needs an event that follows per {affinity.rate_per(self)!r}"
                raise invalid(where, "event", self.event, follows)
        elif self.per:
            raise invalid(where, "per", self.per, "only stat: rate takes per")
        if self.stat == "share" and (self.by != "user" or not self.key):
            raise invalid(where, "stat", self.stat, "a share is the user's events on a key: by: user, a key")
        if self.stat in ("mean", "gap"):
            check_choice(where, "value", self.value, affinity.VALUES)
        elif self.value:
            raise invalid(where, "value", self.value, "only stat: mean or gap takes value")

    @property
    def is_bucketized(self) -> bool:
        """True when the numeric feature ends in ``bucketize`` and so yields an id."""
        return bool(self.transforms) and self.transforms[-1] == "bucketize"


@dataclass(frozen=True)
class SplitConfig:
    """How rows are split into train, validation and test.

    Attributes:
        method: ``time`` (by the time column: the last ``test_days`` days are test, the
            ``validation_days`` before them validation) or ``hash`` (by a stable hash of the row number,
            for tables without time).
        validation_days: time split: days of validation data.
        test_days: time split: days of test data.
        valid_start: time split: an explicit ISO start of validation (overrides the days).
        test_start: time split: an explicit ISO start of test (overrides the days).
        validation_fraction: hash split: the share of rows in validation.
        test_fraction: hash split: the share of rows in test.
        seed: hash split: the hash seed.
    """

    method: str = "time"
    validation_days: int = 3
    test_days: int = 3
    valid_start: str = ""
    test_start: str = ""
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("split", "method", self.method, ("time", "hash"))
        for name in ("validation_days", "test_days"):
            check_int("split", name, getattr(self, name), minimum=0)
        for name in ("valid_start", "test_start"):
            value = getattr(self, name)
            if isinstance(value, dt.date):  # YAML reads an unquoted 2024-01-10 as a date, not a string
                value = value.isoformat()
                object.__setattr__(self, name, value)
            if not isinstance(value, str):
                raise invalid("split", name, value, "expected an ISO date or datetime")
            if value:
                try:
                    dt.datetime.fromisoformat(value)
                except ValueError:
                    raise invalid("split", name, value, "expected an ISO date or datetime") from None
        if bool(self.valid_start) != bool(self.test_start):
            raise invalid("split", "test_start", self.test_start, "give both valid_start and test_start")
        if self.valid_start and self.valid_start > self.test_start:
            raise invalid("split", "valid_start", self.valid_start, "expected valid_start <= test_start")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not is_number(value) or not 0 <= value < 1:
                raise invalid("split", name, value, "expected a number in [0, 1)")
        if self.validation_fraction + self.test_fraction >= 1:
            raise invalid("split", "test_fraction", self.test_fraction, "validation + test must be < 1")


@dataclass(frozen=True)
class HistoryConfig:
    """User click history, computed strictly from events before each row's time.

    Attributes:
        max_length: how many of the most recent clicked items and categories to keep.
        windows_days: click-count windows, in days (``user_clicks_{d}d`` columns).
    """

    max_length: int = 20
    windows_days: tuple[int, ...] = (1, 7)

    def __post_init__(self) -> None:
        object.__setattr__(self, "windows_days", as_tuple("history", "windows_days", self.windows_days))
        check_int("history", "max_length", self.max_length, minimum=1)
        for d in self.windows_days:
            if not is_int(d) or d < 1:
                raise invalid("history", "windows_days", list(self.windows_days), "expected integers >= 1")


@dataclass(frozen=True)
class FeatureConfig:
    """The whole feature configuration of one data set.

    Attributes:
        name: a name for the config (recorded in the spec).
        source: ``ecommerce`` (impressions joined with users and items, with derived features) or
            ``flat`` (one table used as it is).
        labels: the task labels.
        features: the model inputs.
        split: the train/validation/test split.
        history: user-history settings (ecommerce only).
        passthrough: raw columns copied to the output unchanged (keys for evaluation and scoring).
        time_column: the event time column (ecommerce: ``ts``).
        rows_per_file: rows per output Parquet file.
    """

    name: str
    source: str
    labels: tuple[LabelConfig, ...]
    features: tuple[FeatureDef, ...]
    split: SplitConfig = field(default_factory=SplitConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    passthrough: tuple[str, ...] = ()
    time_column: str = "ts"
    rows_per_file: int = 1_000_000

    def __post_init__(self) -> None:
        check_choice("config", "source", self.source, SOURCES)
        object.__setattr__(self, "passthrough", as_tuple("config", "passthrough", self.passthrough))
        if not self.features:
            raise invalid("config", "features", list(self.features), "expected at least one feature")
        check_int("config", "rows_per_file", self.rows_per_file, minimum=1)
        names = [f.name for f in self.features] + [lab.name for lab in self.labels] + list(self.passthrough)
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise invalid(
                "config",
                "features",
                dup[0],
                "output column names must be unique (features, labels and passthrough)",
            )
        label_columns = {lab.column for lab in self.labels} | {lab.name for lab in self.labels}
        by_name = {f.name: f for f in self.features}
        for f in self.features:
            if f.source in label_columns:
                raise invalid(
                    f"features[{f.name}]", "source", f.source, "a feature may not read a label column"
                )
            if f.relative_to in label_columns:
                raise invalid(f"features[{f.name}]", "relative_to", f.relative_to, "a label column")
            if f.vocab_of:
                other = by_name.get(f.vocab_of)
                if other is None or other.kind != CATEGORICAL:
                    raise invalid(
                        f"features[{f.name}]", "vocab_of", f.vocab_of, "expected a categorical feature"
                    )
        if self.source != "ecommerce" and any(f.kind == AFFINITY for f in self.features):
            bad = next(f for f in self.features if f.kind == AFFINITY)
            raise invalid(
                f"features[{bad.name}]", "kind", bad.kind, "affinity features need the ecommerce source"
            )
        if self.source == "ecommerce" and self.split.method != "time":
            raise invalid("split", "method", self.split.method, "ecommerce data is split by time")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureConfig:
        """Builds a config from plain data (as loaded from YAML)."""
        if not isinstance(data, dict):
            raise ValueError(f"config: expected a mapping, got {data!r}")
        data = dict(data)
        for key in ("name", "source", "features"):
            if key not in data:
                raise ValueError(f"config.{key}: missing required field")
        labels = as_tuple("config", "labels", data.get("labels") or ())
        features = as_tuple("config", "features", data["features"] or ())
        data["labels"] = tuple(from_mapping(LabelConfig, lab, f"labels[{i}]") for i, lab in enumerate(labels))
        data["features"] = tuple(
            from_mapping(FeatureDef, f, f"features[{i}]") for i, f in enumerate(features)
        )
        data["split"] = from_mapping(SplitConfig, data.get("split") or {}, "split")
        data["history"] = from_mapping(HistoryConfig, data.get("history") or {}, "history")
        return from_mapping(cls, data, "config")

    @classmethod
    def from_yaml(cls, path: str | Path) -> FeatureConfig:
        """Loads and validates a YAML config file.

        ``extends: NAME`` (a shipped config or a YAML path, relative to this file) starts from that config:
        this file's ``features`` are added after the base's, and its other fields replace the base's.
        Errors name the file.
        """
        data = _resolved_yaml(Path(path))
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def feature(self, name: str) -> FeatureDef:
        """Returns the feature called ``name``."""
        return next(f for f in self.features if f.name == name)


CONFIG_DIR = Path(__file__).parent / "configs"


def builtin_config(name: str) -> Path:
    """Path of a feature config shipped with the package (``ecommerce``, ``census_group1``, ...)."""
    return shipped_config(CONFIG_DIR, name)


def _resolved_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML mapping of ``path`` with its ``extends`` chain merged in (see ``FeatureConfig.from_yaml``)."""
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML{_yaml_problem(exc)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a YAML text file (not UTF-8)") from None
    if not isinstance(data, dict) or "extends" not in data:
        return data
    data = dict(data)
    parent = data.pop("extends")
    if not isinstance(parent, str) or not parent:
        raise invalid(str(path), "extends", parent, "expected a shipped config name or a YAML path")
    base_path = Path(parent) if parent.endswith((".yaml", ".yml")) else builtin_config(parent)
    if not base_path.is_absolute() and not base_path.exists():
        base_path = path.parent / base_path
    if base_path.resolve() in seen:
        raise invalid(str(path), "extends", parent, "the configs extend each other in a loop")
    base = _resolved_yaml(base_path, (*seen, path.resolve()))
    features = list(base.get("features") or []) + list(data.pop("features", None) or [])
    return {**base, **data, "features": features}


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what a YAML syntax error is: `` at line L, column C: problem (context at line L)``."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or problem is None:
        return f": {exc}"
    text = f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None:
        text += f" ({context} started at line {start.line + 1}, column {start.column + 1})"
    return text
