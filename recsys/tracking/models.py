"""Logged models: a model package as an MLflow pyfunc model (``loader_module`` form, data only).

A model is logged as the package folder of :mod:`recsys.package` (the model's ``data``) and an ``MLmodel``
file naming :mod:`recsys.tracking.pyfunc` as its loader: loading one imports that module from the installed
``recsys``, loads the weights with ``weights_only=True``, runs no code of the artifact store and unpickles
nothing. The signature names the raw columns; the requirements pin the installed versions of what scoring
imports.

Example:
    >>> with tracker.run("mmoe-baseline"):  # doctest: +SKIP
    ...     uri = log_model(tracker, "out/model")
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import AnyType

from features.contract import IMPRESSIONS, ITEMS, LABELS, USERS
from recsys.package import DEFAULT_BATCH_SIZE, load_package, output_column
from recsys.tracking.client import Tracker

LOADER_MODULE = "recsys.tracking.pyfunc"  # imported from the installed package when a model loads
PACKAGE_ARTIFACT = "package"  # the artifact key of models logged before the loader_module form
# The pyfunc model's load options (``mlflow.pyfunc.load_model(uri, model_config=...)``) and their defaults:
# MLflow passes on only the keys that the logged model declares.
LOAD_OPTIONS = {"embedding_dtype": None, "compute_dtype": "fp32"}


def _requirements() -> list[str]:
    """Pinned pip requirements of the logged model: the installed versions of what scoring imports.

    Given explicitly: MLflow's inference would import the model in a subprocess, slowly. Local version
    labels (``+cpu``) are dropped: they name a wheel index, not a version.
    """
    names = ["mlflow", "torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "polars", "pyarrow", "numpy"]
    names += ["pandas", "pyyaml"]
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib_metadata.version(name).split('+')[0]}")
        except importlib_metadata.PackageNotFoundError:
            continue
    return pins


def raw_signature(
    source: str, passthrough: Sequence[str] = (), flat_columns: Sequence[str] = ()
) -> ModelSignature:
    """The model signature: the raw column names, types not enforced, and the ``batch_size`` parameter.

    Column types are left to :func:`recsys.package.predict_frame`, which casts each contract column to its
    contract type and names the column it cannot convert: MLflow's own enforcement would reject a left join's
    nulls in integer columns (pandas turns them into float64). Labels are optional inputs: rows that carry
    clicks are their own history.

    Args:
        source: the spec's source, ``ecommerce`` or ``flat``.
        passthrough: the spec's passthrough columns (flat source).
        flat_columns: the flat table's feature columns (flat source).
    """
    if source == "ecommerce":
        tables = (IMPRESSIONS.without_labels(), USERS, ITEMS)
        required = list(dict.fromkeys(c.name for t in tables for c in t.columns))  # keys once
        optional = list(LABELS)
    else:
        required = list(dict.fromkeys([*passthrough, *flat_columns]))
        optional = []
    inputs = Schema(
        [ColSpec(AnyType(), name) for name in required]
        + [ColSpec(AnyType(), name, required=False) for name in optional]
    )
    params = ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)])
    return ModelSignature(inputs=inputs, params=params)


def _signature_of_package(package_dir: Path) -> tuple[ModelSignature, dict[str, str]]:
    package = load_package(package_dir)
    cfg = package.spec.feature_config
    columns = [c for f in cfg.features for c in (f.source, f.relative_to) if c]
    signature = raw_signature(cfg.source, cfg.passthrough, columns)
    outputs = Schema(
        [ColSpec(AnyType(), c) for c in cfg.passthrough]
        + [ColSpec("double", output_column(t)) for t in package.model_config.tasks]
    )
    signature = ModelSignature(inputs=signature.inputs, outputs=outputs, params=signature.params)
    tags = {
        "spec_hash": package.spec.content_hash,
        "tasks": ",".join(t.name for t in package.model_config.tasks),
    }
    return signature, tags


def _save_pyfunc(
    local: Path, package_dir: Path, signature: ModelSignature, input_example: Any, model: Model
) -> None:
    """Writes the pyfunc model (the package as data, the loader's name, requirements) into ``local``.

    No code travels with the model: loading it runs :data:`LOADER_MODULE` of the installed ``recsys``.
    """
    model.signature = signature
    with warnings.catch_warnings():
        # MLflow asks for an input example even when the signature is given; raw rows are optional.
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        mlflow.pyfunc.save_model(
            local,
            loader_module=LOADER_MODULE,
            data_path=str(package_dir),
            pip_requirements=_requirements(),
            mlflow_model=model,
            model_config=dict(LOAD_OPTIONS),
        )
    if input_example is not None:
        from mlflow.models.utils import _save_example

        _save_example(model, input_example, str(local))
        model.save(str(local / "MLmodel"))


def log_model(
    tracker: Tracker,
    package_dir: str | Path,
    name: str = "model",
    input_example: Any = None,
    step: int = 0,
) -> str | None:
    """Logs a model package as an MLflow pyfunc model of the active run ("models from code").

    The logged model holds ``recsys/tracking/pyfunc.py`` (run at load time), the package folder as the
    artifact ``package``, the ``recsys`` and ``features`` code, pinned requirements and the raw-column
    signature; ``mlflow.pyfunc.load_model(uri).predict(frame)`` gives :func:`recsys.package.predict_frame`'s
    scores as a pandas DataFrame.

    Args:
        tracker: the tracker, with an active run.
        package_dir: a folder written by :func:`recsys.package.save_package`.
        name: the logged model's name.
        input_example: a few raw rows (pandas) to store with the model; MLflow scores them once to check.
        step: the training step the model is of.

    Returns:
        The model URI ``models:/<model_id>``, or None when tracking is off or the upload failed.

    Raises:
        FileNotFoundError: ``package_dir`` is not a model package (checked even without ``require``: it is
            the caller's mistake, not the store's).
        RuntimeError: no active run.
    """
    if not tracker.enabled:
        return None
    run_id = tracker.require_run("log_model")
    package_dir = Path(package_dir)
    signature, tags = _signature_of_package(package_dir)  # also checks that the package loads
    client = tracker.client

    def upload() -> str:
        logged = client.create_logged_model(
            tracker.experiment_id, name=name, source_run_id=run_id, tags=tags, model_type="ranking"
        )
        try:
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / "model"
                model = Model(
                    artifact_path=logged.artifact_location,
                    model_uuid=logged.model_id,
                    run_id=run_id,
                    model_id=logged.model_id,
                )
                _save_pyfunc(local, package_dir, signature, input_example, model)
                client.log_model_artifacts(logged.model_id, str(local))
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
        except BaseException:
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        return f"models:/{logged.model_id}"

    return tracker.guarded("log_model", upload)
