"""Generated worlds the training tests share: contract tables and their features (the demo config)."""

from __future__ import annotations

from pathlib import Path


def generated_features(root: Path, rows: int, seed: int, n_users: int, n_items: int) -> Path:
    """Generates ``rows`` impressions into ``root/raw`` and builds their features into ``root/features``.

    Returns:
        ``root/features``.
    """
    from features.config import FeatureConfig, builtin_config
    from features.pipeline import build, load_tables
    from synth.generate import generate

    generate(root / "raw", rows, seed=seed, n_users=n_users, n_items=n_items, progress=False)
    config = FeatureConfig.from_yaml(builtin_config("ecommerce"))
    build(config, load_tables(root / "raw"), root / "features", progress=False)
    return root / "features"
