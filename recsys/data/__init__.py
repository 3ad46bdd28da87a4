"""From model-ready Parquet to model inputs: the feature layout, the batch builder, the shard reader."""
