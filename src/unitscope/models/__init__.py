"""Models by name: built-in small nets, torchvision classifiers, weight files; weights by layer."""

from .info import layer_info
from .registry import (
    INPUT_SHAPES,
    MODELS,
    WeightsError,
    default_input_shape,
    load_model,
    load_weights,
    model_fingerprint,
)
from .weights import WeightsView, set_weights, switch_weights, weights

__all__ = [
    "INPUT_SHAPES",
    "MODELS",
    "WeightsError",
    "WeightsView",
    "default_input_shape",
    "layer_info",
    "load_model",
    "load_weights",
    "model_fingerprint",
    "set_weights",
    "switch_weights",
    "weights",
]
