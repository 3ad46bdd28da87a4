"""The model registry: versions with a ``champion`` and a ``challenger``, and model URIs resolved once.

A resolved model is pinned to one concrete version, whose package :func:`download_package` fetches.

Example:
    >>> register_model(tracker, "models:/m-123", "ecommerce-ranker", "val/auc_click", 0.71)  # doctest: +SKIP
    RegisteredVersion(version='1', alias='champion', previous_champion_metric=None)
    >>> model = resolve_model(tracker, "models:/ecommerce-ranker@champion")  # doctest: +SKIP
    >>> download_package(tracker, model, "scoring/package")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

from recsys.tracking.client import Tracker, TrackingError, short_error
from recsys.tracking.models import PACKAGE_ARTIFACT

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
METRIC_TAG_PREFIX = "validation."  # a model version's tag holding its validation metric
SETTLE_ROUNDS = 20  # moves of the champion alias one registration makes at most (each one re-read)


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
    return str(version), _metric_of(client.get_model_version(name, version).tags, metric_name)


def _metric_of(tags: dict[str, str], metric_name: str) -> float | None:
    """A version's recorded validation metric (None when it has none, or not a finite number)."""
    try:
        value = float(tags[METRIC_TAG_PREFIX + metric_name])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _best_version(client: mlflow.MlflowClient, name: str, metric_name: str, higher: bool) -> str | None:
    """The registered version with the best recorded ``metric_name``; a tie goes to the older version."""
    scored = []
    for v in client.search_model_versions(f"name = '{name}'"):
        value = _metric_of(v.tags, metric_name)
        if value is not None and v.tags.get("higher_is_better", str(higher)) == str(higher):
            scored.append((value if higher else -value, -int(v.version), str(v.version)))
    return max(scored)[2] if scored else None


def _settle_champion(
    client: mlflow.MlflowClient, name: str, metric_name: str, higher: bool, version: str
) -> str:
    """Points ``champion`` at the best recorded version until a read shows it there; returns our alias.

    Every caller applies the same rule to the registry's versions and re-reads after each move, so
    concurrent registrations converge on the best version whatever the order of their writes: the last
    caller to read sees every version created before, and finds the alias on the best one. A champion
    without this metric (set by hand) is kept.
    """
    for _ in range(SETTLE_ROUNDS):
        champion = client.get_registered_model(name).aliases.get(CHAMPION)
        if (
            champion is not None
            and _metric_of(client.get_model_version(name, champion).tags, metric_name) is None
        ):
            best = str(champion)
            log.warning(
                "registered model %r: champion v%s has no tag %r; v%s becomes the challenger",
                name,
                champion,
                METRIC_TAG_PREFIX + metric_name,
                version,
            )
        else:
            best = _best_version(client, name, metric_name, higher) or version
        if champion is not None and str(champion) == best:
            break
        _set_alias(client, name, CHAMPION, best)
    if best == version:
        return CHAMPION
    for _ in range(SETTLE_ROUNDS):
        if _set_alias(client, name, CHALLENGER, version):
            break
    return CHALLENGER


def _set_alias(client: mlflow.MlflowClient, name: str, alias: str, version: str) -> bool:
    """Points ``alias`` at ``version``; False when a concurrent writer's move collided with it.

    The SQL store replaces an alias by a delete and an insert: two writers at once can collide on the
    insert (a unique constraint). The caller reads the registry again and decides again.
    """
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as e:
        log.debug("registered model %r: setting %s to v%s collided: %s", name, alias, version, e)
        return False
    return True


def _ensure_registered_model(client: mlflow.MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def _version_source(
    client: mlflow.MlflowClient, model_uri: str, run_id: str | None
) -> tuple[str, str | None, str | None]:
    """A new version's source, logged model id and run.

    The SQLite registry would resolve a ``models:/<model_id>`` source through the process-global tracking
    URI, not this client's: it is resolved here, and the storage location itself is the source.
    """
    if not model_uri.startswith("models:/m-"):
        return model_uri, None, run_id
    model_id = model_uri.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    return logged.artifact_location, model_id, run_id or logged.source_run_id


def _better(value: float, previous: float, higher_is_better: bool) -> bool:
    """Strictly better: a tie keeps the champion."""
    return value > previous if higher_is_better else value < previous


def register_model(
    tracker: Tracker,
    model_uri: str,
    name: str,
    metric_name: str,
    metric_value: float,
    higher_is_better: bool = True,
) -> RegisteredVersion | None:
    """Registers a logged model as a new version; ``champion`` goes to the best validated version.

    The version's validation metric is stored as its tag ``validation.<metric_name>``, so that comparisons
    read it from the registry, whatever happened to the run. After registering, ``champion`` is set to the
    registered version with the best recorded metric (a tie goes to the older version) and read back until
    it holds: a rule that gives the same champion whatever the order of concurrent registrations. The new
    version gets ``challenger`` if it is not the champion, and the alias returned is the one it really has.
    A champion without this metric (registered or promoted by other means) is kept, and the new version is
    its challenger: promote it by hand if it should win.

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
        _ensure_registered_model(client, name)
        source, model_id, run_id = _version_source(client, model_uri, tracker.run_id)
        _, previous = _champion_metric(client, name, metric_name)
        version = client.create_model_version(
            name,
            source=source,
            run_id=run_id,
            tags={METRIC_TAG_PREFIX + metric_name: repr(value), "higher_is_better": str(higher_is_better)},
            model_id=model_id,
        ).version
        alias = _settle_champion(client, name, metric_name, higher_is_better, str(version))
        return RegisteredVersion(str(version), alias, previous)

    return tracker.guarded("register_model", register)


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
        with tracker.settings():
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
            raise ValueError(
                f"model: {uri!r} not found in {tracker.tracking_uri} ({short_error(e)})"
            ) from None
        raise TrackingError(
            f"model: resolving {uri!r} at {tracker.tracking_uri} failed: {short_error(e)}"
        ) from e
    number = str(version.version)
    return ResolvedModel(uri, f"models:/{a}/{number}", a, number, version.run_id, source)


def _package_folder(local: Path) -> Path | None:
    """The package folder of a downloaded logged model, as its ``MLmodel`` names it (None if none).

    The pyfunc flavor's ``data`` (the ``loader_module`` form), or for models logged before it, the
    artifact ``package`` of the models-from-code form.
    """
    if not (local / "MLmodel").is_file():
        return None
    flavor = Model.load(str(local / "MLmodel")).flavors.get("python_function", {})
    relative = flavor.get("data") or ((flavor.get("artifacts") or {}).get(PACKAGE_ARTIFACT) or {}).get("path")
    package = local / relative if relative else None
    return package if package is not None and package.is_dir() else None


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
    with tracker.settings(progress_bar=False):  # a progress bar per file floods the log
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=model.artifact_uri.rstrip("/"),
                dst_path=str(dst),
                tracking_uri=tracker.tracking_uri,
                registry_uri=tracker.tracking_uri,
            )
        )
    package = _package_folder(local)
    if package is None:
        raise FileNotFoundError(
            f"model: {model.pinned_uri} holds no model package; log models with recsys.tracking.log_model"
        )
    return package
