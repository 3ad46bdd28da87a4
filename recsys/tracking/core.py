"""The one module that talks to MLflow: runs, parameters, metrics, artifacts, models and the registry.

Every MLflow call of the project goes through a :class:`Tracker`, built once on the driver (rank 0), which
holds an ``MlflowClient`` for an explicit tracking URI: no fluent API, no process-global active run.

Tracking never stops training unless asked to. A tracker probes its store when it is built; if the store
cannot be reached, ``require=True`` raises :class:`TrackingError`, otherwise it logs one warning and every
later call does nothing. A call that fails in the middle of a run is logged once and skipped; after
``max_consecutive_failures`` failures in a row the tracker turns itself off, with a second warning.

MLflow's HTTP client retries a failed request 7 times with exponential backoff (minutes in all) and waits up
to 120 s for an answer. A tracker runs every call with the settings ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` set for the call only (MLflow
reads them at each request): no retry and a 5 s timeout for the probe, ``max_retries`` retries with 1-2-4 s
backoff and ``timeout_s`` for the calls.

Models are logged as MLflow "models from code" (:mod:`recsys.tracking.pyfunc`) with the package folder of
:mod:`recsys.package` as an artifact: loading one runs that file and loads the weights with
``weights_only=True``, and unpickles nothing.

Example:
    >>> tracker = Tracker(experiment_name="ecommerce")  # doctest: +SKIP
    >>> with tracker.run("mmoe-baseline", tags={"arch": "mmoe"}):  # doctest: +SKIP
    ...     tracker.log_params({"model": {"arch": {"num_experts": 8}}})
    ...     tracker.log_metrics({"val/auc_click": 0.71}, step=1)
    ...     uri = log_model(tracker, "out/model")
    ...     register_model(tracker, uri, "ecommerce-ranker", "val/auc_click", 0.71)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import mlflow
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking.context.registry import resolve_tags
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import AnyType

import features
import recsys
from features.contract import IMPRESSIONS, ITEMS, LABELS, USERS
from recsys.package import DEFAULT_BATCH_SIZE, load_package, output_column

log = logging.getLogger(__name__)
T = TypeVar("T")

# MLflow's per-request batch limits (mlflow.utils.validation: MAX_PARAMS_TAGS_PER_BATCH,
# MAX_METRICS_PER_BATCH) and its parameter value limit (MAX_PARAM_VAL_LENGTH: 6000 in MLflow 3; it was 500
# in MLflow 1, which some servers still enforce: pass a smaller ``max_param_length`` to a Tracker there).
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000
PROBE_TIMEOUT_S = 5
CHAMPION, CHALLENGER = "champion", "challenger"
METRIC_TAG_PREFIX = "validation."  # a model version's tag holding its validation metric
PYFUNC_FILE = Path(__file__).with_name("pyfunc.py")
PACKAGE_ARTIFACT = "package"  # the artifact key recsys.tracking.pyfunc loads the package from


class TrackingError(RuntimeError):
    """The tracking store cannot be reached, or a call failed, and the tracker was built with ``require``."""


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store ``mlflow.db`` in the current directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _is_http(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def _default_artifact_location(uri: str) -> str | None:
    """Artifacts beside a SQLite database (``mlruns/``, MLflow's local name); other stores choose their own.

    MLflow's own default is ``./mlruns`` in the current directory, wherever the database is.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and parsed.path not in ("", "/", "/:memory:"):
        # sqlite:////abs/db -> path "//abs/db"; sqlite:///rel/db -> path "/rel/db" (relative to the cwd).
        db = Path(parsed.path[1:]).resolve()
        return (db.parent / "mlruns").as_uri()
    return None


def _short(error: BaseException, limit: int = 300) -> str:
    """A one-line summary of an exception, for warnings."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _http_settings(max_retries: int, timeout_s: int) -> Iterator[None]:
    """MLflow's HTTP retry and timeout settings for the block; the previous environment afterwards."""
    values = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # 1, 2, 4 s between retries instead of 2, 4, 8, ...
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
    }
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested parameters as flat ``{"a.b.c": "value"}`` strings.

    Mappings and dataclasses nest with dotted keys; lists and tuples are written as JSON; other values
    with ``str``.

    Example:
        >>> flatten_params({"arch": {"type": "mmoe", "expert_hidden": (64, 32)}, "lr": 0.001})
        {'arch.type': 'mmoe', 'arch.expert_hidden': '[64, 32]', 'lr': '0.001'}
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = str(value)
    return flat


