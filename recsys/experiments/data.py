"""The data sets of an experiment: generated or read, their features built once and cached.

A prepared data set's folder keeps a ``prepared.json`` with the digest of what built it (the generator's
arguments or the table, the row limit, the feature config's text); a changed spec rebuilds it, an unchanged
one is reused.

Example:
    >>> data = prepare_dataset(spec.datasets[0], Path("out/data"))  # doctest: +SKIP
    >>> data.features  # doctest: +SKIP
    PosixPath('out/data/rho0.5/features')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from features.checks import config_path
from features.files import atomic_write
from recsys.experiments.spec import DatasetSpec


@dataclass(frozen=True)
class PreparedData:
    """A data set ready to train on.

    Attributes:
        name: the data set's name.
        features: its model-ready folder (``spec.json`` and the splits).
        truth: the generator's ground truth (``truth.parquet``) of a generated data set, else "".
    """

    name: str
    features: Path
    truth: str


def digest(data: Any) -> str:
    """A short content digest of plain data (JSON with sorted keys).

    Example:
        >>> digest({"b": 1, "a": 2}) == digest({"a": 2, "b": 1})
        True
    """
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _feature_config(dataset: DatasetSpec) -> Path:
    from features.config import CONFIG_DIR

    return config_path(dataset.features, CONFIG_DIR, "feature config")


def _feature_config_text(dataset: DatasetSpec) -> str:
    """The feature config's text; a config that ``extends`` another one is resolved first."""
    text = _feature_config(dataset).read_text()
    if "extends" not in text:
        return text  # as before: caches built before ``extends`` existed stay valid
    from features.config import FeatureConfig

    return json.dumps(dataclasses.asdict(FeatureConfig.from_yaml(_feature_config(dataset))), sort_keys=True)


def _recipe(dataset: DatasetSpec, max_rows: int) -> dict[str, Any]:
    """What builds the data set: its digest decides whether a cached folder is reused."""
    return {
        "generate": _generate_recipe(dataset.generate) if dataset.generate else None,
        "table": dataset.table,
        "max_rows": max_rows if dataset.table else 0,
        "features": _feature_config_text(dataset),
    }


def _generate_recipe(generate: Any) -> dict[str, Any]:
    """The generator's arguments; ``world`` only when not ``default``, so that older caches stay valid."""
    recipe = dataclasses.asdict(generate)
    if recipe.get("world") == "default":
        del recipe["world"]
    return recipe


def _build(dataset: DatasetSpec, folder: Path, max_rows: int) -> None:
    """Generates the raw tables (or reads the flat table) and builds the features into ``folder``."""
    from features.config import FeatureConfig
    from features.pipeline import Tables, build, load_tables, scan_table
    from synth.generate import generate

    if dataset.generate is not None:
        g = dataset.generate
        generate(
            folder / "raw",
            g.impressions,
            g.seed,
            task_correlation=g.task_correlation,
            n_users=g.n_users or None,
            n_items=g.n_items or None,
            world=g.world,
            progress=False,
        )
        tables = load_tables(folder / "raw")
    else:
        frame = scan_table(dataset.table)
        tables = Tables(impressions=frame.head(max_rows) if max_rows else frame)
    config = FeatureConfig.from_yaml(_feature_config(dataset))
    build(config, tables, folder / "features", overwrite=True, progress=False)


def prepare_dataset(dataset: DatasetSpec, root: Path, max_rows: int = 0) -> PreparedData:
    """Generates (or reads) the data set and builds its features under ``root/<name>``, once.

    Args:
        dataset: the data set.
        root: the data folder of the experiment.
        max_rows: a table data set keeps its first ``max_rows`` rows (0: all).
    """
    folder = root / dataset.name
    recipe = _recipe(dataset, max_rows)
    key = digest(recipe)
    marker = folder / "prepared.json"
    truth = str(folder / "raw" / "truth.parquet") if dataset.generate else ""
    if not (marker.exists() and json.loads(marker.read_text()).get("digest") == key):
        _build(dataset, folder, max_rows)
        atomic_write(marker, json.dumps({"digest": key, **recipe}, indent=1, default=str))
    return PreparedData(dataset.name, folder / "features", truth)
