"""MLflow: the only package that imports it (client, logged models, registry, reading runs back)."""
