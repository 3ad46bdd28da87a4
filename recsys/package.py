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

from features.files import staged_dir
from features.pipeline import Tables, derived, validate_tables
from features.spec import FeatureSpec, output_exprs
from recsys.calibration import PlattScaling, calibrators_from_dict, calibrators_to_dict
from recsys.config import ModelConfig, TaskConfig
from recsys.data.batch import FeatureLayout, batch_from_arrow
from recsys.model import RankingModel, build_model
from recsys.precision import (
    autocast,
    check_embedding_dtype,
    embedding_dtype_of,
    packed_state,
    plain_tensor,
    quantize_embeddings,
    resolve_precision,
)
from recsys.rows import ROW, ecommerce_tables, history_needs, to_polars

FORMAT_VERSION = 1
WEIGHTS, MODEL_CONFIG, SPEC, MANIFEST = "weights.pt", "model_config.json", "spec.json", "package.json"

DEFAULT_BATCH_SIZE = 8192  # rows per model call when scoring: the batch of the measured CPU scoring figures


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
    compute_dtype: torch.dtype | None = None

    @property
    def embedding_dtype(self) -> str:
        """The tables' precision: ``fp32``, or ``fp16``, ``int8``, ``int4`` (row-wise quantized)."""
        return embedding_dtype_of(self.model)

    def precision_line(self) -> str:
        """The precision it scores in, in words: ``int8 tables, bf16 dense layers``."""
        dense = {None: "fp32", torch.bfloat16: "bf16"}.get(self.compute_dtype, str(self.compute_dtype))
        return f"{self.embedding_dtype} tables, {dense} dense layers"


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
        value = plain_tensor(value)  # an int4 table's packed bytes
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
    if embedding_dtype_of(model) != "fp32":  # absent for fp32 tables, as in every package before it existed
        manifest["embedding_dtype"] = embedding_dtype_of(model)
    state = _plain_state_dict(model)
    with staged_dir(directory) as tmp:
        torch.save(state, tmp / WEIGHTS)
        (tmp / MODEL_CONFIG).write_text(json.dumps(asdict(model_config), indent=1, sort_keys=True))
        spec.save(tmp / SPEC)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return directory


def load_package(
    directory: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    embedding_dtype: str | None = None,
    compute_dtype: str = "fp32",
) -> LoadedPackage:
    """Rebuilds the model of a package and loads its weights, without unpickling any Python object.

    Args:
        directory: the package folder written by :func:`save_package`.
        map_location: the device to load the weights to.
        embedding_dtype: the tables' precision (:data:`recsys.precision.EMBEDDING_DTYPES`): fp32 tables are
            quantized on loading (CPU only); None keeps the package's. A package saved with quantized
            tables loads in its own precision only.
        compute_dtype: the dense layers' precision when scoring, ``fp32``, ``bf16`` or ``auto``
            (:func:`recsys.precision.resolve_precision`).

    Returns:
        The package, its model in eval mode.

    Raises:
        FileNotFoundError: a package file is missing.
        ValueError: unknown format version, the spec is not the one the package was saved with, or a
            precision that is unknown or cannot be had (the message names the option and the value).
    """
    directory = Path(directory)
    manifest = _manifest(directory)
    spec = FeatureSpec.load(directory / SPEC)
    if manifest.get("spec_hash") != spec.content_hash:
        raise ValueError(
            f"{directory / MANIFEST}: spec_hash {manifest.get('spec_hash')!r} is not the hash of "
            f"{SPEC} ({spec.content_hash}); the package mixes files of two models"
        )
    device = torch.device(map_location)
    saved = check_embedding_dtype(
        manifest.get("embedding_dtype", "fp32"), f"{directory / MANIFEST}: embedding_dtype"
    )
    wanted = saved if embedding_dtype is None else check_embedding_dtype(embedding_dtype)
    if saved != "fp32" and wanted != saved:
        raise ValueError(
            f"embedding_dtype: the package {directory} holds {saved} tables and scores in {saved} only, "
            f"got {wanted!r} (quantize its fp32 original instead)"
        )
    if wanted != "fp32" and device.type != "cpu":
        raise ValueError(f"embedding_dtype: {wanted} tables score on the CPU only, got device {device}")
    dense_dtype, _ = resolve_precision(compute_dtype, device, "compute_dtype")
    model_config = ModelConfig.from_dict(json.loads((directory / MODEL_CONFIG).read_text()))
    layout = FeatureLayout.from_spec(spec, model_config.embedding)
    model = build_model(model_config, layout)
    if saved != "fp32":  # the quantized modules first, so that the saved rows load into them
        quantize_embeddings(model, saved)
    # weights_only: the file may only hold tensors and containers, never code to run.
    state = torch.load(directory / WEIGHTS, map_location=map_location, weights_only=True)
    model.load_state_dict(packed_state(model, state))
    if saved == "fp32":
        quantize_embeddings(model, wanted)
    model.to(map_location).eval()
    calibration = calibrators_from_dict(manifest.get("calibration"), f"{directory / MANIFEST}: calibration")
    return LoadedPackage(model, model_config, spec, layout, manifest, calibration, dense_dtype)


