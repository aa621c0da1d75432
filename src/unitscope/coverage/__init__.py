"""Coverage criteria as mergeable accumulators over activation tensors (no model needed).

``fit(acts)`` builds a criterion's profile where it needs one (ranges, clusters, training traces),
``update(acts)`` folds test activations in and returns the gain, ``value()`` reads the coverage,
``merge(other)`` and ``state_dict()`` make runs resumable and distributable. ``acts`` is a tensor
``(n, units)`` for one layer or a dict of them by layer name. :class:`unitscope.Coverage` runs them
as an analysis on a model; :func:`unitscope.idc` runs the importance-driven pipeline.
"""

from .base import Criterion
from .cluster import CC
from .idc import IDC
from .neuron import KMNC, NBC, NC, SNAC, TKNC, TKNP
from .surprise import DSC, LSC, MDSC

__all__ = ["CC", "DSC", "IDC", "KMNC", "LSC", "MDSC", "NBC", "NC", "SNAC", "TKNC", "TKNP", "Criterion"]
