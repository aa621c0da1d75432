"""The IDC pipeline on a model: relevance over the training set, fit, then stream a test set.

:func:`idc` runs DeepImportance's procedure (spec coverage.md §3.1, §3.4) in batches:

1. one LRP backward per training batch (target = the label), reading the relevance of every
   selected layer from that one pass; only correctly classified inputs count (their label is
   the prediction). Conv relevance is summed over positions, then summed over inputs, overall
   and per class (the ranking of the mean is the same);
2. a plain forward over the correctly classified inputs for their activations (spatial mean per
   channel, as the coverage criteria use), from which :class:`~unitscope.coverage.idc.IDC`
   keeps the top-m units and clusters them;
3. a forward over the test set, folded into the IDC batch by batch.

Example:
    >>> import unitscope
    >>> from torch.utils.data import Subset
    >>> from unitscope.analyses.importance import idc
    >>> model = unitscope.load_model("digits-cnn")
    >>> train = Subset(unitscope.load_dataset("digits", "train"), range(200))
    >>> tables = idc(model, train, unitscope.load_dataset("digits", "test"), layers=["conv3"], m=2, k=2,
    ...              train_filter="all", per_class=False)
    >>> tables["idc"][["scope", "layer", "m", "combinations"]].values.tolist()
    [['layer', 'conv3', 2, 4]]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..attribution import lrp
from ..capture import Capture, resolve_layers
from ..coverage.idc import IDC
from ..models.modes import model_device, preserved
from ..units import UnitLayout

log = logging.getLogger(__name__)


class NoCorrectInputError(ValueError):
    """No training input is classified correctly, so there is nothing to rank units on."""


def _device(device: str | torch.device) -> torch.device:
    from ..engine import resolve_device

    return resolve_device(device)


def batches(data: Dataset, batch_size: int) -> DataLoader:
    """Unshuffled batches of ``(x, y, ...)`` items (the order is the dataset's)."""
    if len(data) == 0:
        raise ValueError("the dataset is empty")
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _xy(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise ValueError("IDC needs labelled data: items must be (x, y, ...)")
    return item[0], torch.as_tensor(item[1]).long()


@dataclass
class Relevance:
    """Unit relevance summed over the kept training inputs, overall and per class.

    Attributes:
        total: layer -> (units,) float64 sum.
        per_class: class -> layer -> (units,) sum over that class's kept inputs.
        kept: global indices of the kept (correctly classified) training inputs.
        seen: number of training inputs looked at.
    """

    total: dict[str, torch.Tensor]
    per_class: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    kept: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    seen: int = 0

    def mean(self) -> dict[str, torch.Tensor]:
        """Mean relevance per unit over the kept inputs."""
        return {k: v / max(len(self.kept), 1) for k, v in self.total.items()}


def unit_relevance(model: nn.Module, data: Dataset, layers: Sequence[str], train_filter: str = "correct",
                   batch_size: int = 128, device: str | torch.device = "cpu",
                   composite: Any = "epsilon_plus_flat", absolute: bool = False, **options: Any) -> Relevance:
    """Summed LRP relevance of every unit of ``layers`` over (the correctly classified) ``data``.

    One forward and one backward per batch gives the relevance of all layers at once. A conv
    unit's relevance is the sum of its map. ``train_filter="all"`` keeps every input (target:
    the label). ``absolute=True`` sums each input's absolute unit relevance (what IDC's
    ``importance="abs_sum"`` ranks on) instead of the signed relevance.

    Raises:
        NoCorrectInputError: no input is classified correctly (nothing to rank on).
    """
    if train_filter not in ("correct", "all"):
        raise ValueError(f"train_filter={train_filter!r}: use 'correct' or 'all'")
    dev = _device(device)
    home = model_device(model)
    model.to(dev)
    total: dict[str, torch.Tensor] = {}
    per_class: dict[int, dict[str, torch.Tensor]] = {}
    units = UnitLayout(model)
    axes: dict[str, tuple[int, int]] = {}  # (batch, units), decided in the forward
    modules = dict(model.named_modules())
    handles: list[Any] = []
    kept, seen, start = [], 0, 0
    try:
        for name in layers:
            def record(m: nn.Module, a: Any, o: Any, name: str = name) -> None:
                axes[name] = units.axes(name, o if torch.is_tensor(o) else o[0])
            handles.append(modules[name].register_forward_hook(record))
        handles.append(units.watch(list(layers)))
        for item in batches(data, batch_size):
            x, y = _xy(item)
            x, y = x.to(dev), y.to(dev)
            out, _, rel = lrp(model, x, y, layers, composite, **options)
            keep = out.argmax(1) == y if train_filter == "correct" else torch.ones_like(y, dtype=torch.bool)
            idx = torch.nonzero(keep).reshape(-1)
            kept.append(idx.cpu() + start)
            start += len(y)
            seen += len(y)
            if not len(idx):
                continue
            yk = y[idx].cpu()
            for layer, r in rel.items():
                r = r.movedim(axes.get(layer, (0, 1)), (0, 1))
                if r.shape[0] != len(y):
                    raise ValueError(f"layer {layer!r} gives {r.shape[0]} rows for {len(y)} inputs: its "
                                     "inputs are not on dim 0 (a layer inside a sequence-first model that "
                                     "does not say batch_first=False); pick the attention or transformer "
                                     "layer itself")
                r = r[idx].double()
                r = r.sum(tuple(range(2, r.dim()))) if r.dim() > 2 else r
                r = r.abs().cpu() if absolute else r.cpu()  # absolute: sums of |r| per input
                total[layer] = total.get(layer, 0) + r.sum(0)
                sums = torch.zeros(int(yk.max()) + 1, r.shape[1], dtype=torch.float64).index_add_(0, yk, r)
                for c in torch.unique(yk).tolist():
                    per = per_class.setdefault(int(c), {})
                    per[layer] = per.get(layer, 0) + sums[c]
    finally:
        model.to(home)
        for h in handles:
            h.remove()
    kept_idx = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)
    if not len(kept_idx):
        raise NoCorrectInputError(f"none of the {seen} training inputs is classified correctly, so no unit "
                                  "can be ranked: train the model first, or pass train_filter='all'")
    return Relevance(total, per_class, kept_idx, seen)


def activations(model: nn.Module, data: Dataset, layers: Sequence[str], batch_size: int = 256,
                device: str | torch.device = "cpu"
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Spatially averaged outputs of ``layers`` on ``data``: (acts by layer, labels, predictions)."""
    dev = _device(device)
    acts: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    labels, preds = [], []
    with preserved(model):  # every module's train/eval flag and the device come back
        model.to(dev).eval()
        with torch.inference_mode(), Capture(model, list(layers), {"mean": "mean"}) as cap:
            for item in batches(data, batch_size):
                x, y = _xy(item)
                out = model(x.to(dev))
                for k in layers:
                    acts[k].append(cap.outputs["mean"][k].float().cpu())
                labels.append(y.cpu())
                preds.append(out.argmax(1).cpu())
    return {k: torch.cat(v) for k, v in acts.items()}, torch.cat(labels), torch.cat(preds)


def fit_idc(model: nn.Module, train_data: Dataset, layers: Any, m: int = 2, k: int | None = None,
            k_range: Sequence[int] = (2, 4), per_class: bool = True, train_filter: str = "correct",
            batch_size: int = 128, device: str | torch.device = "cpu", composite: Any = "epsilon_plus_flat",
            **idc_options: Any) -> IDC:
    """An :class:`IDC` fitted on ``model`` and its training data (steps 1 and 2 of :func:`idc`)."""
    names = resolve_layers(model, layers)
    modules = dict(model.named_modules())
    for name in names:
        width = _width(modules[name])
        if width is not None and width < m:
            raise ValueError(f"layer {name!r} has {width} units, fewer than m={m}: choose m <= {width} "
                             "or another layer")
    absolute = idc_options.get("importance") == "abs_sum"  # sum |r| over inputs, not |sum r|
    rel = unit_relevance(model, train_data, names, train_filter, batch_size, device, composite,
                         absolute=absolute)
    acts, _, _ = activations(model, Subset(train_data, rel.kept.tolist()), names, batch_size, device)
    idc = IDC(m=m, k=k, k_range=tuple(k_range), **idc_options)
    idc.fit(acts, relevance=rel.total, class_relevance=rel.per_class if per_class else None)
    return idc


def _width(module: nn.Module) -> int | None:
    for attr in ("out_channels", "out_features", "num_features"):
        if isinstance(getattr(module, attr, None), int):
            return int(getattr(module, attr))
    return None


def measure(idc: IDC, model: nn.Module, data: Dataset, batch_size: int = 256,
            device: str | torch.device = "cpu") -> IDC:
    """A copy of the fitted ``idc`` updated with every input of ``data`` (classes: the labels)."""
    acts, labels, _ = activations(model, data, idc.layers, batch_size, device)
    out = idc.clone()
    has_classes = any(g["class"] >= 0 for g in out.groups)
    out.update(acts, labels if has_classes else None)
    return out


def idc(model: nn.Module, train_data: Dataset, test_data: Dataset, layers: Any, m: int = 2,
        k: int | None = None, k_range: Sequence[int] = (2, 4), per_class: bool = True,
        train_filter: str = "correct", batch_size: int = 128, device: str | torch.device = "cpu",
        composite: Any = "epsilon_plus_flat", **idc_options: Any) -> dict[str, pd.DataFrame]:
    """Importance-driven coverage of ``test_data``; returns the tables ``idc`` and ``idc_units``.

    Args:
        model: a trained classifier.
        train_data, test_data: labelled datasets (items ``(x, y, ...)``).
        layers: the subject layers (names, globs or types); their output units are ranked.
        m: important units kept per layer (and end to end, and per class).
        k: clusters per unit, or None for the silhouette choice over ``k_range``.
        per_class: also rank units per class and measure each class's test inputs.
        train_filter: ``"correct"`` (DeepImportance) or ``"all"`` training inputs.
        composite: the LRP rule set (see :func:`unitscope.attribution.attribute`).
        **idc_options: further :class:`IDC` options (``cross_layer_norm``, ``importance``,
            ``round_centroids``, ``seed``...).

    Returns:
        ``idc``: one row per group (scope ``layer`` or ``end2end``, layer, class -1 for all):
        m, combinations, covered, coverage, max_achievable, inputs. ``idc_units``: the kept
        units of every group with rank, importance, clusters, silhouette and centroids.
    """
    fitted = fit_idc(model, train_data, layers, m, k, k_range, per_class, train_filter, batch_size, device,
                     composite, **idc_options)
    tested = measure(fitted, model, test_data, batch_size, device)
    return tables(tested)


def tables(idc: IDC) -> dict[str, pd.DataFrame]:
    """The ``idc`` and ``idc_units`` tables of a fitted (and updated) IDC."""
    return {"idc": pd.DataFrame(idc.results()), "idc_units": pd.DataFrame(idc.important_units())}


def plot_important_units(units: pd.DataFrame, ax: Any = None) -> Any:
    """The important units of every layer and class (from ``idc_units``); returns the figure.

    One panel per layer: rows are "all" and each class, columns the layer's units; a kept unit
    is coloured by its rank (darker = more important).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    rows = units[units["scope"] == "layer"]
    layers = list(dict.fromkeys(rows["layer"]))
    classes = sorted(set(rows["class"]))
    if ax is None:
        fig, axes = plt.subplots(len(layers), 1, figsize=(8, 0.35 * len(classes) * len(layers) + 1.2),
                                 squeeze=False, layout="constrained")
        axes = axes[:, 0]
    else:
        axes = np.atleast_1d(ax)
        fig = axes[0].figure
    m = int(rows["rank"].max()) + 1 if len(rows) else 1
    for axis, layer in zip(axes, layers):
        part = rows[rows["layer"] == layer]
        width = int(part["unit"].max()) + 1
        grid = np.full((len(classes), width), np.nan)
        for r in part.itertuples():
            grid[classes.index(r[3]), r.unit] = m - r.rank
        axis.imshow(grid, aspect="auto", cmap="viridis_r", vmin=0, vmax=m, interpolation="nearest")
        axis.set_yticks(range(len(classes)), ["all" if c < 0 else str(c) for c in classes], fontsize=7)
        axis.set_ylabel(layer, rotation=0, ha="right", va="center")
    axes[-1].set_xlabel("unit")
    fig.suptitle(f"important units (top {m}) per layer and class")
    return fig


def plot_idc(table: pd.DataFrame, ax: Any = None) -> Any:
    """IDC per layer and end to end (all classes), beside the per-class values; returns the figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 3), layout="constrained")
    names = [r.layer or "end to end" for r in table[table["class"] < 0].itertuples()]
    groups = [(r.scope, r.layer) for r in table[table["class"] < 0].itertuples()]
    for i, (scope, layer) in enumerate(groups):
        part = table[(table["scope"] == scope) & (table["layer"] == layer)]
        every = part[part["class"] < 0]["coverage"]
        ax.bar(i, float(every.iloc[0]), color="tab:blue", alpha=0.6, label="all classes" if i == 0 else None)
        per = part[part["class"] >= 0]["coverage"]
        ax.plot([i] * len(per), per, "k.", ms=4, label="per class" if i == 0 and len(per) else None)
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("IDC")
    ax.legend(fontsize=8)
    return fig