def _manifest(directory: Path) -> dict[str, Any]:
    """``package.json`` of a package folder, its files and format version checked."""
    for name in (WEIGHTS, MODEL_CONFIG, SPEC, MANIFEST):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: not a model package, {name} is missing")
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{directory / MANIFEST}: format_version {manifest.get('format_version')!r}, "
            f"expected {FORMAT_VERSION}"
        )
    return manifest


def package_bytes(directory: str | Path) -> int:
    """The size of a package folder in bytes: every file in it."""
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def quantize_package(
    source: str | Path, directory: str | Path, embedding_dtype: str, *, overwrite: bool = False
) -> Path:
    """Writes a copy of the package ``source`` whose tables are row-wise quantized to ``embedding_dtype``.

    The copy holds the quantized tables (an int8 row of dimension 16 takes 20 bytes instead of 64) and
    loads and scores in that precision only (:func:`load_package`). Calibration and metadata are kept;
    ``package.json`` records ``embedding_dtype``, and ``extra.quantized_from`` the source's creation time.

    Raises:
        ValueError: ``embedding_dtype`` is fp32 or unknown, or ``source`` is already quantized.
        FileExistsError: ``directory`` exists and ``overwrite`` is False.
    """
    if check_embedding_dtype(embedding_dtype) == "fp32":
        raise ValueError("embedding_dtype: expected fp16, int8 or int4 for a quantized copy, got 'fp32'")
    package = load_package(source)
    if package.embedding_dtype != "fp32":
        raise ValueError(f"{source}: the package's tables are already {package.embedding_dtype}")
    quantize_embeddings(package.model, embedding_dtype)
    extra = dict(package.metadata.get("extra", {}))
    extra["quantized_from"] = {"created_at": package.metadata.get("created_at"), "embedding_dtype": "fp32"}
    return save_package(
        directory,
        package.model,
        package.model_config,
        package.spec,
        extra,
        calibration=package.calibration,
        overwrite=overwrite,
    )


# ---------------------------------------------------------------------------------------------- score


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
            with autocast(package.compute_dtype, device):
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
    data = to_polars(frame, "frame").with_row_index(ROW)
    if cfg.source == "ecommerce":
        tables = ecommerce_tables(data, history, "frame", history_needs(spec)[0])
    else:
        tables = Tables(data.lazy())
        validate_tables(cfg, tables, labels=False)
    # The ecommerce path sorts by time; the input's order comes back here.
    ready = model_ready(spec, tables, keep=(ROW,)).sort(ROW)
    scores = _score(package, ready.to_arrow(), batch_size)
    return ready.select(cfg.passthrough).with_columns(
        pl.Series(output_column(task), scores[task.name], dtype=pl.Float64)
        for task in package.model_config.tasks
    )
