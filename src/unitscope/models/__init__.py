"""Models by name: built-in small nets, torchvision classifiers, weight files; model fingerprints."""

from .registry import MODELS, WeightsError, load_model, load_weights, model_fingerprint

__all__ = ["MODELS", "WeightsError", "load_model", "load_weights", "model_fingerprint"]
