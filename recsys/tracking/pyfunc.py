"""The MLflow pyfunc model of a model package, logged as "models from code".

MLflow copies this file into the logged model and runs it when the model is loaded, instead of unpickling a
Python object: :meth:`RankingPyfuncModel.load_context` rebuilds the model from the package folder (logged
as the artifact ``package``), whose weights load with ``torch.load(weights_only=True)``. The model is
logged by :func:`recsys.tracking.models.log_model`.

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

import mlflow
import pandas as pd

from recsys.package import DEFAULT_BATCH_SIZE, LoadedPackage, load_package, predict_frame
from recsys.tracking.models import LOAD_OPTIONS, PACKAGE_ARTIFACT


class RankingPyfuncModel(mlflow.pyfunc.PythonModel):
    """Scores raw rows with a model package (see :func:`recsys.package.predict_frame`)."""

    def __init__(self) -> None:
        self.package: LoadedPackage | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Loads the package logged as the artifact ``package``, in the precision of ``model_config``.

        A model logged before these options existed ignores them (MLflow warns) and loads in fp32.

        Raises:
            ValueError: a value that ``embedding_dtype`` or ``compute_dtype`` does not take (named).
        """
        options = {k: v for k, v in (context.model_config or {}).items() if k in LOAD_OPTIONS}
        self.package = load_package(context.artifacts[PACKAGE_ARTIFACT], **options)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Scores raw rows: the passthrough columns and one ``p_<task>`` column per task.

        Args:
            context: the model context (unused: the package was loaded by ``load_context``).
            model_input: raw rows; labelled rows are their own history.
            params: ``batch_size``, rows per model call.
        """
        if self.package is None:
            raise RuntimeError("predict: the model package is not loaded; load the model with mlflow.pyfunc")
        batch_size = int((params or {}).get("batch_size", DEFAULT_BATCH_SIZE))
        return predict_frame(self.package, model_input, batch_size=batch_size).to_pandas()


mlflow.models.set_model(RankingPyfuncModel())
