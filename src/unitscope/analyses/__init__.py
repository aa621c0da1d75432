"""One module per analysis family, built on capture, the engine and stats."""

from .base import ANALYSES, Analysis, Batch, build_analysis
from .moments import Moments
from .saturation import Saturation, SaturationTracker, projected_accuracy

__all__ = [
    "ANALYSES",
    "Analysis",
    "Batch",
    "Moments",
    "Saturation",
    "SaturationTracker",
    "build_analysis",
    "projected_accuracy",
]
