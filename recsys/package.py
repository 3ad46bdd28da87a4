"""The trained-model package: weights, model config and feature spec in one folder, and scoring raw rows.

A package is everything needed to score raw contract rows, and nothing that must be unpickled::

    DIR/weights.pt          the model's state_dict: plain tensors only (``torch.load(weights_only=True)``)
    DIR/model_config.json   the model config as plain data (``ModelConfig.from_dict`` reads it)
    DIR/spec.json           the fitted feature spec (with its content hash)
    DIR/package.json        format version, tasks, the spec's content hash, library versions, extra, and
                            ``calibration``: per binary task, the Platt scaling of its logit (absent: none)

:func:`save_package` writes the folder under a temporary name and renames it when complete.
:func:`predict_frame` runs the training feature code (:mod:`features.pipeline`, :mod:`features.spec`) on raw
rows, then the model, and returns one score column per task in the input's row order. This module does no
MLflow; :mod:`recsys.tracking` logs a package as an MLflow model.

Example:
    >>> save_package("out/model", model, model_config, spec, extra={"val_auc": 0.71})  # doctest: +SKIP
    >>> package = load_package("out/model")  # doctest: +SKIP
    >>> predict_frame(package, joined_rows).columns  # doctest: +SKIP
    ['impression_id', 'request_id', 'user_id', 'item_id', 'ts', 'p_click', 'p_purchase']
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from features.affinity import AFFINITY, HistoryNeeds
from features.affinity import history_needs as affinity_needs
from features.contract import IMPRESSIONS, ITEMS, LABELS, USERS, TableContract, validate
from features.files import staged_dir
from features.pipeline import Tables, derived, validate_tables
from features.spec import FeatureSpec, output_exprs
from recsys.calibration import PlattScaling, calibrators_from_dict, calibrators_to_dict
from recsys.config import ModelConfig, TaskConfig
from recsys.data.batch import FeatureLayout, batch_from_arrow
from recsys.model import RankingModel, build_model

FORMAT_VERSION = 1
WEIGHTS, MODEL_CONFIG, SPEC, MANIFEST = "weights.pt", "model_config.json", "spec.json", "package.json"
_ROW = "__input_row"  # the input's row number, carried through the feature code to restore the row order
# Columns the click history reads from a history frame (see features.derive.click_history).
HISTORY_COLUMNS = ("impression_id", "ts", "user_id", "item_id", "click")

DEFAULT_BATCH_SIZE = 8192  # rows per model call when scoring: the batch of the measured CPU scoring figures


def history_needs(spec: FeatureSpec) -> tuple[tuple[str, ...], HistoryNeeds]:
    """The history columns a spec's features read, and what else its affinity features need of the log.

    Without affinity features: :data:`HISTORY_COLUMNS` of the click events. Affinity features may also
    need ``purchase``, the non-click impressions and the other users' events
    (:func:`features.affinity.history_needs`).
    """
    needs = affinity_needs([f for f in spec.feature_config.features if f.kind == AFFINITY])
    return HISTORY_COLUMNS + (("purchase",) if needs.purchases else ()), needs


@dataclass
class LoadedPackage:
    """A model ready to score, with what it needs to turn raw rows into its inputs.

    Attributes:
        model: the model, in eval mode after :func:`load_package`.
        model_config: its config.
        spec: the fitted feature spec it was trained on.
        layout: the feature layout the model was built with.
        metadata: the package manifest (``package.json``); empty for a package built in memory.
        calibration: per binary task, the Platt scaling applied to its logit before the sigmoid; a task
            without one scores the model's own probability.
    """

    model: RankingModel
    model_config: ModelConfig
    spec: FeatureSpec
    layout: FeatureLayout
    metadata: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, PlattScaling] = field(default_factory=dict)


def output_column(task: TaskConfig) -> str:
    """The score column of a task: ``p_<task>`` for binary tasks, ``pred_<task>`` for regression."""
    return f"p_{task.name}" if task.kind == "binary" else f"pred_{task.name}"


# ----------------------------------------------------------------------------------------- save, load


def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback: numpy and torch scalars as Python numbers, paths as strings."""
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        return value.item()
    if isinstance(value, Path | dt.date):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def _plain_state_dict(model: RankingModel) -> dict[str, torch.Tensor]:
    """The model's state as plain CPU tensors, the only objects ``weights_only`` loading accepts."""
    state = {}
    for name, value in model.state_dict().items():
        # A sharded or otherwise wrapped tensor (a model still inside DistributedModelParallel) would not load
        # with weights_only, and its values live on other ranks: refuse it here, not at load time.
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise ValueError(
                f"model.state_dict()[{name!r}]: expected a plain tensor, got {type(value).__name__}; "
                "save the unwrapped, unsharded RankingModel"
            )
        state[name] = value.detach().to("cpu", copy=True).contiguous()
    return state


