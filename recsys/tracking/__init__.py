"""MLflow: the only package that imports it.

Other packages import the names below from ``recsys.tracking``; the modules behind them may move.
"""

from recsys.tracking.core import (
    CHALLENGER,
    CHAMPION,
    PACKAGE_ARTIFACT,
    RegisteredVersion,
    ResolvedModel,
    Tracker,
    TrackingError,
    default_tracking_uri,
    download_package,
    flatten_params,
    log_model,
    parse_model_uri,
    raw_signature,
    register_model,
    resolve_model,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "PACKAGE_ARTIFACT",
    "RegisteredVersion",
    "ResolvedModel",
    "Tracker",
    "TrackingError",
    "default_tracking_uri",
    "download_package",
    "flatten_params",
    "log_model",
    "parse_model_uri",
    "raw_signature",
    "register_model",
    "resolve_model",
]
