"""MLflow's request settings for one call: the one place that sets MLflow's environment variables.

MLflow (3.17) takes no per-client setting for its HTTP requests or its download progress bars: every REST
request (``mlflow.utils.rest_utils.http_request``) reads ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` from the environment when it is
made (``MlflowHostCreds`` and the REST stores have no such fields), and an artifact download draws its
bar when ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` says so. Without our settings a failed request is retried
7 times with exponential backoff (minutes in all) and waits up to 120 s for an answer.

:func:`mlflow_settings` is therefore the only code of the project that writes these variables, for the
duration of one call, under a lock (so that two of our threads do not restore each other's values), and
only where they matter: the HTTP settings for ``http(s)://`` stores, the progress bar when asked. A
:class:`~recsys.tracking.client.Tracker` wraps each of its calls in it.

Example:
    >>> with mlflow_settings("sqlite:///mlflow.db", max_retries=0, timeout_s=5):  # a local store: no change
    ...     pass
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from urllib.parse import urlparse

MAX_RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
BACKOFF_FACTOR = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
TIMEOUT = "MLFLOW_HTTP_REQUEST_TIMEOUT"
PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"

_lock = threading.RLock()  # re-entrant: a call inside a call keeps the outer values on exit


def is_http(uri: str) -> bool:
    """True for an ``http://`` or ``https://`` tracking URI (a server; other stores make no requests)."""
    return urlparse(uri).scheme in ("http", "https")


def env_int(name: str, default: int) -> int:
    """The integer the environment variable ``name`` holds, else ``default``."""
    value = os.environ.get(name)
    return int(value) if value else default


@contextlib.contextmanager
def mlflow_settings(
    tracking_uri: str, *, max_retries: int, timeout_s: int, progress_bar: bool = True
) -> Iterator[None]:
    """MLflow's request settings for the block; the previous environment afterwards.

    Args:
        tracking_uri: the store of the calls; the HTTP settings apply to ``http(s)://`` stores only.
        max_retries: retries of a failed request, 1-2-4 s apart (MLflow's own backoff is 2, 4, 8, ... s).
        timeout_s: seconds a request waits for an answer.
        progress_bar: False: artifact downloads draw no progress bar (one per file floods a log).
    """
    values = {}
    if is_http(tracking_uri):
        values = {MAX_RETRIES: str(max_retries), BACKOFF_FACTOR: "1", TIMEOUT: str(timeout_s)}
    if not progress_bar:
        values[PROGRESS_BAR] = "false"
    if not values:
        yield
        return
    with _lock:
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
