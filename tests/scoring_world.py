"""The world the scoring tests share: generated tables, two tiny registered models, candidate files.

Built once per test session (the ``scoring_raw`` and ``scoring_models`` fixtures of ``tests/conftest.py``);
each test module that scores starts its own local Ray around it (:func:`running_ray`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

MODEL = "tiny-ranker"


def generate_raw(raw: Path) -> Path:
    """Generated contract tables in ``raw`` (3,000 impressions over 30 days)."""
    from synth.generate import generate

    generate(raw, 3000, seed=3, progress=False, chunk_rows=400)
    return raw


def register_models(raw: Path) -> dict[str, Any]:
    """Two tiny models (v1 champion, v2 registered later) in a SQLite store beside ``raw``, and candidates.

    The candidates (``inputs``): two files with small row groups; the last request of file 1 continues in
    file 2, and three rows have an unseen user, an unseen item and a null user. Returns the paths, the
    store, the model URIs, the tracker and the tables.
    """
    from features.config import FeatureConfig, builtin_config
    from features.pipeline import build, load_tables
    from recsys.package import save_package
    from recsys.tracking import Tracker, log_model, register_model
    from tests.test_package import TINY_MODEL, in_memory_package

    root = raw.parent
    config = FeatureConfig.from_yaml(builtin_config("ecommerce"))
    spec, _ = build(config, load_tables(raw), root / "features", progress=False)
    store = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(store, "train", require=True)
    uris, packages = [], []
    for seed in (0, 1):  # two models with different weights: v1 champion, v2 registered later
        pkg = in_memory_package(spec, TINY_MODEL, seed=seed)
        packages.append(save_package(root / f"package{seed}", pkg.model, pkg.model_config, spec))
        with tracker.run(f"train{seed}"):
            uris.append(log_model(tracker, packages[-1]))
    assert register_model(tracker, uris[0], MODEL, "val/auc", 0.6).version == "1"

    impressions = pl.read_parquet(raw / "impressions.parquet")
    users = pl.read_parquet(raw / "users.parquet")
    items = pl.read_parquet(raw / "items.parquet")
    last = impressions["impression_id"].max()
    unseen = impressions.tail(3).with_columns(
        pl.Series("impression_id", [last + 1, last + 2, last + 3]),
        pl.Series("user_id", [10**9, impressions["user_id"][0], None], dtype=pl.Int64),
        pl.Series("item_id", [impressions["item_id"][0], 10**9, impressions["item_id"][1]]),
    )
    cands = pl.concat([impressions, unseen])
    inputs = root / "cands"
    inputs.mkdir()
    cands.head(1700).write_parquet(inputs / "c0.parquet", row_group_size=300)
    cands.slice(1700).write_parquet(inputs / "c1.parquet", row_group_size=300)
    users.write_parquet(inputs / "users.parquet")
    items.write_parquet(inputs / "items.parquet")
    return {
        "root": root,
        "store": store,
        "uris": uris,
        "packages": packages,
        "tracker": tracker,
        "inputs": inputs,
        "cands": cands,
        "users": users,
        "items": items,
    }


@contextlib.contextmanager
def running_ray() -> Iterator[str]:
    """A local Ray for the block, as a scoring run starts it; yields its address (for a second driver)."""
    import ray

    from recsys.runtime import init_ray
    from recsys.scoring.stage import OBJECT_STORE_BYTES, embedded_cpus

    started = init_ray("scoring", num_cpus=embedded_cpus(2), object_store_memory=OBJECT_STORE_BYTES)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        if started:
            ray.shutdown()


def config_for(world: dict[str, Any], out: str | Path, **kwargs: Any) -> Any:
    """A :class:`recsys.scoring.ScoreConfig` over the world's candidates, into ``world['root'] / out``."""
    from recsys.scoring import ScoreConfig
    from recsys.tracking import CHAMPION

    return ScoreConfig(
        model=kwargs.pop("model", f"models:/{MODEL}@{CHAMPION}"),
        input=kwargs.pop("input", str(world["inputs"])),
        output=str(world["root"] / out),
        tracking_uri=world["store"],
        rows_per_partition=kwargs.pop("rows_per_partition", 500),
        batch_size=kwargs.pop("batch_size", 256),
        progress=kwargs.pop("progress", False),
        **kwargs,
    )


def read_output(out: Path) -> pl.DataFrame:
    """The part files of a scoring output, by ``impression_id``."""
    return pl.read_parquet(sorted(out.glob("part-*.parquet"))).sort("impression_id")
