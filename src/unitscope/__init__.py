"""unitscope: what the units and layers of a trained PyTorch network do.

One streaming pass over a dataset feeds mergeable accumulators for every requested analysis::

    import unitscope as us
    model = us.load_model("digits-cnn")
    data = us.load_dataset("digits", split="test")
    run = us.analyze(model, data, layers="relu*", analyses=[us.Moments()])
    run.table("moments")
    run.save("runs/demo")
"""

__version__ = "0.1.0"

from .analyses import ANALYSES, Analysis, Batch, Moments, Saturation, SaturationTracker, projected_accuracy
from .analyses.flops import flops, flops_total
from .analyses.probes import probes
from .analyses.receptive_fields import receptive_fields, unproductive_layers
from .capture import Capture, CaptureError, LayerError, StopForward, capture, layer_names, resolve_layers
from .data import ArrayDataset, load_dataset
from .engine import EmptyDatasetError, InputError, analyze
from .features import extract_features
from .models import WeightsError, layer_info, load_model, set_weights, switch_weights, weights
from .results import Run, RunError, load_run

__all__ = [
    "ANALYSES",
    "Analysis",
    "ArrayDataset",
    "Batch",
    "Capture",
    "CaptureError",
    "EmptyDatasetError",
    "InputError",
    "LayerError",
    "Moments",
    "Run",
    "RunError",
    "Saturation",
    "SaturationTracker",
    "StopForward",
    "WeightsError",
    "__version__",
    "analyze",
    "capture",
    "extract_features",
    "flops",
    "flops_total",
    "layer_info",
    "layer_names",
    "load_dataset",
    "load_model",
    "load_run",
    "probes",
    "projected_accuracy",
    "receptive_fields",
    "resolve_layers",
    "set_weights",
    "switch_weights",
    "unproductive_layers",
    "weights",
]