def _batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Tracker:
    """MLflow tracking through one client, that degrades to a no-op when the store is unreachable.

    Args:
        tracking_uri: the store (``sqlite:///...``, ``http://host:port``, ...); default
            :func:`default_tracking_uri`.
        experiment_name: the experiment, created if missing.
        require: raise :class:`TrackingError` when the store is unreachable or a call fails, instead of
            warning and going on without tracking.
        artifact_location: where a new experiment keeps its artifacts; default ``mlruns/`` beside a
            SQLite database, the server's choice otherwise.
        max_retries: HTTP retries of a call (default ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` if set, else 2).
        timeout_s: HTTP timeout of a request (default ``MLFLOW_HTTP_REQUEST_TIMEOUT`` if set, else 60).
        max_consecutive_failures: failed calls in a row after which tracking turns itself off.
        max_param_length: parameter values are truncated to this many characters.

    Example:
        >>> tracker = Tracker("sqlite:////tmp/mlflow.db", "demo")  # doctest: +SKIP
        >>> run_id = tracker.start_run("first")  # doctest: +SKIP
        >>> tracker.log_metrics({"loss": 0.5}, step=0)  # doctest: +SKIP
        >>> tracker.end_run()  # doctest: +SKIP
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "recsys",
        require: bool = False,
        *,
        artifact_location: str | None = None,
        max_retries: int | None = None,
        timeout_s: int | None = None,
        max_consecutive_failures: int = 5,
        max_param_length: int = MAX_PARAM_LENGTH,
    ) -> None:
        if not isinstance(experiment_name, str) or not experiment_name:
            raise ValueError(f"experiment_name: expected a non-empty string, got {experiment_name!r}")
        if max_consecutive_failures < 1:
            raise ValueError(
                f"max_consecutive_failures: expected an integer >= 1, got {max_consecutive_failures!r}"
            )
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment_name = experiment_name
        self.require = require
        if max_retries is None:
            max_retries = _env_int("MLFLOW_HTTP_REQUEST_MAX_RETRIES", 2)
        if timeout_s is None:
            timeout_s = _env_int("MLFLOW_HTTP_REQUEST_TIMEOUT", 60)
        self.max_retries, self.timeout_s = max_retries, timeout_s
        self.max_consecutive_failures = max_consecutive_failures
        self.max_param_length = max_param_length
        self.experiment_id: str | None = None
        self._run_id: str | None = None
        self._enabled = True
        self._warned = False
        self._failures = 0  # in a row
        self.failed_calls = 0  # in all
        self.client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self._connect(artifact_location or _default_artifact_location(self.tracking_uri))

    def _connect(self, artifact_location: str | None) -> None:
        """Probes the store, without retries, and finds or creates the experiment."""
        started = time.monotonic()
        try:
            with _http_settings(max_retries=0, timeout_s=min(PROBE_TIMEOUT_S, self.timeout_s)):
                experiment = self.client.get_experiment_by_name(self.experiment_name)
                if experiment is None:
                    self.experiment_id = self.client.create_experiment(
                        self.experiment_name, artifact_location=artifact_location
                    )
                else:
                    if experiment.lifecycle_stage == "deleted":
                        self.client.restore_experiment(experiment.experiment_id)
                    self.experiment_id = experiment.experiment_id
        except Exception as e:
            message = (
                f"MLflow tracking at {self.tracking_uri} is unreachable ({_short(e)}, after "
                f"{time.monotonic() - started:.1f} s)"
            )
            if self.require:
                raise TrackingError(f"{message}; start the server or fix the URI, or track optionally") from e
            log.warning("%s; training goes on without tracking", message)
            self._enabled = False
            self._warned = True

    # ------------------------------------------------------------------------------------ state

    @property
    def enabled(self) -> bool:
        """Whether calls reach the store (False after an unreachable probe or too many failures)."""
        return self._enabled

    @property
    def run_id(self) -> str | None:
        """The active run's id, or None."""
        return self._run_id

    @property
    def run_url(self) -> str | None:
        """The web UI page of the active run (HTTP stores), or None."""
        if self._run_id is None or not _is_http(self.tracking_uri):
            return None
        return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self._run_id}"

    def describe(self) -> str:
        """One line for the log: where the run is tracked, or that tracking is off."""
        if not self._enabled:
            return f"MLflow tracking off ({self.tracking_uri} unreachable)"
        if self._run_id is None:
            return f"MLflow experiment {self.experiment_name!r} at {self.tracking_uri}"
        where = self.run_url or self.tracking_uri
        return f"MLflow run {self._run_id} (experiment {self.experiment_name!r}) at {where}"

    def _guarded(self, what: str, call: Callable[[], T]) -> T | None:
        """Runs one MLflow call with this tracker's HTTP settings; a failure warns once and is skipped.

        Returns:
            The call's result, or None when tracking is off or the call failed (without ``require``).
        """
        if not self._enabled:
            return None
        try:
            with _http_settings(self.max_retries, self.timeout_s):
                result = call()
        except Exception as e:
            if self.require:
                raise TrackingError(f"MLflow {what} at {self.tracking_uri} failed: {_short(e)}") from e
            self._failures += 1
            self.failed_calls += 1
            if self._failures >= self.max_consecutive_failures:
                self._enabled = False
                log.warning(
                    "MLflow tracking at %s: %d calls failed in a row (last: %s: %s); tracking is off for "
                    "the rest of this process",
                    self.tracking_uri,
                    self._failures,
                    what,
                    _short(e),
                )
            elif not self._warned:
                self._warned = True
                log.warning(
                    "MLflow %s at %s failed (%s); training goes on, this and later failures are skipped",
                    what,
                    self.tracking_uri,
                    _short(e),
                )
            else:
                log.debug("MLflow %s failed: %s", what, _short(e))
            return None
        self._failures = 0
        return result

    def _active_run(self, what: str) -> str:
        if self._run_id is None:
            raise RuntimeError(f"{what}: no active run; call start_run first")
        return self._run_id

    # ------------------------------------------------------------------------------------- runs

    def start_run(
        self,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> str | None:
        """Starts a run in the experiment, or reopens run ``run_id`` (a restarted job resuming its run).

        Args:
            run_name: the run's name (MLflow makes one up if None); ignored when reopening.
            tags: run tags; the user, source and git commit tags MLflow's fluent API adds are added too.
            run_id: an earlier run of this experiment to mark running again and log to. If the store does
                not have it (a new database), a new run is started, with a warning.

        Returns:
            The run id, or None when tracking is off.

        Raises:
            RuntimeError: a run is already active.
        """
        if self._run_id is not None:
            raise RuntimeError(f"start_run: run {self._run_id} is still active; call end_run first")
        all_tags = resolve_tags({k: str(v) for k, v in (tags or {}).items()})
        if run_id is not None and self._enabled:
            reopened = self._guarded("start_run", lambda: self._reopen(run_id, all_tags))
            if reopened:
                self._run_id = run_id
                return run_id
        run = self._guarded(
            "start_run",
            lambda: self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags),
        )
        self._run_id = run.info.run_id if run is not None else None
        return self._run_id

    def _reopen(self, run_id: str, tags: Mapping[str, str]) -> bool:
        """Marks an existing run as running again; False if the store does not have it."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
            log.warning("MLflow run %s not found at %s; starting a new run", run_id, self.tracking_uri)
            return False
        if run.info.experiment_id != self.experiment_id:
            raise ValueError(
                f"run_id: run {run_id} belongs to experiment {run.info.experiment_id}, not to "
                f"{self.experiment_name!r} ({self.experiment_id})"
            )
        self.client.update_run(run_id, status="RUNNING")
        for key, value in tags.items():
            # System tags such as the source name differ between attempts; the first attempt's stay.
            if not key.startswith("mlflow."):
                self.client.set_tag(run_id, key, value)
        return True

    def end_run(self, status: str = "FINISHED") -> None:
        """Ends the active run (if any) with ``FINISHED``, ``FAILED`` or ``KILLED``."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status: expected 'FINISHED', 'FAILED' or 'KILLED', got {status!r}")
        run_id, self._run_id = self._run_id, None
        if run_id is not None:
            self._guarded("end_run", lambda: self.client.set_terminated(run_id, status))

    @contextlib.contextmanager
    def run(self, run_name: str | None = None, tags: Mapping[str, Any] | None = None) -> Iterator[str | None]:
        """A run for the block: ``FINISHED`` when it ends, ``FAILED`` on an error, ``KILLED`` on Ctrl-C."""
        run_id = self.start_run(run_name, tags)
        try:
            yield run_id
        except KeyboardInterrupt:
            self.end_run("KILLED")
            raise
        except BaseException:
            self.end_run("FAILED")
            raise
        self.end_run("FINISHED")

    # -------------------------------------------------------------------------------- logging

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Logs (nested) parameters as flat dotted keys with string values (see :func:`flatten_params`).

        Values longer than ``max_param_length`` are truncated; the parameters go in batches of 100, MLflow's
        limit per request. A parameter cannot change its value within a run (MLflow refuses it).
        """
        if not self._enabled:
            return
        run_id = self._active_run("log_params")
        limit = self.max_param_length
        flat = {
            k: v if len(v) <= limit else v[: limit - 3] + "..." for k, v in flatten_params(params).items()
        }
        entries = [Param(k, v) for k, v in flat.items()]
        for chunk in _batches(entries, MAX_PARAMS_PER_BATCH):
            self._guarded("log_params", lambda chunk=chunk: self.client.log_batch(run_id, params=list(chunk)))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Logs metrics at a step, in batches of 1000 (MLflow's limit per request).

        Args:
            metrics: name -> value (Python, numpy or 0-d torch numbers). NaN and infinities are logged as
                MLflow stores them (NaN as NaN; infinities as the largest float).
            step: the training step (0 if None).

        Raises:
            ValueError: a value is not a number (the message names the metric).
        """
        if not self._enabled:
            return
        run_id = self._active_run("log_metrics")
        timestamp = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"metrics[{key!r}]: expected a number, got {value!r}") from None
            entries.append(Metric(key, number, timestamp, step or 0))
        for chunk in _batches(entries, MAX_METRICS_PER_BATCH):
            self._guarded(
                "log_metrics", lambda chunk=chunk: self.client.log_batch(run_id, metrics=list(chunk))
            )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Uploads a file, or a folder's contents, to the run's artifacts (under ``artifact_path``)."""
        if not self._enabled:
            return
        run_id = self._active_run("log_artifact")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"log_artifact: {path} does not exist")
        if path.is_dir():
            self._guarded(
                "log_artifacts", lambda: self.client.log_artifacts(run_id, str(path), artifact_path)
            )
        else:
            self._guarded("log_artifact", lambda: self.client.log_artifact(run_id, str(path), artifact_path))

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """Writes a dict as a JSON (``.json``) or YAML (``.yaml``) artifact."""
        if not self._enabled:
            return
        run_id = self._active_run("log_dict")
        self._guarded("log_dict", lambda: self.client.log_dict(run_id, dict(dictionary), artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Writes text as an artifact file."""
        if not self._enabled:
            return
        run_id = self._active_run("log_text")
        self._guarded("log_text", lambda: self.client.log_text(run_id, text, artifact_file))

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Saves a matplotlib figure as an image artifact (e.g. ``plots/gates.png``).

        Build the figure with ``matplotlib.figure.Figure()`` (or pyplot under the ``Agg`` backend), so that
        no display is needed.
        """
        if not self._enabled:
            return
        run_id = self._active_run("log_figure")
        self._guarded("log_figure", lambda: self.client.log_figure(run_id, figure, artifact_file))


# ------------------------------------------------------------------------------------------ models


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
    run_id = tracker._active_run("log_model")
    package_dir = Path(package_dir)
    signature, tags = _signature_of_package(package_dir)  # also checks that the package loads
    client = tracker.client

    def upload() -> str:
        logged = client.create_logged_model(
            tracker.experiment_id, name=name, source_run_id=run_id, tags=tags, model_type="ranking"
        )
        try:
            with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                # MLflow asks for an input example even when the signature is given; raw rows are optional.
                warnings.filterwarnings(
                    "ignore", message=".*input example was not provided", category=UserWarning
                )
                local = Path(tmp) / "model"
                mlflow.pyfunc.save_model(
                    local,
                    python_model=str(PYFUNC_FILE),
                    artifacts={PACKAGE_ARTIFACT: str(package_dir)},
                    # The library travels with the model, so that it loads where recsys is not installed.
                    code_paths=[str(Path(recsys.__file__).parent), str(Path(features.__file__).parent)],
                    signature=signature,
                    input_example=input_example,
                    pip_requirements=_requirements(),
                    mlflow_model=Model(
                        artifact_path=logged.artifact_location,
                        model_uuid=logged.model_id,
                        run_id=run_id,
                        model_id=logged.model_id,
                    ),
                )
                for cache in list(local.rglob("__pycache__")):
                    shutil.rmtree(cache, ignore_errors=True)
                client.log_model_artifacts(logged.model_id, str(local))
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
        except BaseException:
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        return f"models:/{logged.model_id}"

    return tracker._guarded("log_model", upload)


@dataclass(frozen=True)
class RegisteredVersion:
    """A new registered model version.

    Attributes:
        version: the version number.
        alias: ``champion`` if it beat the champion (or is the first), else ``challenger``.
        previous_champion_metric: the champion's metric it was compared with (None without a champion, or
            when the champion has no such metric).
    """

    version: str
    alias: str
    previous_champion_metric: float | None


def _champion_metric(
    client: mlflow.MlflowClient, name: str, metric_name: str
) -> tuple[str | None, float | None]:
    """The champion version of a registered model and its stored metric (None where missing)."""
    aliases = client.get_registered_model(name).aliases
    version = aliases.get(CHAMPION)
    if version is None:
        return None, None
    tag = client.get_model_version(name, version).tags.get(METRIC_TAG_PREFIX + metric_name)
    return str(version), float(tag) if tag is not None else None


def register_model(
    tracker: Tracker,
    model_uri: str,
    name: str,
    metric_name: str,
    metric_value: float,
    higher_is_better: bool = True,
) -> RegisteredVersion | None:
    """Registers a logged model as a new version and moves ``champion`` to it only if it is better.

    The version's validation metric is stored as its tag ``validation.<metric_name>``, so that later
    comparisons read it from the registry, whatever happened to the run. The new version becomes
    ``champion`` if there is none, or if its metric is strictly better than the champion's; otherwise it
    becomes ``challenger``. A champion without this metric (registered by other means) is kept, and the
    new version is its challenger: promote it by hand if it should win.

    Args:
        tracker: the tracker.
        model_uri: the model, e.g. from :func:`log_model` (``models:/<model_id>``).
        name: the registered model's name (created if missing).
        metric_name: the validation metric that decides, e.g. ``val/auc_click``.
        metric_value: the new version's value of it.
        higher_is_better: True for AUC-like metrics, False for losses.

    Returns:
        The version and the alias it got, or None when tracking is off or the call failed.

    Raises:
        ValueError: ``metric_value`` is not a finite number.
    """
    try:
        value = float(metric_value)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"metric_value: expected a finite number, got {metric_value!r}")
    if not tracker.enabled:
        return None
    client = tracker.client

    def register() -> RegisteredVersion:
        try:
            client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        source, model_id, run_id = model_uri, None, tracker.run_id
        if model_uri.startswith("models:/m-"):
            # The SQLite registry would resolve a models:/<model_id> source through the process-global
            # tracking URI, not this client's: resolve it here and pass the storage location itself.
            model_id = model_uri.removeprefix("models:/")
            logged = client.get_logged_model(model_id)
            source, run_id = logged.artifact_location, run_id or logged.source_run_id
        champion, previous = _champion_metric(client, name, metric_name)
        version = client.create_model_version(
            name,
            source=source,
            run_id=run_id,
            tags={METRIC_TAG_PREFIX + metric_name: repr(value), "higher_is_better": str(higher_is_better)},
            model_id=model_id,
        ).version
        if champion is None:
            better = True
        elif previous is None:
            log.warning(
                "registered model %r: champion v%s has no tag %r; v%s becomes the challenger",
                name,
                champion,
                METRIC_TAG_PREFIX + metric_name,
                version,
            )
            better = False
        else:
            better = value > previous if higher_is_better else value < previous
        alias = CHAMPION if better else CHALLENGER
        client.set_registered_model_alias(name, alias, str(version))
        return RegisteredVersion(str(version), alias, previous)

    return tracker._guarded("register_model", register)


# ----------------------------------------------------------------------------------- model resolution


@dataclass(frozen=True)
class ResolvedModel:
    """A model URI pinned to one concrete model: what a scoring run records.

    Attributes:
        uri: the URI as given (``models:/NAME@alias``, ``models:/NAME/3``, ``runs:/RUN/model``).
        pinned_uri: the URI of exactly this model, which later alias moves do not change
            (``models:/NAME/3``, or ``runs:/RUN/model``).
        name: the registered model's name (None for a ``runs:/`` URI).
        version: the registered version (None for a ``runs:/`` URI).
        run_id: the run that logged the model (None where the registry does not say).
        artifact_uri: where the logged model's files are.
    """

    uri: str
    pinned_uri: str
    name: str | None
    version: str | None
    run_id: str | None
    artifact_uri: str


def parse_model_uri(uri: str) -> tuple[str, str, str]:
    """Splits a model URI into its kind and two parts.

    ``("alias", NAME, ALIAS)``, ``("version", NAME, VERSION)`` or ``("run", RUN_ID, ARTIFACT_PATH)``.

    Raises:
        ValueError: any other form; the message names the URI.
    """
    expected = "expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH"
    if uri.startswith("models:/"):
        rest = uri.removeprefix("models:/").strip("/")
        if "@" in rest and "/" not in rest:
            name, alias = rest.split("@", 1)
            if name and alias:
                return "alias", name, alias
        parts = rest.split("/")
        if len(parts) == 2 and parts[0] and parts[1].isdigit():
            return "version", parts[0], parts[1]
    elif uri.startswith("runs:/"):
        parts = uri.removeprefix("runs:/").strip("/").split("/", 1)
        if len(parts) == 2 and all(parts):
            return "run", parts[0], parts[1]
    raise ValueError(f"model: {uri!r} is not a model URI; {expected}")


def resolve_model(tracker: Tracker, uri: str) -> ResolvedModel:
    """Resolves a model URI once, through the registry, to one concrete model.

    An alias is read once here: a caller that keeps the returned :class:`ResolvedModel` keeps scoring with
    the same version even if the alias moves meanwhile.

    Args:
        tracker: a tracker on the store that holds the registry (it must be reachable).
        uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/RUN_ID/PATH``.

    Returns:
        The pinned model.

    Raises:
        ValueError: a malformed URI, or an unknown model, alias, version or run (the message names it).
        TrackingError: the store cannot be reached.
    """
    kind, a, b = parse_model_uri(uri)
    if not tracker.enabled:
        raise TrackingError(
            f"model: cannot resolve {uri!r}: MLflow at {tracker.tracking_uri} is unreachable "
            "(give a reachable --tracking-uri, or a local package folder)"
        )
    client = tracker.client
    try:
        with _http_settings(tracker.max_retries, tracker.timeout_s):
            if kind == "run":
                client.get_run(a)  # fails clearly for an unknown run
                return ResolvedModel(uri, uri, None, None, a, f"runs:/{a}/{b}")
            if kind == "alias":
                version = client.get_model_version_by_alias(a, b)
            else:
                version = client.get_model_version(a, b)
            source = version.source
            if source.startswith("models:/m-"):
                source = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    except MlflowException as e:
        if e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST) or "not found" in str(e).lower():
            raise ValueError(f"model: {uri!r} not found in {tracker.tracking_uri} ({_short(e)})") from None
        raise TrackingError(f"model: resolving {uri!r} at {tracker.tracking_uri} failed: {_short(e)}") from e
    number = str(version.version)
    return ResolvedModel(uri, f"models:/{a}/{number}", a, number, version.run_id, source)


def download_package(tracker: Tracker, model: ResolvedModel, dst: str | Path) -> Path:
    """Downloads the model package (the logged model's artifact ``package``) of a resolved model.

    Args:
        tracker: a tracker on the store of ``model``.
        model: from :func:`resolve_model`.
        dst: an empty or missing folder to download into.

    Returns:
        The package folder, ready for :func:`recsys.package.load_package`.

    Raises:
        FileNotFoundError: the logged model holds no package (not logged by :func:`log_model`).
    """
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # one bar per file floods the log
    try:
        with _http_settings(tracker.max_retries, tracker.timeout_s):
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=model.artifact_uri.rstrip("/"),
                    dst_path=str(dst),
                    tracking_uri=tracker.tracking_uri,
                    registry_uri=tracker.tracking_uri,
                )
            )
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved
    # The artifact keeps its folder's name (artifacts/<name>); MLmodel says which one is the package.
    artifacts = {}
    if (local / "MLmodel").is_file():
        flavor = Model.load(str(local / "MLmodel")).flavors.get("python_function", {})
        artifacts = flavor.get("artifacts") or {}
    relative = (artifacts.get(PACKAGE_ARTIFACT) or {}).get("path")
    package = local / relative if relative else None
    if package is None or not package.is_dir():
        raise FileNotFoundError(
            f"model: {model.pinned_uri} has no {PACKAGE_ARTIFACT!r} artifact; log models with "
            "recsys.tracking.core.log_model"
        )
    return package
