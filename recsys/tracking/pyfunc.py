"""The MLflow pyfunc flavor of a model package, in MLflow's ``loader_module`` form.

A logged model holds data only: the package folder (``data/``, the weights loaded with
``torch.load(weights_only=True)``, the model config and the feature spec as JSON) and an ``MLmodel`` file
that names this module. Loading it imports this module from the installed ``recsys`` package and calls
:func:`_load_pyfunc`: no code from the artifact store runs and nothing is unpickled, so a model loads with
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``. Loading needs ``recsys`` installed, in a version that
reads the package's format. The model is logged by :func:`recsys.tracking.models.log_model`.

The precision is chosen when loading, as for ``python -m pipelines.score``: ``model_config`` takes
``embedding_dtype`` (``fp32``, ``fp16``, ``int8``, ``int4``: fp32 tables are row-wise quantized on loading;
default the package's own) and ``compute_dtype`` (``fp32`` default, ``bf16``, ``auto``).

Example:
    >>> model = mlflow.pyfunc.load_model("models:/ecommerce-ranker@champion")  # doctest: +SKIP
    >>> model.predict(joined_rows_pandas)  # doctest: +SKIP
    >>> options = {"embedding_dtype": "int8", "compute_dtype": "auto"}
    >>> uri = "models:/ecommerce-ranker@champion"
    >>> cheap = mlflow.pyfunc.load_model(uri, model_config=options)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from recsys.package import DEFAULT_BATCH_SIZE, LoadedPackage, load_package, predict_frame
from recsys.tracking.models import LOAD_OPTIONS


class RankingPyfuncModel:
    """Scores raw rows with a model package (see :func:`recsys.package.predict_frame`).

    Args:
        package: the loaded package.
    """

    def __init__(self, package: LoadedPackage) -> None:
        self.package = package

    @property
    def python_model(self) -> RankingPyfuncModel:
        """This object: what ``PyFuncModel.unwrap_python_model()`` returns."""
        return self

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Scores raw rows: the passthrough columns and one ``p_<task>`` column per task.

        Args:
            model_input: raw rows; labelled rows are their own history.
            params: ``batch_size``, rows per model call.
        """
        batch_size = int((params or {}).get("batch_size", DEFAULT_BATCH_SIZE))
        return predict_frame(self.package, model_input, batch_size=batch_size).to_pandas()


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> RankingPyfuncModel:
    """MLflow's entry point: the package at ``data_path``, in the precision of ``model_config``.

    Raises:
        ValueError: a value that ``embedding_dtype`` or ``compute_dtype`` does not take (named).
    """
    options = {k: v for k, v in (model_config or {}).items() if k in LOAD_OPTIONS}
    return RankingPyfuncModel(load_package(data_path, **options))
