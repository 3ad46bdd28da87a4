"""Batch scoring: a registered model and a Parquet table of candidates in, scored and ranked Parquet out.

Lossless and resumable: partitions are planned up front, written atomically and recorded in a manifest.
:func:`run_scoring` (:mod:`recsys.scoring.job`) is the recipe; the modules beside it are its parts.
"""

from recsys.scoring.config import PRODUCT, ScoreConfig, ScoreResult, ScoreSettings
from recsys.scoring.job import check_paths, run_scoring
from recsys.scoring.ranking import ScoreFormula, top_of_request

__all__ = [
    "PRODUCT",
    "ScoreConfig",
    "ScoreFormula",
    "ScoreResult",
    "ScoreSettings",
    "check_paths",
    "run_scoring",
    "top_of_request",
]
