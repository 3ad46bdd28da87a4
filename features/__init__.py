"""Feature pipeline: data contract, synthetic data, polars features (no torch)."""
