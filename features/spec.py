"""Fitting a feature config into a versioned spec, and applying a spec to any data.

``fit`` learns vocabularies and statistics from training-window rows only and returns a
:class:`FeatureSpec`: the config plus every fitted value, saved as JSON with a content hash. ``apply``
turns derived rows into model-ready columns with polars expressions built from the spec alone, so the
training and the scoring paths run the same code:

* categorical and bucketized features: ``Int64`` ids in ``[0, num_embeddings)``, 0 = out of vocabulary
  or null;
* multi-hot features: ``List(Int64)`` of such ids;
* numeric features: ``Float32``;
* labels: ``Float32`` (binary 0/1 or the regression target).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from features.checks import non_finite, read_json_object
from features.config import AFFINITY, CATEGORICAL, MULTI_HOT, NUMERIC, FeatureConfig, FeatureDef, LabelConfig
from features.derive import HIST_STATE, gather_lists
from features.files import atomic_write

FORMAT_VERSION = 1
# Stable integer hash: ((x mod P) * A + C) mod P, with P the Mersenne prime 2^31 - 1. Every intermediate
# fits in int64, so it needs no overflow semantics and is the same in every polars version (polars' own
# ``hash`` is not stable across versions, which would silently skew a saved spec).
_P, _A, _C = 2_147_483_647, 1_103_515_245, 12_345
_MIN_STD = 1e-12
DENSE, ID, ID_LIST = "dense", "id", "id_list"


def _stat(value: float) -> float:
    """A fitted statistic, rounded to 12 significant digits.

    Parallel float sums differ in the last bits with the data's chunk layout; the content hash must not.
    """
    return float(f"{value:.12g}")


def _stable_hash(x: pl.Expr, seed: int = 0) -> pl.Expr:
    """Maps integers to [0, P) deterministically; two rounds so that consecutive ids spread out."""
    h = ((x % _P) + _P) % _P
    for round_ in range(2):
        h = (h * _A + _C + seed + round_) % _P
    return h


@dataclass
class FeatureSpec:
    """A fitted feature config: everything ``apply`` needs, and nothing else.

    Attributes:
        config: the feature config as plain data (as in its YAML).
        fitted: per feature name, the fitted state (vocabulary, statistics, output kind, cardinality).
        split: the resolved split (time boundaries as ISO strings, or the hash split's fractions).
        format_version: the spec file format.
    """

    config: dict[str, Any]
    fitted: dict[str, dict[str, Any]]
    split: dict[str, Any]
    format_version: int = FORMAT_VERSION
    _parsed: FeatureConfig | None = field(default=None, repr=False, compare=False)

    @property
    def feature_config(self) -> FeatureConfig:
        """The validated config this spec was fitted from."""
        if self._parsed is None:
            self._parsed = FeatureConfig.from_dict(self.config)
        return self._parsed

    @property
    def content_hash(self) -> str:
        """sha256 of the spec's content; equal specs have equal hashes, whenever they were fitted."""
        return hashlib.sha256(self._canonical().encode()).hexdigest()

    def _canonical(self) -> str:
        body = {
            "format_version": self.format_version,
            "config": self.config,
            "fitted": self.fitted,
            "split": self.split,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)

    # The model reads these three to size its inputs.
    def dense_features(self) -> list[str]:
        """Names of the float features, in config order."""
        return [f.name for f in self.feature_config.features if self.fitted[f.name]["output"] == DENSE]

    def sparse_features(self) -> dict[str, int]:
        """Id and id-list features with their number of embeddings, in config order."""
        return {
            f.name: self.fitted[f.name]["num_embeddings"]
            for f in self.feature_config.features
            if self.fitted[f.name]["output"] in (ID, ID_LIST)
        }

    def label_names(self) -> list[str]:
        """Task label names, in config order."""
        return [lab.name for lab in self.feature_config.labels]

    def to_json(self) -> str:
        """The spec as JSON (with its content hash)."""
        body = json.loads(self._canonical())
        body["content_hash"] = self.content_hash
        return json.dumps(body, indent=1, sort_keys=True, allow_nan=False)  # strict JSON: no NaN, Infinity

    def save(self, path: str | Path) -> Path:
        """Writes the spec atomically (temporary file, then rename); refuses a non-finite number."""
        path = Path(path)
        found = non_finite({"config": self.config, "fitted": self.fitted, "split": self.split})
        if found is not None:
            raise ValueError(f"{path}: not written: {found[0]} is {found[1]!r}; a spec holds finite numbers")
        atomic_write(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureSpec:
        """Reads a spec and checks its format version, its fields and its content hash."""
        body = read_json_object(path, "spec")
        if body.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: format_version {body.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        missing = [k for k in ("config", "fitted", "split", "content_hash") if k not in body]
        if missing:
            raise ValueError(f"{path}: missing field(s) {missing}; not a spec written by fit or build")
        spec = cls(config=body["config"], fitted=body["fitted"], split=body["split"])
        if body["content_hash"] != spec.content_hash:
            raise ValueError(
                f"{path}: content_hash {body['content_hash']!r} does not match the content "
                f"({spec.content_hash}); the file was edited or damaged"
            )
        try:
            unfitted = [f.name for f in spec.feature_config.features if f.name not in spec.fitted]
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if unfitted:
            raise ValueError(f"{path}: fitted: no fitted state for feature(s) {unfitted}")
        return spec


# ---------------------------------------------------------------------------------------------- apply


def _vocab_expr(x: pl.Expr, state: dict[str, Any], *, lookup: bool = True) -> pl.Expr:
    """Ids 1..V by the vocabulary's order; anything else (and null) is 0, the out-of-vocabulary bucket.

    ``lookup``: map integers through a table indexed by the value, and strings through an enum (a few
    times faster than a hash map over millions of rows); ``False`` inside ``list.eval``.
    """
    if state.get("hash_buckets"):
        return (_stable_hash(x.cast(pl.Int64)) % state["hash_buckets"] + 1).fill_null(0)
    vocab = state["vocab"]
    if state["dtype"] == "int":
        keyed = x.cast(pl.Int64)
        table = _lookup_table(vocab) if lookup else None
        if table is not None:
            outside = (keyed < 0) | (keyed >= table.len() - 1)
            return pl.lit(table).gather(pl.when(outside).then(table.len() - 1).otherwise(keyed)).fill_null(0)
    else:
        keyed = x.cast(pl.String)
        if lookup:
            members = keyed.cast(pl.Enum(vocab), strict=False)  # null outside the vocabulary
            return (members.to_physical().cast(pl.Int64) + 1).fill_null(0)
    return keyed.replace_strict(vocab, range(1, len(vocab) + 1), default=0, return_dtype=pl.Int64).fill_null(
        0
    )


def _lookup_table(vocab: list[int]) -> pl.Series | None:
    """Id per integer value: ``table[v]`` is v's id, 0 outside the vocabulary (the last entry too).

    None when the values are negative or so sparse that the table would be large.
    """
    if not vocab or min(vocab) < 0 or max(vocab) >= 4 * len(vocab) + 1_000_000:
        return None
    table = [0] * (max(vocab) + 2)
    for i, v in enumerate(vocab, start=1):
        table[v] = i
    return pl.Series(table, dtype=pl.Int64)


def _numeric_expr(f: FeatureDef, state: dict[str, Any], steps: int | None = None) -> pl.Expr:
    """The numeric feature after its first ``steps`` fitted steps (all of them when None)."""
    x = pl.col(f.source).cast(pl.Float64)
    x = x.fill_nan(None).fill_null(state["fill_value"])
    if f.relative_to:
        med = state["group_median"]
        group = pl.col(f.relative_to).cast(pl.Int64 if med["dtype"] == "int" else pl.String)
        median = group.replace_strict(
            med["keys"], med["values"], default=med["default"], return_dtype=pl.Float64
        ).fill_null(med["default"])
        x = x / median
    for step in state["steps"][:steps]:
        if step["op"] == "log1p":
            x = x.clip(lower_bound=0.0).log1p()
        elif step["op"] == "standardize":
            x = (x - step["mean"]) / step["std"]
        elif step["op"] == "bucketize":
            # Bucket b (1-based) holds boundaries[b-2] <= x < boundaries[b-1]: 1 + the boundaries <= x.
            boundaries = pl.Series(step["boundaries"], dtype=pl.Float64)
            x = pl.lit(boundaries).search_sorted(x, side="right").cast(pl.Int64) + 1
    return x


def _list_expr(f: FeatureDef, fitted: dict[str, dict[str, Any]], lst: pl.Expr) -> pl.Expr:
    vocab_state = fitted[f.vocab_of] if f.vocab_of else fitted[f.name]
    lst = lst.fill_null(pl.lit([], dtype=pl.List(pl.Int64)))
    if f.max_length:
        lst = lst.list.tail(f.max_length)
    return lst.list.eval(_vocab_expr(pl.element(), vocab_state, lookup=False)).cast(pl.List(pl.Int64))


def feature_expr(
    f: FeatureDef, fitted: dict[str, dict[str, Any]], lists: pl.DataFrame | None = None
) -> pl.Expr:
    """The model-ready column of feature ``f`` under the fitted spec state.

    Args:
        f: the feature.
        fitted: the spec's fitted state.
        lists: list columns kept apart from the rows and indexed by their ``__hist_state`` column (see
            ``features.derive.add_history_index``); a multi-hot feature reading one of them maps the
            distinct lists once, then gathers them per row.
    """
    state = fitted[f.name]
    if f.kind == CATEGORICAL:
        expr = _vocab_expr(pl.col(f.source), state)
    elif f.kind == MULTI_HOT and lists is not None and f.source in lists.columns:
        mapped = lists.lazy().select(_list_expr(f, fitted, pl.col(f.source))).collect().to_series()
        expr = pl.lit(mapped).gather(pl.col(HIST_STATE)).fill_null(pl.lit([], dtype=pl.List(pl.Int64)))
    elif f.kind == MULTI_HOT:
        expr = _list_expr(f, fitted, pl.col(f.source))
    else:
        expr = _numeric_expr(f, state)
        expr = expr.cast(pl.Int64) if state["output"] == ID else expr.cast(pl.Float32)
    return expr.alias(f.name)


def label_expr(label: LabelConfig) -> pl.Expr:
    """The label as Float32: 1/0 for binary labels, the value for regression."""
    col = pl.col(label.column)
    if label.positive_values:
        expr = col.is_in(list(label.positive_values))
    elif label.positive_prefix:
        expr = col.cast(pl.String).str.strip_chars().str.starts_with(label.positive_prefix)
    else:
        expr = col
    return expr.cast(pl.Float32).alias(label.name)


def output_exprs(
    spec: FeatureSpec, *, labels: bool = True, lists: pl.DataFrame | None = None
) -> list[pl.Expr]:
    """The model-ready columns: passthrough columns, features, then labels (when ``labels``)."""
    cfg = spec.feature_config
    exprs = [pl.col(c) for c in cfg.passthrough]
    exprs += [feature_expr(f, spec.fitted, lists) for f in cfg.features]
    if labels:
        exprs += [label_expr(lab) for lab in cfg.labels]
    return exprs


def apply(
    spec: FeatureSpec, lf: pl.LazyFrame, *, labels: bool = True, lists: pl.DataFrame | None = None
) -> pl.LazyFrame:
    """Model-ready columns for every row of ``lf``; no row is dropped or reordered.

    Args:
        spec: the fitted spec.
        lf: derived rows (training or scoring).
        labels: include the label columns (False for scoring data, which has none).
        lists: the history lists when ``lf`` holds ``__hist_state`` instead of them.
    """
    return lf.select(output_exprs(spec, labels=labels, lists=lists))


# ------------------------------------------------------------------------------------------------ fit


def _vocab_dtype(dtype: pl.DataType) -> str:
    return "int" if dtype.is_integer() else "str"


def _fit_vocab(f: FeatureDef, train: pl.LazyFrame, schema: pl.Schema) -> pl.LazyFrame | dict[str, Any]:
    """A lazy query for the vocabulary counts, or the finished state for hashed features."""
    if f.hash_buckets:
        src_dtype = schema[f.source].inner if f.kind == MULTI_HOT else schema[f.source]
        if not src_dtype.is_integer():
            raise ValueError(
                f"features[{f.name}].hash_buckets: hashing needs an integer column, "
                f"{f.source!r} is {src_dtype}"
            )
        return {"hash_buckets": f.hash_buckets, "num_embeddings": f.hash_buckets + 1}
    col = pl.col(f.source)
    values = train.select(col.explode() if f.kind == MULTI_HOT else col)
    dtype = values.collect_schema()[f.source]
    keyed = col.cast(pl.Int64) if _vocab_dtype(dtype) == "int" else col.cast(pl.String)
    return (
        values.select(keyed)
        .drop_nulls()
        .group_by(f.source)
        .len()
        .filter(pl.col("len") >= f.min_count)
        # Most frequent first; ties broken by value so that the vocabulary is deterministic.
        .sort(["len", f.source], descending=[True, False])
    )


def _fit_numerics(
    features: list[FeatureDef], train: pl.LazyFrame, schema: pl.Schema
) -> dict[str, dict[str, Any]]:
    """The fitted states of numeric (and affinity) features.

    The statistics of all features are fitted together, one query per round (fill values, then each
    transform step in turn), rather than one query per statistic: each query reads the training rows once.
    """
    for f in features:
        if not schema[f.source].is_numeric():
            raise ValueError(
                f"features[{f.name}].source: numeric features need a numeric column, "
                f"{f.source!r} is {schema[f.source]}"
            )

    def raw(f: FeatureDef) -> pl.Expr:
        return pl.col(f.source).cast(pl.Float64).fill_nan(None)

    fills = [
        getattr(raw(f), f.fill_null)().alias(f.name) for f in features if f.fill_null in ("mean", "median")
    ]
    fitted_fills = train.select(fills).collect().row(0, named=True) if fills else {}
    states: dict[str, dict[str, Any]] = {}
    for f in features:
        if f.fill_null in ("mean", "median"):
            stat = fitted_fills[f.name]
            fill_value = _stat(stat) if stat is not None else 0.0
        else:
            fill_value = 0.0 if f.fill_null == "zero" else float(f.fill_null)
        states[f.name] = {"fill_value": fill_value, "steps": [], "output": DENSE}
        if f.relative_to:
            states[f.name]["group_median"] = _fit_group_median(f, train, schema, raw(f).fill_null(fill_value))
    for k in range(max((len(f.transforms) for f in features), default=0)):
        step = [f for f in features if len(f.transforms) > k]
        moments = [
            e
            for f in step
            if f.transforms[k] == "standardize"
            for x in [_numeric_expr(f, states[f.name])]  # the value after the steps fitted so far
            for e in (x.mean().alias(f"{f.name}/mean"), x.std().alias(f"{f.name}/std"))
        ]
        fitted = train.select(moments).collect().row(0, named=True) if moments else {}
        for f in step:
            state, op = states[f.name], f.transforms[k]
            if op == "log1p":
                state["steps"].append({"op": "log1p"})
            elif op == "standardize":
                mean, std = fitted[f"{f.name}/mean"], fitted[f"{f.name}/std"]
                state["steps"].append(
                    {
                        "op": "standardize",
                        "mean": _stat(mean or 0.0),
                        "std": _stat(std) if std and std > _MIN_STD else 1.0,
                    }
                )
            else:
                boundaries = list(f.boundaries) or _quantiles(f, train, _numeric_expr(f, state))
                state["steps"].append({"op": "bucketize", "boundaries": boundaries})
                state["output"] = ID
                state["num_embeddings"] = len(boundaries) + 2  # buckets 1..len+1, and 0 unused
    return states


def _fit_group_median(
    f: FeatureDef, train: pl.LazyFrame, schema: pl.Schema, filled: pl.Expr
) -> dict[str, Any]:
    """``relative_to``: the training-window median of the feature per group, and the global one."""
    group_dtype = _vocab_dtype(schema[f.relative_to])
    group = pl.col(f.relative_to).cast(pl.Int64 if group_dtype == "int" else pl.String)
    medians = (
        train.select(group.alias("g"), filled.alias("v"))
        .drop_nulls("g")
        .group_by("g")
        .agg(pl.col("v").median())
        .sort("g")
        .collect()
    )
    default = train.select(filled.median()).collect().item()
    # A median of 0 would divide by zero; such groups fall back to the global median.
    positive = medians.filter(pl.col("v") > 0)
    return {
        "dtype": group_dtype,
        "keys": positive["g"].to_list(),
        "values": [_stat(v) for v in positive["v"].to_list()],
        "default": _stat(default) if default and default > 0 else 1.0,
    }


def _quantiles(f: FeatureDef, train: pl.LazyFrame, x: pl.Expr) -> list[float]:
    """``num_buckets`` quantile boundaries by nearest rank, over one sort.

    (Polars would sort once per quantile expression.)
    """
    values = train.select(x.drop_nulls().sort().alias("v")).collect().to_series()
    last = len(values) - 1
    ranks = [round(last * i / f.num_buckets) for i in range(1, f.num_buckets)] if last >= 0 else []
    return sorted({float(values[r]) for r in ranks})


def fit(
    config: FeatureConfig,
    train: pl.LazyFrame | pl.DataFrame,
    split: dict[str, Any],
    lists: pl.DataFrame | None = None,
) -> FeatureSpec:
    """Learns every vocabulary and statistic from ``train`` (training-window rows only).

    Args:
        config: the feature config.
        train: derived training rows. Collect it first if it is expensive: it is read once per fitted
            statistic.
        split: the resolved split, recorded in the spec.
        lists: the history lists when ``train`` holds ``__hist_state`` instead of them.

    Returns:
        The fitted spec.
    """
    train = train.lazy()
    if lists is not None:
        own_vocab = {f.source for f in config.features if f.kind == MULTI_HOT and not f.vocab_of}
        if own_vocab & set(lists.columns):  # only a list's own vocabulary needs the per-row lists
            train = gather_lists(train, lists)
        else:
            train = train.with_columns(
                pl.lit(None, dtype=dtype).alias(name) for name, dtype in lists.schema.items()
            )
    schema = train.collect_schema()
    for f in config.features:
        for column in (f.source, f.relative_to):
            if column and column not in schema:
                raise ValueError(
                    f"features[{f.name}]: column {column!r} not found; the data has {list(schema.names())}"
                )
        if f.kind == MULTI_HOT and not isinstance(schema[f.source], pl.List):
            raise ValueError(
                f"features[{f.name}].kind: multi_hot needs a list column, {f.source!r} is {schema[f.source]}"
            )
    numeric = [f for f in config.features if f.kind in (NUMERIC, AFFINITY)]
    fitted: dict[str, dict[str, Any]] = _fit_numerics(numeric, train, schema)
    pending: dict[str, pl.LazyFrame] = {}
    for f in config.features:
        if f in numeric:
            continue
        if f.vocab_of:
            fitted[f.name] = {"vocab_of": f.vocab_of, "output": ID_LIST}
        else:
            result = _fit_vocab(f, train, schema)
            if isinstance(result, dict):
                fitted[f.name] = result
            else:
                pending[f.name] = result
    # Vocabulary counts are independent queries: run them together.
    for name, counts in zip(pending, pl.collect_all(list(pending.values())), strict=True):
        f = config.feature(name)
        vocab = counts[f.source].to_list()
        if f.max_size:
            vocab = vocab[: f.max_size]
        dtype = _vocab_dtype(counts.schema[f.source])
        fitted[name] = {"vocab": vocab, "dtype": dtype, "num_embeddings": len(vocab) + 1}
    for f in config.features:
        if f.kind not in (NUMERIC, AFFINITY):
            fitted[f.name]["output"] = ID_LIST if f.kind == MULTI_HOT else ID
        if f.vocab_of:
            fitted[f.name]["num_embeddings"] = fitted[f.vocab_of]["num_embeddings"]
    for f in config.features:
        found = non_finite(fitted[f.name])
        if found is not None:
            raise ValueError(
                f"features[{f.name}]: fitted {found[0]} is {found[1]!r}; the training rows of column "
                f"{f.source!r} hold infinite or NaN values, or values whose statistics overflow"
            )
    config_dict = _config_to_dict(config)
    return FeatureSpec(
        config=config_dict, fitted={f.name: fitted[f.name] for f in config.features}, split=split
    )


def _config_to_dict(config: FeatureConfig) -> dict[str, Any]:
    """The config as plain JSON-able data that ``FeatureConfig.from_dict`` reads back."""
    return json.loads(json.dumps(asdict(config)))
