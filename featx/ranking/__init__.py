"""Rank (backbone, layer, weights) candidates for a dataset by transferability scores on cached features, before
fitting anything (``featx rank``). Torch-free at import: the scores are numpy/scipy; extraction is imported on use.

* :mod:`featx.ranking.scores`: LogME, the shrinkage H-score, leave-one-out k-NN (``SCORES``), on arrays;
* :mod:`featx.ranking.api`: :func:`rank` (candidates -> caches -> scores on the train rows -> records, ``--verify``).
"""

from __future__ import annotations

from featx.ranking.api import Candidate, RankResult, RankRow, rank, score_cache
from featx.ranking.scores import SCORES, GramStats, check_inputs, hscore_shrinkage, knn_loo, logme, logme_from_gram

__all__ = [
    "SCORES",
    "Candidate",
    "GramStats",
    "RankResult",
    "RankRow",
    "check_inputs",
    "hscore_shrinkage",
    "knn_loo",
    "logme",
    "logme_from_gram",
    "rank",
    "score_cache",
]
