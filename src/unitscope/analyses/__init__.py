"""One module per analysis family, built on capture, the engine and stats."""

from .base import ANALYSES, Analysis, Batch, build_analysis
from .moments import Moments

__all__ = ["ANALYSES", "Analysis", "Batch", "Moments", "build_analysis"]
