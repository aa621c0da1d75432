"""Similarity and visualisation: CKA between layers and models, feature visualisation.

Registers the ``unitscope run`` experiment types ``cka`` and ``visualize``, the report sections
``cka`` (heatmaps of every ``cka`` / ``cka_*`` table) and ``visualize`` (the image grid and the
objective traces), and the demo part: CKA between two trainings of ``digits-cnn`` that differ
only in their seed, and feature visualisations of ``shapes-cnn`` channels and classes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..analyses import cka as _cka_analysis  # noqa: F401  (registers the analysis and its accumulators)
from ..demo import RECIPES, DemoContext
from ..experiments import EXPERIMENTS, KEYS, LIST_KEYS, ConfigError
from ..report import SECTIONS, TABLE_SECTIONS
from ..results import Run

log = logging.getLogger(__name__)

KEYS["cka"] = {"split": "test", "layers": None, "other_model": None, "other_weights": None,
               "other_layers": None, "kernel": "linear", "estimator": "biased", "reduce": None,
               "sigma": None, "median_fraction": 1.0, "batch_size": 256}
KEYS["visualize"] = {"targets": None, "size": None, "steps": 512, "param": "fft", "decorrelate": True,
                     "transforms": "standard", "objective": "channel", "lr": 0.05, "preprocess": "auto"}
LIST_KEYS.update({"other_layers", "targets", "steps"})


@EXPERIMENTS.register("cka")
def _cka(config: dict[str, Any], target: Path, progress: bool) -> None:
    """CKA between the layers of ``model`` or between ``model`` and ``other_model`` / ``other_weights``."""
    from ..analyses.cka import CKA
    from ..data import load_dataset
    from ..engine import analyze
    from ..models import load_model

    model = load_model(config["model"], weights=config.get("weights"))
    other = None
    if config.get("other_model") is not None or config.get("other_weights") is not None:
        other = load_model(config.get("other_model") or config["model"], weights=config.get("other_weights"))
    data = load_dataset(config["dataset"], split=config["split"], **config.get("dataset_options", {}))
    analysis = CKA(other=other, kernel=config["kernel"], estimator=config["estimator"],
                   other_layers=config.get("other_layers"), reduce=config.get("reduce"),
                   sigma=config.get("sigma"), median_fraction=config["median_fraction"])
    analyze(model, data, layers=config.get("layers"), analyses=[analysis], batch_size=config["batch_size"],
            device=config["device"], num_workers=config["num_workers"], seed=config["seed"],
            progress=progress, out=target, config=config)


@EXPERIMENTS.register("visualize")
def _visualize(config: dict[str, Any], target: Path, progress: bool) -> None:
    """Feature visualisations of ``targets`` (``"layer:channel"``); images and traces in the run's arrays."""
    from ..models import load_model
    from ..visualize import visualize

    targets = config.get("targets")
    if not targets or not all(isinstance(t, str) for t in targets):
        raise ConfigError('targets is required: a list of "layer:channel" strings, e.g. '
                          'targets = ["conv3:0"]')
    model = load_model(config["model"], weights=config.get("weights"))
    t0 = time.perf_counter()
    vis = visualize(model, targets, size=config.get("size"), steps=config["steps"], param=config["param"],
                    decorrelate=config["decorrelate"], transforms=config["transforms"],
                    objective=config["objective"], lr=config["lr"], seed=config["seed"],
                    device=config["device"], progress=progress, preprocess=config["preprocess"])
    manifest = _manifest(config, time.perf_counter() - t0)
    Run([], manifest, tables={"visualize": visualization_table(vis)},
        arrays={"visualize": visualization_arrays(vis)}).save(target)


def visualization_table(vis: Any) -> pd.DataFrame:
    """One row per target: ``target``, ``layer``, ``channel``, objective at the first and last step."""
    labels = [str(t) for t in vis.targets]
    return pd.DataFrame({
        "target": labels, "layer": [t.rpartition(":")[0] for t in labels],
        "channel": [int(t.rpartition(":")[2]) if t.rpartition(":")[2].isdigit() else -1 for t in labels],
        "objective_first": vis.trace[0].numpy().astype(float),
        "objective_last": vis.trace[-1].numpy().astype(float), "steps": len(vis.trace)})


def visualization_arrays(vis: Any) -> dict[str, torch.Tensor]:
    """``images`` (targets, C, H, W), ``trace`` (steps, targets) and one ``step_N`` per threshold."""
    out = {"images": vis.images.float().clone(), "trace": vis.trace.float()}  # no shared storage
    out.update({f"step_{k}": v.float() for k, v in vis.snapshots.items()})
    return out


