"""Training over Ray Train: config, sharding and checkpoints, evaluation, the worker loop, the driver.

The driver (:func:`recsys.train.driver.run_training`) builds the trainer; every worker builds its own model
and data; MLflow is called from the driver only, through :mod:`recsys.tracking.core`.
"""
