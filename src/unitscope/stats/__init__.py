"""Pure math on tensors: streaming, mergeable accumulators and the estimators built on them.

Nothing here knows about ``nn.Module``s or hooks; every function is tested against a slow
full-batch reference.
"""

from .base import ACCUMULATORS, Accumulator, MergeError, load_states, save_states
from .covariance import Covariance, CovarianceResult
from .histogram import Histogram, HistogramResult
from .moments import Moments, MomentsResult
from .topk import TopK, TopKResult

__all__ = [
    "ACCUMULATORS",
    "Accumulator",
    "Covariance",
    "CovarianceResult",
    "Histogram",
    "HistogramResult",
    "MergeError",
    "Moments",
    "MomentsResult",
    "TopK",
    "TopKResult",
    "load_states",
    "save_states",
]