def _manifest(config: dict[str, Any], seconds: float) -> dict[str, Any]:
    import platform

    from .. import __version__

    return {"status": "complete", "kind": config["experiment"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {"unitscope": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "timings": {"pass_s": seconds}, "config": config}


# ------------------------------------------------------------------------------- report
def _cka_figures(run: Run) -> list[Any]:
    from ..analyses.cka import plot_cka

    names = [n for n in run.tables if n == "cka" or n.startswith("cka_")]
    figures = []
    for name in names:
        table = run.tables[name]
        if {"layer_x", "layer_y", "cka"} <= set(table.columns) and len(table):
            figures.append(plot_cka(table, title=table.attrs.get("title") or name))
    return figures


def _visualize_figures(run: Run) -> list[Any]:
    from ..visualize import plot_visualizations

    arrays = run.arrays.get("visualize", {})
    if "images" not in arrays:
        return []
    labels = list(run.tables["visualize"]["target"]) if "visualize" in run.tables else None
    figures = [plot_visualizations(arrays["images"], labels)]
    if "trace" in arrays:
        figures.append(plot_traces(arrays["trace"], labels))
    return figures


def plot_traces(trace: torch.Tensor, labels: list[str] | None = None, ax: Any = None) -> Any:
    """The objective of every target over the optimisation steps; returns the figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 3), layout="constrained")
    labels = labels or [str(i) for i in range(trace.shape[1])]
    steps = torch.arange(1, trace.shape[0] + 1)
    for j, label in enumerate(labels):
        ax.plot(steps, trace[:, j], lw=1, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("objective")
    if len(labels) <= 12:
        ax.legend(fontsize=7, ncol=2)
    return fig


SECTIONS["cka"] = _cka_figures
SECTIONS["visualize"] = _visualize_figures
TABLE_SECTIONS.extend(s for s in ("cka", "visualize") if s not in TABLE_SECTIONS)


# ------------------------------------------------------------------------------- demo
def demo(ctx: DemoContext) -> None:
    """digits-cnn: CKA with a second training (another seed); shapes-cnn: feature visualisations."""
    if ctx.name == "digits-cnn":
        _demo_cka(ctx)
    elif ctx.name == "shapes-cnn":
        _demo_visualize(ctx)


def _demo_cka(ctx: DemoContext) -> None:
    from .. import analyze, load_model
    from ..analyses.cka import CKA
    from ..train import train

    torch.manual_seed(ctx.seed + 1)
    second = load_model(ctx.name)
    recipe = RECIPES[ctx.name][2 if ctx.quick else 1]  # the main model's recipe, another seed
    t0 = time.perf_counter()
    history = train(second, ctx.train_data, ctx.test_data, seed=ctx.seed + 1, device="cpu",
                    progress=ctx.progress, **recipe)
    log.info("%s: second training (seed %d) for CKA: test accuracy %.3f (%.1f s)", ctx.name, ctx.seed + 1,
             history[-1]["test_acc"], time.perf_counter() - t0)
    layers = ["relu1", "relu2", "relu3", "fc"]
    between = CKA(other=second, estimator="unbiased")
    within = CKA(kernel="linear", estimator="biased", reduce="pool:2")
    run = analyze(ctx.model, ctx.test_data, layers=layers, analyses=[between], batch_size=60,
                  progress=False, seed=ctx.seed, device="cpu")
    table = run.table("cka")
    table.attrs["title"] = f"CKA (minibatch, unbiased): seed {ctx.seed} vs seed {ctx.seed + 1}"
    ctx.run.tables["cka"] = table
    ctx.run.arrays["cka"] = run.arrays["cka"]
    run = analyze(ctx.model, ctx.test_data, layers=layers, analyses=[within], progress=False,
                  seed=ctx.seed, device="cpu")
    table = run.table("cka")
    table.attrs["title"] = f"CKA (exact, pool:2 features) between the layers of {ctx.name}"
    ctx.run.tables["cka_within"] = table
    ctx.run.arrays["cka_within"] = run.arrays["cka"]


def _demo_visualize(ctx: DemoContext) -> None:
    from ..visualize import visualize

    channels = ctx.model.conv4.out_channels if hasattr(ctx.model, "conv4") else 4
    targets = [f"conv4:{c}" for c in range(0, channels, max(1, channels // 4))][:4]
    targets += [f"fc:{c}" for c in range(getattr(ctx.model, "num_classes", 4))][:4]
    vis = visualize(ctx.model, targets, steps=48 if ctx.quick else 160, seed=ctx.seed, device="cpu",
                    progress=ctx.progress)
    ctx.run.tables["visualize"] = visualization_table(vis)
    ctx.run.arrays["visualize"] = visualization_arrays(vis)
