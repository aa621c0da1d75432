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

from . import coverage
from .analyses import ANALYSES, Analysis, Batch, Moments, Saturation, SaturationTracker, projected_accuracy
from .analyses.cka import CKA, cka_between
from .analyses.coverage import Coverage
from .analyses.evaluation import evaluate_classifier
from .analyses.flops import flops, flops_total
from .analyses.importance import idc
from .analyses.mosaics import unit_mosaics
from .analyses.occlusion import empirical_receptive_fields, occlusion_maps
from .analyses.probes import probes
from .analyses.receptive_fields import receptive_fields, unproductive_layers
from .analyses.sensitivity import Sensitivity, sensitivity
from .analyses.topk import TopK
from .attribution import attribute
from .capture import Capture, CaptureError, LayerError, StopForward, capture, layer_names, resolve_layers
from .data import ArrayDataset, load_dataset
from .engine import EmptyDatasetError, InputError, analyze
from .features import extract_features
from .models import WeightsError, layer_info, load_model, set_weights, switch_weights, weights
from .report import write_report as report
from .results import Run, RunError, load_run
from .visualize import visualize

__all__ = [
    "ANALYSES",
    "CKA",
    "Analysis",
    "ArrayDataset",
    "Batch",
    "Capture",
    "CaptureError",
    "Coverage",
    "EmptyDatasetError",
    "InputError",
    "LayerError",
    "Moments",
    "Run",
    "RunError",
    "Saturation",
    "SaturationTracker",
    "Sensitivity",
    "StopForward",
    "TopK",
    "WeightsError",
    "__version__",
    "analyze",
    "attribute",
    "capture",
    "cka_between",
    "coverage",
    "empirical_receptive_fields",
    "evaluate_classifier",
    "extract_features",
    "flops",
    "flops_total",
    "idc",
    "layer_info",
    "layer_names",
    "load_dataset",
    "load_model",
    "load_run",
    "occlusion_maps",
    "probes",
    "projected_accuracy",
    "receptive_fields",
    "report",
    "resolve_layers",
    "sensitivity",
    "set_weights",
    "switch_weights",
    "unit_mosaics",
    "unproductive_layers",
    "visualize",
    "weights",
]
