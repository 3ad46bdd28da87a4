"""Training over Ray Train: config, typed state, sharding, checkpoints, evaluation, the worker, the driver.

The driver (:func:`recsys.train.driver.run_training`) builds the trainer; every worker builds its own model
and data (:mod:`recsys.train.worker`) and reports what it computed (:mod:`recsys.train.reports`); MLflow is
called from the driver only, by :mod:`recsys.train.recorder` through :mod:`recsys.tracking`.
"""
