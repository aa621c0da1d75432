"""Pure math on tensors: streaming, mergeable accumulators and the estimators built on them.

Nothing here knows about ``nn.Module``s or hooks; every function is tested against a slow
full-batch reference.
"""

from .base import ACCUMULATORS, Accumulator, MergeError, load_states, save_states
from .cka import LinearCKA, MinibatchCKA, hsic, linear_cka, rbf_cka
from .covariance import Covariance, CovarianceResult
from .evenness import pielou
from .histogram import Histogram, HistogramResult
from .logreg import fit_logreg, fit_logreg_many
from .moments import Moments, MomentsResult
from .shapley import shapley_effects
from .sobol import SobolAccumulator, saltelli_sample, sobol_indices
from .topk import TopK, TopKResult
from .wilcoxon import fdr_bh, signed_rank

__all__ = [
    "ACCUMULATORS",
    "Accumulator",
    "Covariance",
    "CovarianceResult",
    "Histogram",
    "HistogramResult",
    "LinearCKA",
    "MergeError",
    "MinibatchCKA",
    "Moments",
    "MomentsResult",
    "SobolAccumulator",
    "TopK",
    "TopKResult",
    "fdr_bh",
    "fit_logreg",
    "fit_logreg_many",
    "hsic",
    "linear_cka",
    "load_states",
    "pielou",
    "rbf_cka",
    "saltelli_sample",
    "save_states",
    "shapley_effects",
    "signed_rank",
    "sobol_indices",
]