def save_package(
    directory: str | Path,
    model: RankingModel,
    model_config: ModelConfig,
    spec: FeatureSpec,
    extra: Mapping[str, Any] | None = None,
    *,
    calibration: Mapping[str, PlattScaling] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a model package atomically: a temporary folder beside ``directory``, then a rename.

    Args:
        directory: the package folder.
        model: the trained model (unwrapped and unsharded, on any device).
        model_config: the config the model was built from.
        spec: the feature spec its training data was transformed with.
        extra: JSON-able metadata stored under ``extra`` in ``package.json`` (metrics, run id, ...).
        calibration: per binary task, the Platt scaling scoring applies to its logit
            (:mod:`recsys.calibration`); stored under ``calibration`` in ``package.json``.
        overwrite: replace an existing package folder.

    Returns:
        The package folder.

    Raises:
        FileExistsError: ``directory`` exists and ``overwrite`` is False.
        ValueError: ``extra`` is not JSON-able, ``calibration`` names a task that is not a binary task of
            the model, or the model's state holds a non-plain tensor.
    """
    directory = Path(directory)
    binary = [t.name for t in model_config.tasks if t.kind == "binary"]
    unknown = sorted(set(calibration or {}) - set(binary))
    if unknown:
        raise ValueError(f"calibration: {unknown} are not binary tasks of the model ({binary})")
    if directory.exists() and not overwrite:
        raise FileExistsError(f"package folder {directory} exists; pass overwrite=True to replace it")
    try:
        extra_json = json.loads(json.dumps(dict(extra or {}), default=_jsonable))
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra: expected JSON-able metadata, got {extra!r} ({e})") from e
    manifest = {
        "format_version": FORMAT_VERSION,
        "tasks": [t.name for t in model_config.tasks],
        "spec_hash": spec.content_hash,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": {dist: _version(dist) for dist in ("torch", "torchrec", "polars", "recsys-mmoe")},
        "extra": extra_json,
    }
    if calibration:  # absent when there is none: the manifest of an uncalibrated package is unchanged
        manifest["calibration"] = calibrators_to_dict(calibration)
    state = _plain_state_dict(model)
    with staged_dir(directory) as tmp:
        torch.save(state, tmp / WEIGHTS)
        (tmp / MODEL_CONFIG).write_text(json.dumps(asdict(model_config), indent=1, sort_keys=True))
        spec.save(tmp / SPEC)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return directory


def load_package(directory: str | Path, map_location: str | torch.device = "cpu") -> LoadedPackage:
    """Rebuilds the model of a package and loads its weights, without unpickling any Python object.

    Args:
        directory: the package folder written by :func:`save_package`.
        map_location: the device to load the weights to.

    Returns:
        The package, its model in eval mode.

    Raises:
        FileNotFoundError: a package file is missing.
        ValueError: unknown format version, or the spec is not the one the package was saved with.
    """
    directory = Path(directory)
    for name in (WEIGHTS, MODEL_CONFIG, SPEC, MANIFEST):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: not a model package, {name} is missing")
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{directory / MANIFEST}: format_version {manifest.get('format_version')!r}, "
            f"expected {FORMAT_VERSION}"
        )
    spec = FeatureSpec.load(directory / SPEC)
    if manifest.get("spec_hash") != spec.content_hash:
        raise ValueError(
            f"{directory / MANIFEST}: spec_hash {manifest.get('spec_hash')!r} is not the hash of "
            f"{SPEC} ({spec.content_hash}); the package mixes files of two models"
        )
    model_config = ModelConfig.from_dict(json.loads((directory / MODEL_CONFIG).read_text()))
    layout = FeatureLayout.from_spec(spec, model_config.embedding)
    model = build_model(model_config, layout)
    # weights_only: the file may only hold tensors and containers, never code to run.
    state = torch.load(directory / WEIGHTS, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    model.to(map_location).eval()
    calibration = calibrators_from_dict(manifest.get("calibration"), f"{directory / MANIFEST}: calibration")
    return LoadedPackage(model, model_config, spec, layout, manifest, calibration)


# ---------------------------------------------------------------------------------------------- score


def _to_polars(frame: Any, name: str) -> pl.DataFrame:
    """A polars DataFrame from a polars (lazy) or pandas frame."""
    if isinstance(frame, pl.LazyFrame):
        return frame.collect()
    if isinstance(frame, pl.DataFrame):
        return frame
    if type(frame).__module__.split(".")[0] == "pandas":
        # NaN becomes null, as the features expect; the pandas index is not data and is dropped.
        return pl.from_pandas(frame, nan_to_null=True)
    raise TypeError(f"{name}: expected a polars or pandas DataFrame, got {type(frame).__name__}")


def _require(data: pl.DataFrame, columns: list[str], name: str, what: str) -> None:
    missing = [c for c in columns if c not in data.columns]
    if missing:
        raise ValueError(
            f"{name}: missing column(s) {missing} (e.g. {missing[0]!r}, {what}); "
            f"the frame has columns {data.columns}"
        )


def _to_contract_type(column: str, source: pl.DataType, target: pl.DataType) -> pl.Expr:
    """The expression converting ``column`` from its type to the contract type ``target``."""
    expr = pl.col(column)
    if isinstance(target, pl.Datetime):
        if source == pl.String:
            # JSON inputs (e.g. MLflow serving) carry timestamps as ISO strings.
            expr = expr.str.to_datetime(time_unit="us", strict=True)
            source = pl.Datetime("us")
        if isinstance(source, pl.Datetime) and source.time_zone is not None:
            # The contract's timestamps are naive UTC.
            expr = expr.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    return expr.cast(target, strict=True)


def _cast_contract(data: pl.DataFrame, contracts: tuple[TableContract, ...], name: str) -> pl.DataFrame:
    """Casts the contract columns present in ``data`` to their contract types.

    Pandas input arrives with its own types (int64 positions, nanosecond timestamps, float64 ints where a
    left join left nulls), JSON input with timestamps as strings; the feature code joins on and compares
    these columns, so they must match.

    Raises:
        ValueError: a column cannot be converted; the message names it.
    """
    casts = []
    for contract in contracts:
        for col in contract.columns:
            if col.name not in data.columns or data.schema[col.name] == col.dtype:
                continue
            expr = _to_contract_type(col.name, data.schema[col.name], col.dtype)
            try:
                data.select(expr)  # each column alone, so that the error can name it
            except pl.exceptions.PolarsError as e:
                raise ValueError(
                    f"{name}.{col.name}: cannot convert {data.schema[col.name]} to the contract type "
                    f"{col.dtype} ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                ) from None
            casts.append(expr)
    return data.with_columns(casts) if casts else data


def empty_history(columns: tuple[str, ...] = HISTORY_COLUMNS) -> pl.DataFrame:
    """A history of no events, with ``columns`` in their contract types."""
    schema = {c.name: c.dtype for c in IMPRESSIONS.columns if c.name in columns}
    return pl.DataFrame(schema=schema)


def _entities(data: pl.DataFrame, contract: TableContract) -> pl.DataFrame:
    """One row per key of a users or items table, from the joined rows that repeat it.

    Rows whose attributes are all null (an unknown user or item, left-joined) are dropped: an absent key
    joins to the same nulls, and another row may know the attributes. Of the rest, the first row wins.
    """
    attributes = [c.name for c in contract.columns if c.name != contract.key]
    return (
        data.select(c.name for c in contract.columns)
        .filter(~pl.all_horizontal(pl.col(attributes).is_null()))
        .unique(contract.key, keep="first", maintain_order=True)
    )


def _ecommerce_tables(
    data: pl.DataFrame, history: Any, name: str, columns: tuple[str, ...] = HISTORY_COLUMNS
) -> Tables:
    """Splits joined rows back into the contract tables, as the training pipeline reads them.

    ``columns``: what the spec's history features read of a history frame (:func:`history_needs`).
    """
    without_labels = [c.name for c in IMPRESSIONS.without_labels().columns]
    _require(data, without_labels, name, "an impressions column")
    _require(data, [c.name for c in USERS.columns], name, "a users column")
    _require(data, [c.name for c in ITEMS.columns], name, "an items column")
    data = _cast_contract(data, (IMPRESSIONS, USERS, ITEMS), name)
    # Labels stay when present: they are the click history for later rows (see predict_frame).
    impressions = data.select(*without_labels, *[c for c in LABELS if c in data.columns], _ROW)
    validate(impressions.drop(_ROW), "impressions", labels=False)
    users = _entities(data, USERS)
    item_rows = [data.select(c.name for c in ITEMS.columns)]
    if history is None:
        labelled = all(c in data.columns for c in columns if c in LABELS)
        if "click" in data.columns and not labelled:
            _require(data, list(columns), name, "read by the affinity features of the labelled rows' history")
        events = None if labelled else empty_history(columns)
    else:
        hist = _to_polars(history, "history")
        _require(hist, list(columns), "history", "read by the history features")
        hist = _cast_contract(hist, (IMPRESSIONS, ITEMS), "history")
        events = hist.select(columns)
        if all(c.name in hist.columns for c in ITEMS.columns):
            # A joined history frame also tells the categories of clicked items the rows do not show.
            item_rows.append(hist.select(c.name for c in ITEMS.columns))
    items = _entities(pl.concat(item_rows), ITEMS)
    return Tables(
        impressions.lazy(),
        users.lazy(),
        items.lazy(),
        None if events is None else events.lazy(),
    )


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, no gate noise) for the block; the caller's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _score(package: LoadedPackage, table: pa.Table, batch_size: int) -> dict[str, np.ndarray]:
    """Per task, the model's scores of every row of model-ready ``table``, float64.

    A binary task's score is the sigmoid of its logit, after the task's calibration if it has one.
    """
    model = package.model
    device = next(model.parameters()).device
    parts: dict[str, list[np.ndarray]] = {t.name: [] for t in package.model_config.tasks}
    with torch.no_grad(), _eval_mode(model):
        for start in range(0, table.num_rows, batch_size):
            batch = batch_from_arrow(table.slice(start, batch_size), package.layout, labels=False)
            # To a GPU the copy is queued on the forward's stream; from pageable memory CUDA stages the batch
            # before returning, so the host batch may be freed, and the outputs' .cpu() waits for it all.
            # Pinning the batch first would only add a host copy of a batch just built.
            batch = batch.to(device, non_blocking=device.type == "cuda")
            logits, _ = model(batch.dense, batch.sparse)
            for task in package.model_config.tasks:
                # ESMM tasks: the logit already is that of p(given and task).
                out = logits[task.name].float()
                platt = package.calibration.get(task.name)
                if platt is not None:
                    out = platt.a * out + platt.b
                out = torch.sigmoid(out) if task.kind == "binary" else out
                parts[task.name].append(out.cpu().numpy().astype(np.float64))
    return {
        name: np.concatenate(chunks) if chunks else np.zeros(0, np.float64) for name, chunks in parts.items()
    }


def model_ready(spec: FeatureSpec, tables: Tables, keep: tuple[str, ...] = ()) -> pl.DataFrame:
    """The model-ready columns of raw tables, with the training feature code, in memory.

    :func:`features.pipeline.derived` then :func:`features.spec.output_exprs`, as the training pipeline
    writes its datasets; the tables are not validated here (the caller has done it).

    Args:
        spec: the fitted spec.
        tables: the raw tables (ecommerce: impressions without labels, users, items, and the click history;
            ``tables.history`` None means the impressions are their own history).
        keep: derived columns to keep after the model-ready ones (e.g. a row number).

    Returns:
        One row per impression, (N, passthrough + features + keep); for the ecommerce source sorted by
        ``(ts, impression_id)``, as the training data.
    """
    with pl.Config(engine_affinity="in-memory"):  # as the training pipeline: faster for in-memory rows
        rows, lists = derived(spec.feature_config, tables)
        return rows.select(*output_exprs(spec, labels=False, lists=lists), *keep).collect()


def score_ready(
    package: LoadedPackage, table: pa.Table, batch_size: int = DEFAULT_BATCH_SIZE
) -> dict[str, np.ndarray]:
    """The model alone on model-ready rows (e.g. from :func:`model_ready`): per task, (N,) float64.

    Binary tasks give probabilities (the sigmoid of the logit, calibrated if the package has a calibrator),
    regression tasks the prediction; the model runs in batches of ``batch_size`` rows, without gradients and
    in eval mode.
    """
    return _score(package, table, batch_size)


def predict_frame(
    package: LoadedPackage,
    frame: Any,
    history: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> pl.DataFrame:
    """Scores raw rows with the training feature code and the model.

    Input columns, by the spec's source:

    * ``ecommerce``: one flat frame of impressions joined with users and items (every contract column of
      the three tables; labels optional). Unknown users or items may come with null attributes; they get
      out-of-vocabulary ids, as in training.
    * ``flat``: the flat table (the spec's feature sources and passthrough columns).

    History features (ecommerce), from click events strictly before each row's ``ts``, come from:

    1. ``history`` when given: an impressions frame with ``click`` (``impression_id``, ``ts``, ``user_id``,
       ``item_id``, ``click``; with the items columns too, its clicked items' categories are known even
       when the rows do not show those items);
    2. else the rows themselves when they carry ``click`` (a labelled batch, as in training);
    3. else no history: empty history lists and zero click counts.

    The whole frame goes through the feature code at once (history features join across rows); only the
    model runs in batches of ``batch_size`` rows, under ``torch.no_grad()`` and in eval mode.

    Args:
        package: the model package.
        frame: the raw rows, a polars or pandas DataFrame (or a polars LazyFrame).
        history: the click log for history features (polars or pandas), see above.
        batch_size: rows per model call.

    Returns:
        One row per input row, in input order: the spec's passthrough columns (e.g. ``impression_id``),
        then per task ``p_<task>`` (float64 probability, the sigmoid of the logit after the task's
        calibration, if the package has one; for an entire-space task p(given and task)) or
        ``pred_<task>`` for a regression task.

    Raises:
        ValueError: a needed column is missing or cannot take its contract type (the message names it),
            or a contract rule fails (``features.contract.ContractError``).
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    spec = package.spec
    cfg = spec.feature_config
    data = _to_polars(frame, "frame").with_row_index(_ROW)
    if cfg.source == "ecommerce":
        tables = _ecommerce_tables(data, history, "frame", history_needs(spec)[0])
    else:
        tables = Tables(data.lazy())
        validate_tables(cfg, tables, labels=False)
    # The ecommerce path sorts by time; the input's order comes back here.
    ready = model_ready(spec, tables, keep=(_ROW,)).sort(_ROW)
    scores = _score(package, ready.to_arrow(), batch_size)
    return ready.select(cfg.passthrough).with_columns(
        pl.Series(output_column(task), scores[task.name], dtype=pl.Float64)
        for task in package.model_config.tasks
    )
