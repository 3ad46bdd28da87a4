"""MLflow: the only package that imports it.

Other packages import the names below from ``recsys.tracking``; the modules behind them may move:
:mod:`~recsys.tracking.client` (the :class:`Tracker`), :mod:`~recsys.tracking.models` (logged models),
:mod:`~recsys.tracking.registry` (registered versions, model URIs), :mod:`~recsys.tracking.runs` (reading
runs back) and :mod:`~recsys.tracking.settings` (MLflow's request settings for a call).
"""

from recsys.tracking.client import (
    RegistrationError,
    Tracker,
    TrackingError,
    default_tracking_uri,
    flatten_params,
    sqlite_tracking_uri,
)
from recsys.tracking.models import PACKAGE_ARTIFACT, log_model, raw_signature
from recsys.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    RegisteredVersion,
    ResolvedModel,
    download_package,
    parse_model_uri,
    register_model,
    resolve_model,
)
from recsys.tracking.runs import (
    RunStatus,
    child_runs,
    expert_load_history,
    latest_run,
    metric_history,
    run_metric_history,
    run_test_predictions,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "PACKAGE_ARTIFACT",
    "RegisteredVersion",
    "ResolvedModel",
    "RunStatus",
    "Tracker",
    "RegistrationError",
    "TrackingError",
    "child_runs",
    "default_tracking_uri",
    "download_package",
    "expert_load_history",
    "flatten_params",
    "latest_run",
    "log_model",
    "metric_history",
    "parse_model_uri",
    "raw_signature",
    "register_model",
    "resolve_model",
    "run_metric_history",
    "run_test_predictions",
    "sqlite_tracking_uri",
]
