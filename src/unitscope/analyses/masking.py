"""Guided masking: silence the units most sensitive to a variable and watch the predictions change.

For a variable ``v`` and a layer, the ``fraction`` of the layer's units with the largest index to
``v`` (``ST`` by default, from a :func:`unitscope.analyses.sensitivity.sensitivity` table) are
scaled by ``alpha`` (0: silenced) with a forward hook, and the model's predictions on ``samples``
images are compared with those of the intact model: accuracy, and agreement of the top-1 class.
The same number of units drawn at random (``random_repeats`` draws) is the baseline: masking
sensitive units matters only if it does more than masking as many random ones (spec A.9, D.3).
Layers are masked together (``"all"``) and, with ``per_layer=True``, one at a time as well.

:func:`single_class` is the single-class view (spec A.9.5): the classes whose output is most
sensitive to ``v``, and how often the model predicts them (Jaccard index with its top-n).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..capture import LayerError, resolve_layers
from ..models.modes import restores_model
from ..units import UnitLayout

COLUMNS = ["inputs", "variable", "layer", "selection", "units_masked", "accuracy", "agreement",
           "accuracy_intact"]


@contextlib.contextmanager
def masked(model: nn.Module, masks: dict[str, torch.Tensor | Sequence[int]]) -> Iterator[None]:
    """Multiply the units of each named layer's output by ``masks[layer]``.

    Units are channels (dim 1), or the last axis where the layer keeps them there (a ``Linear``
    on tokens, see :class:`unitscope.units.UnitLayout`).

    A mask is a ``(C,)`` tensor of channel factors, or a list of channel indices to zero (the
    others keep their value). The hooks are removed on exit, also after an exception; the
    weights are never touched.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> with masked(net, {"0": torch.tensor([1.0, 0.0, 1.0])}):
        ...     out = net(torch.ones(1, 2))
        >>> out[0, 1].item() == 0
        True
        >>> with masked(net, {"0": [0, 2]}):
        ...     out = net(torch.ones(1, 2))
        >>> out[0, 0].item() == out[0, 2].item() == 0
        True
    """
    modules = dict(model.named_modules())
    unknown = [name for name in masks if name not in modules]
    if unknown:
        resolve_layers(model, unknown)  # raises LayerError with the close names
        raise LayerError(f"masked() takes exact layer names, got the pattern(s) {unknown}")
    units = UnitLayout(model)
    handles = []

    def hook_for(name: str, m: torch.Tensor | Sequence[int]) -> Any:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            axis = units.axis(name, out)
            count = out.shape[axis]
            if isinstance(m, torch.Tensor):
                if m.numel() != count:
                    raise ValueError(f"the mask of layer {name!r} has {m.numel()} factors for its "
                                     f"{count} units")
                factors = m.to(out.device, out.dtype)
            else:
                bad = [int(i) for i in m if not 0 <= int(i) < count]
                if bad:
                    raise ValueError(f"units {bad} of layer {name!r} are out of range: it has {count} units "
                                     f"(0..{count - 1})")
                factors = torch.ones(count, device=out.device, dtype=out.dtype)
                factors[list(m)] = 0
            shape = [1] * out.dim()
            shape[axis] = -1
            return out * factors.view(shape)
        return hook
    try:
        handles.append(units.watch(list(masks)))
        for name, m in masks.items():
            handles.append(modules[name].register_forward_hook(hook_for(name, m)))
        yield
    finally:
        for h in handles:
            h.remove()


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def _inputs(data: Any, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(samples, len(data))
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    items = [data[int(i)] for i in idx]
    return torch.stack([it[0] for it in items]), torch.as_tensor([int(it[1]) for it in items])


def guided_masking(model: nn.Module, data: Any, table: pd.DataFrame, fraction: float = 0.1,
                   index: str = "ST", variables: Sequence[str] | None = None,
                   layers: Sequence[str] | None = None, alpha: float = 0.0, samples: int = 512,
                   random_repeats: int = 3, per_layer: bool = False, seed: int = 0, batch_size: int = 256,
                   device: str | torch.device = "cpu", augment: Sequence[Any] | None = None) -> pd.DataFrame:
    """Change of predictions when the units most sensitive to each variable are masked.

    Args:
        model: the classifier the sensitivity table was computed for.
        data: labelled images (``(x, y, ...)`` items).
        table: a ``sensitivity`` table (layer, unit, variable, S1, ST, ..., constant).
        fraction: share of each layer's units to mask (at least one).
        index: ``"ST"`` or ``"S1"``: which index ranks the units.
        variables, layers: restrict to these (default: all in the table; layers whose outputs are
            the logits are left out, so masking never removes a class outright).
        alpha: the factor applied to masked units (0 silences, 0.5 damps, 1.5 amplifies).
        samples: images evaluated (a seeded random subset).
        random_repeats: random masks of the same size, the baseline (rows ``selection="random"``).
        per_layer: also mask each layer on its own (rows with that layer's name).
        seed: seeds the image subset and the random masks.
        batch_size, device: for the forwards (the model is moved to ``device`` and put in eval mode).
        augment: augmentation variables (as for :class:`unitscope.augment.Augmenter`); each is
            also applied alone to the images (one random draw per image, on/off ones switched on)
            and every masking is evaluated on those inputs too (spec A.9: masked predictions on
            augmented inputs). ``accuracy_intact`` and ``agreement`` then refer to the intact
            model on the same augmented images.

    Returns:
        One row per (inputs, variable, layer or ``"all"``, selection): ``inputs`` is
        ``"original"`` or the augmentation applied; ``units_masked``, ``accuracy``, ``agreement``
        (top-1 equal to the intact model's), ``accuracy_intact``. Random rows are averaged over
        the repeats and carry ``variable="random"``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must lie in (0, 1]")
    if index not in ("S1", "ST"):
        raise ValueError(f"index={index!r}: use 'S1' or 'ST'")
    from ..engine import resolve_device

    dev = resolve_device(device)
    x, y = _inputs(data, samples, seed)
    model = model.eval().to(dev)
    x, y = x.to(dev), y.to(dev)
    out_layers = output_layers(model, x[:1])
    layers = [la for la in (layers or list(dict.fromkeys(table["layer"]))) if la not in out_layers]
    if not layers:
        raise ValueError("no layer left to mask: the table holds only the output layer; run sensitivity "
                         "on hidden layers")
    variables = list(variables or dict.fromkeys(table["variable"]))
    live = table[~table["constant"].astype(bool)]
    sizes = {la: int(table[table["layer"] == la]["unit"].nunique()) for la in layers}
    counts = {la: max(1, round(fraction * sizes[la])) for la in layers}
    groups = [("all", layers)] + ([(la, [la]) for la in layers] if per_layer else [])
    rows: list[tuple[Any, ...]] = []
    inputs = [("original", x)]
    if augment:
        from ..augment import Augmenter

        draw = torch.Generator().manual_seed(seed + 1)
        for var in Augmenter(augment, channels=x.shape[1]).variables:
            aug = Augmenter([(var.name, {p.name: (p.low, p.high) for p in var.params})])
            u = torch.zeros(len(x), aug.d) if var.switch else torch.rand(len(x), aug.d, generator=draw)
            inputs.append((var.name, aug(x, u)))
    for name, xin in inputs:
        rows += _masking_rows(model, xin, y, name, live, variables, groups, sizes, counts, index, alpha,
                              random_repeats, seed, batch_size)
    return pd.DataFrame(rows, columns=COLUMNS)


def _masking_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, inputs: str, live: pd.DataFrame,
                  variables: list[str], groups: list[tuple[str, list[str]]], sizes: dict[str, int],
                  counts: dict[str, int], index: str, alpha: float, random_repeats: int, seed: int,
                  batch_size: int) -> list[tuple[Any, ...]]:
    """The rows of :func:`guided_masking` for one set of input images."""
    intact = _predict(model, x, batch_size).argmax(1)
    acc0 = float((intact == y).float().mean())
    gen = torch.Generator().manual_seed(seed)
    rows = []

    def evaluate(masks: dict[str, torch.Tensor]) -> tuple[float, float]:
        with masked(model, masks):
            pred = _predict(model, x, batch_size).argmax(1)
        return float((pred == y).float().mean()), float((pred == intact).float().mean())

    for group, members in groups:
        n_masked = sum(counts[la] for la in members)
        for var in variables:
            masks = {}
            for la in members:
                ranked = live[(live["layer"] == la) & (live["variable"] == var)].sort_values(
                    [index, "unit"], ascending=[False, True])["unit"].to_numpy(copy=True)[:counts[la]]
                m = torch.ones(sizes[la])
                m[torch.as_tensor(ranked, dtype=torch.long)] = alpha
                masks[la] = m
            acc, agree = evaluate(masks)
            rows.append((inputs, var, group, "sensitive", n_masked, acc, agree, acc0))
        accs, agrees = [], []
        for _ in range(random_repeats):
            masks = {}
            for la in members:
                m = torch.ones(sizes[la])
                m[torch.randperm(sizes[la], generator=gen)[:counts[la]]] = alpha
                masks[la] = m
            acc, agree = evaluate(masks)
            accs.append(acc)
            agrees.append(agree)
        if random_repeats:
            rows.append((inputs, "random", group, "random", n_masked, float(np.mean(accs)),
                         float(np.mean(agrees)), acc0))
    return rows


def output_layers(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Names of the leaf modules whose output is the model's output for input ``x`` (the classifier)."""
    from ..capture import capture

    names = [n for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    with capture(model, names, reduce="none", calls="last") as acts, torch.inference_mode():
        out = model(x)
    return {n for n, a in acts.items() if isinstance(out, torch.Tensor) and a.shape == out.shape
            and torch.equal(a, out)}


@restores_model
def single_class(model: nn.Module, data: Any, table: pd.DataFrame, layer: str, top: int = 1,
                 index: str = "ST", samples: int = 512, seed: int = 0, batch_size: int = 256,
                 device: str | torch.device = "cpu") -> pd.DataFrame:
    """The classes most sensitive to each variable, and how often the model predicts them.

    At the classifier ``layer`` (one unit per class), the ``top`` classes with the largest
    ``index`` to a variable are its "sensitive classes"; the Jaccard index between that set and
    each image's ``top`` predicted classes, averaged over images, says how strongly the model's
    predictions lean towards them (spec A.9.5).
    """
    rows = table[(table["layer"] == layer) & ~table["constant"].astype(bool)]
    if rows.empty:
        raise ValueError(f"the table has no units of layer {layer!r}; run sensitivity with it")
    from ..engine import resolve_device

    dev = resolve_device(device)
    x, _ = _inputs(data, samples, seed)
    logits = _predict(model.eval().to(dev), x.to(dev), batch_size)
    pred = logits.topk(min(top, logits.shape[1]), dim=1).indices.cpu().numpy()
    out = []
    for var, frame in rows.groupby("variable", sort=False):
        classes = frame.sort_values([index, "unit"], ascending=[False, True])["unit"].to_numpy()[:top]
        sens = set(classes.tolist())
        jac = [len(sens & set(p.tolist())) / len(sens | set(p.tolist())) for p in pred]
        out.append((var, ",".join(map(str, sorted(sens))), float(np.mean(jac)),
                    float(frame[index].max()) if len(frame) else math.nan))
    return pd.DataFrame(out, columns=["variable", "classes", "jaccard", f"max_{index}"])


def plot_masking(table: pd.DataFrame, ax: Any = None) -> Any:
    """Agreement with the intact model when each variable's sensitive units (or random ones) are masked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = table[(table["layer"] == "all") & (table["inputs"] == "original")]
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3), layout="constrained")
    colors = ["tab:gray" if s == "random" else "tab:blue" for s in rows["selection"]]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, rows["agreement"], 0.4, color=colors, label="agreement with intact")
    ax.bar(x + 0.2, rows["accuracy"], 0.4, color=colors, alpha=0.5, label="accuracy")
    ax.axhline(rows["accuracy_intact"].iloc[0], color="k", lw=0.8, ls="--", label="intact accuracy")
    ax.set_xticks(x, rows["variable"], rotation=45)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"masking {int(rows['units_masked'].iloc[0])} units over all layers")
    ax.legend(fontsize=7)
    return fig
