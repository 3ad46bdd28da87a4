"""The MLflow client of the project: runs, parameters, metrics and artifacts through one :class:`Tracker`.

Every MLflow call of the project goes through a :class:`Tracker`, built once on the driver, which holds an
``MlflowClient`` for an explicit tracking URI: no fluent API, no process-global active run.

Tracking never stops training unless asked to. A tracker probes its store when it is built; if the store
cannot be reached, ``require=True`` raises :class:`TrackingError`, otherwise it logs one warning and every
later call does nothing. A call that fails in the middle of a run is logged once and skipped; after
``max_consecutive_failures`` failures in a row the tracker turns itself off, with a second warning.

Against an HTTP server every call runs with this tracker's retry and timeout settings
(:func:`recsys.tracking.settings.mlflow_settings`): no retry and a 5 s timeout for the probe,
``max_retries`` retries with 1-2-4 s backoff and ``timeout_s`` for the calls.

Example:
    >>> tracker = Tracker(experiment_name="ecommerce")  # doctest: +SKIP
    >>> with tracker.run("mmoe-baseline", tags={"arch": "mmoe"}):  # doctest: +SKIP
    ...     tracker.log_params({"model": {"arch": {"num_experts": 8}}})
    ...     tracker.log_metrics({"val/auc_click": 0.71}, step=1)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking.context.registry import resolve_tags

from features.checks import check_int
from recsys.tracking.settings import MAX_RETRIES, TIMEOUT, env_int, is_http, mlflow_settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# MLflow's per-request batch limits (mlflow.utils.validation: MAX_PARAMS_TAGS_PER_BATCH,
# MAX_METRICS_PER_BATCH) and its parameter value limit (MAX_PARAM_VAL_LENGTH: 6000 in MLflow 3; it was 500
# in MLflow 1, which some servers still enforce: pass a smaller ``max_param_length`` to a Tracker there).
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000
PROBE_TIMEOUT_S = 5


class TrackingError(RuntimeError):
    """The tracking store cannot be reached, or a call failed, and the tracker was built with ``require``."""


class RegistrationError(TrackingError):
    """A trained model could not be logged or registered (the message names the model and its package)."""


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store ``mlflow.db`` in the current directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or sqlite_tracking_uri(Path.cwd())


def sqlite_tracking_uri(folder: str | Path) -> str:
    """A local SQLite store ``mlflow.db`` in ``folder`` (made absolute): ``sqlite:////abs/folder/mlflow.db``.

    Example:
        >>> sqlite_tracking_uri("/tmp/run")
        'sqlite:////tmp/run/mlflow.db'
    """
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


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


def short_error(error: BaseException, limit: int = 300) -> str:
    """A one-line summary of an exception, for warnings."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        experiment_name: the experiment, created if missing; None for a registry reader, which touches no
            experiment (it resolves and downloads registered models, and starts no run).
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
        experiment_name: str | None = "recsys",
        require: bool = False,
        *,
        artifact_location: str | None = None,
        max_retries: int | None = None,
        timeout_s: int | None = None,
        max_consecutive_failures: int = 5,
        max_param_length: int = MAX_PARAM_LENGTH,
    ) -> None:
        if experiment_name is not None and (not isinstance(experiment_name, str) or not experiment_name):
            raise ValueError(f"experiment_name: expected a non-empty string or None, got {experiment_name!r}")
        check_int("tracker", "max_consecutive_failures", max_consecutive_failures, minimum=1)
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment_name = experiment_name
        self.require = require
        if max_retries is None:
            max_retries = env_int(MAX_RETRIES, 2)
        if timeout_s is None:
            timeout_s = env_int(TIMEOUT, 60)
        self.max_retries, self.timeout_s = max_retries, timeout_s
        self.max_consecutive_failures = max_consecutive_failures
        self.max_param_length = max_param_length
        self.experiment_id: str | None = None
        self._run_id: str | None = None
        self._enabled = True
        self._warned = False
        self._failures = 0  # in a row
        self.failed_calls = 0  # in all
        self.last_error: str | None = None  # the last failed call, in words
        self.client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self._connect(artifact_location or _default_artifact_location(self.tracking_uri))

    def _connect(self, artifact_location: str | None) -> None:
        """Probes the store, without retries, and finds or creates the experiment."""
        self._artifact_location = artifact_location
        started = time.monotonic()
        try:
            with self.settings(max_retries=0, timeout_s=min(PROBE_TIMEOUT_S, self.timeout_s)):
                if self.experiment_name is None:  # a registry reader: probe the registry, create nothing
                    self.client.search_registered_models(max_results=1)
                else:
                    self.experiment_id = self._find_or_create(self.experiment_name)
        except Exception as e:
            message = (
                f"MLflow tracking at {self.tracking_uri} is unreachable ({short_error(e)}, after "
                f"{time.monotonic() - started:.1f} s)"
            )
            self.last_error = message
            if self.require:
                raise TrackingError(f"{message}; start the server or fix the URI, or track optionally") from e
            log.warning("%s; the job goes on without tracking", message)
            self._enabled = False
            self._warned = True

    def _find_or_create(self, name: str) -> str:
        """The id of experiment ``name``, created (or restored, if deleted) as needed."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return self.client.create_experiment(name, artifact_location=self._artifact_location)
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def set_experiment(self, name: str) -> None:
        """Logs later runs into experiment ``name`` (created if missing); a no-op when tracking is off.

        For a tracker that learns its experiment late: a registry reader once it knows the model it scores.

        Raises:
            RuntimeError: a run is active.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"set_experiment: expected a non-empty string, got {name!r}")
        if self._run_id is not None:
            raise RuntimeError(f"set_experiment: run {self._run_id} is still active; call end_run first")
        experiment_id = self.guarded("set_experiment", lambda: self._find_or_create(name))
        if experiment_id is not None:
            self.experiment_name, self.experiment_id = name, experiment_id

    def settings(
        self, *, max_retries: int | None = None, timeout_s: int | None = None, progress_bar: bool = True
    ) -> contextlib.AbstractContextManager[None]:
        """This tracker's MLflow request settings for a block of calls (:mod:`recsys.tracking.settings`)."""
        return mlflow_settings(
            self.tracking_uri,
            max_retries=self.max_retries if max_retries is None else max_retries,
            timeout_s=self.timeout_s if timeout_s is None else timeout_s,
            progress_bar=progress_bar,
        )

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
        if self._run_id is None or not is_http(self.tracking_uri):
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

    def guarded(self, what: str, call: Callable[[], T]) -> T | None:
        """Runs one MLflow call with this tracker's HTTP settings; a failure warns once and is skipped.

        Returns:
            The call's result, or None when tracking is off or the call failed (without ``require``).
        """
        if not self._enabled:
            return None
        try:
            with self.settings():
                result = call()
        except Exception as e:
            self.last_error = f"MLflow {what} at {self.tracking_uri} failed: {short_error(e)}"
            if self.require:
                raise TrackingError(self.last_error) from e
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
                    short_error(e),
                )
            elif not self._warned:
                self._warned = True
                log.warning(
                    "MLflow %s at %s failed (%s); training goes on, this and later failures are skipped",
                    what,
                    self.tracking_uri,
                    short_error(e),
                )
            else:
                log.debug("MLflow %s failed: %s", what, short_error(e))
            return None
        self._failures = 0
        return result

    def require_run(self, what: str) -> str:
        """The active run's id; ``what`` names the caller in the error when there is none."""
        if self._run_id is None:
            raise RuntimeError(f"{what}: no active run; call start_run first")
        return self._run_id

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
        if self.experiment_name is None:
            raise ValueError("start_run: this tracker reads the registry only (experiment_name=None)")
        all_tags = resolve_tags({k: str(v) for k, v in (tags or {}).items()})
        if run_id is not None and self._enabled:
            reopened = self.guarded("start_run", lambda: self._reopen(run_id, all_tags))
            if reopened:
                self._run_id = run_id
                return run_id
        run = self.guarded(
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

    def end_run(self, status: str = "FINISHED", *, even_if_off: bool = False) -> None:
        """Ends the active run (if any) with ``FINISHED``, ``FAILED`` or ``KILLED``.

        Args:
            status: the run's end status.
            even_if_off: try once even when tracking went off during the run (a store that failed may be
                back), so that a failed run is not left ``RUNNING``; a failure is logged, not raised.
        """
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status: expected 'FINISHED', 'FAILED' or 'KILLED', got {status!r}")
        run_id, self._run_id = self._run_id, None
        if run_id is None:
            return
        if self._enabled or not even_if_off:
            self.guarded("end_run", lambda: self.client.set_terminated(run_id, status))
            return
        try:
            with self.settings(max_retries=0, timeout_s=min(PROBE_TIMEOUT_S, self.timeout_s)):
                self.client.set_terminated(run_id, status)
        except Exception as e:
            log.warning("MLflow run %s could not be ended %s: %s", run_id, status, short_error(e))

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

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Logs (nested) parameters as flat dotted keys with string values (see :func:`flatten_params`).

        Values longer than ``max_param_length`` are truncated; the parameters go in batches of 100, MLflow's
        limit per request. A parameter cannot change its value within a run (MLflow refuses it).
        """
        if not self._enabled:
            return
        run_id = self.require_run("log_params")
        limit = self.max_param_length
        flat = {
            k: v if len(v) <= limit else v[: limit - 3] + "..." for k, v in flatten_params(params).items()
        }
        entries = [Param(k, v) for k, v in flat.items()]
        for chunk in _batches(entries, MAX_PARAMS_PER_BATCH):
            self.guarded("log_params", lambda chunk=chunk: self.client.log_batch(run_id, params=list(chunk)))

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
        run_id = self.require_run("log_metrics")
        timestamp = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"metrics[{key!r}]: expected a number, got {value!r}") from None
            entries.append(Metric(key, number, timestamp, step or 0))
        for chunk in _batches(entries, MAX_METRICS_PER_BATCH):
            self.guarded(
                "log_metrics", lambda chunk=chunk: self.client.log_batch(run_id, metrics=list(chunk))
            )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Uploads a file, or a folder's contents, to the run's artifacts (under ``artifact_path``)."""
        if not self._enabled:
            return
        run_id = self.require_run("log_artifact")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"log_artifact: {path} does not exist")
        if path.is_dir():
            self.guarded("log_artifacts", lambda: self.client.log_artifacts(run_id, str(path), artifact_path))
        else:
            self.guarded("log_artifact", lambda: self.client.log_artifact(run_id, str(path), artifact_path))

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """Writes a dict as a JSON (``.json``) or YAML (``.yaml``) artifact."""
        if not self._enabled:
            return
        run_id = self.require_run("log_dict")
        self.guarded("log_dict", lambda: self.client.log_dict(run_id, dict(dictionary), artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Writes text as an artifact file."""
        if not self._enabled:
            return
        run_id = self.require_run("log_text")
        self.guarded("log_text", lambda: self.client.log_text(run_id, text, artifact_file))

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Saves a matplotlib figure as an image artifact (e.g. ``plots/gates.png``).

        Build the figure with ``matplotlib.figure.Figure()`` (or pyplot under the ``Agg`` backend), so that
        no display is needed.
        """
        if not self._enabled:
            return
        run_id = self.require_run("log_figure")
        self.guarded("log_figure", lambda: self.client.log_figure(run_id, figure, artifact_file))
