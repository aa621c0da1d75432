"""Attributions: how much each input pixel, or each unit of a layer, contributed to a class score.

``attribute(model, inputs, target, method=...)`` delegates the math to the standard libraries:

* ``"lrp"``: layer-wise relevance propagation through zennit (Bach et al. 2015; Montavon et al.
  2019). The default rule set is zennit's ``EpsilonPlusFlat`` (flat rule on the first layer, z+
  on the other convolutions, epsilon on the linear layers), with batch norm merged into the
  preceding layer (``SequentialMergeBatchNorm``). The relevance that starts the backward pass is
  the target logit (zero elsewhere), as in DeepImportance, so on a bias-free ReLU network the
  epsilon rule gives gradient × input.
* ``"saliency"`` (the signed gradient), ``"integrated_gradients"``, ``"deeplift"`` and
  ``"gradient_shap"`` through captum.

``layer=`` gives the relevance of that layer's output (its units: channels of a conv layer keep
their spatial map) instead of the input's; a list of layers gives a dict, from one backward pass
for LRP. The model is left as it was: every hook is removed in a ``finally``, the canonizers
restore the parameters, and modules switched to eval mode or out of in-place mode for the call
are switched back.

Example:
    >>> import torch, unitscope
    >>> from unitscope.attribution import attribute
    >>> model = unitscope.load_model("digits-cnn").eval()
    >>> x = torch.rand(2, 1, 8, 8)
    >>> tuple(attribute(model, x, target=3).shape), tuple(attribute(model, x, 3, layer="conv3").shape)
    ((2, 1, 8, 8), (2, 64, 4, 4))
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .capture import resolve_layers
from .models.info import check_input_shape, forward_checked

METHODS = ("lrp", "integrated_gradients", "saliency", "deeplift", "gradient_shap")

#: rule sets selectable by name: zennit's registered composites plus two plain ones
RULE_SETS = ("epsilon_plus_flat", "epsilon_plus", "epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat",
             "epsilon_gamma_box", "epsilon", "zero")


class AttributionError(ValueError):
    """An attribution request that cannot be computed (bad target, method or layer)."""


def make_composite(name: str = "epsilon_plus_flat", canonizers: Sequence[Any] | None = None,
                   **options: Any) -> Any:
    """A fresh zennit composite for a rule set name.

    Args:
        name: one of :data:`RULE_SETS`. ``"epsilon"`` applies the epsilon rule to every
            convolution and linear layer; ``"zero"`` is LRP-0 (epsilon rule with epsilon 1e-12).
            The others are zennit's composites of the same name (``epsilon_gamma_box`` needs
            ``low`` and ``high``).
        canonizers: zennit canonizers; None means batch norm merged into the layer before it
            (``SequentialMergeBatchNorm``), ``[]`` none. ResNets want zennit's ``ResNetCanonizer``.
        **options: passed to the composite (``epsilon=``, ``stabilizer=``, ``gamma=``...).
    """
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import COMPOSITES, LayerMapComposite, layer_map_base
    from zennit.rules import Epsilon
    from zennit.types import Convolution, Linear

    canon = [SequentialMergeBatchNorm()] if canonizers is None else list(canonizers)
    if name in ("epsilon", "zero"):
        eps = options.pop("epsilon", 1e-12 if name == "zero" else 1e-6)
        stabilizer = options.pop("stabilizer", 1e-6)
        if options:
            raise AttributionError(f"rule set {name!r} takes epsilon= and stabilizer= only, "
                                   f"not {', '.join(sorted(options))}")
        rule = Epsilon(epsilon=eps)
        layer_map = [*layer_map_base(stabilizer), (Convolution, rule), (Linear, rule)]
        return LayerMapComposite(layer_map=layer_map, canonizers=canon)
    if name not in COMPOSITES or name not in RULE_SETS:
        raise AttributionError(f"unknown LRP rule set {name!r}; use one of {', '.join(RULE_SETS)} "
                               "or pass a zennit Composite")
    try:
        return COMPOSITES[name](canonizers=canon, **options)
    except TypeError as exc:
        raise AttributionError(f"rule set {name!r}: {exc}") from exc


@contextmanager
def _neutral(model: nn.Module, no_inplace: bool = True) -> Iterator[None]:
    """Eval mode (and no in-place ops) for the duration; flags restored and stray attributes removed on exit.

    zennit copes with in-place activations itself (its hooks clone a module's input), so LRP
    keeps them (``no_inplace=False``) and saves the extra copies; captum's methods get them off.

    captum's DeepLift leaves ``input`` / ``output`` attributes on the activation modules after a
    layer attribution; anything a method added to a module's ``__dict__`` is deleted here.
    """
    training = {m: m.training for m in model.modules()}
    inplace = [m for m in model.modules() if no_inplace and getattr(m, "inplace", False) is True]
    attrs = {m: set(vars(m)) for m in model.modules()}
    try:
        for m in inplace:
            m.inplace = False
        model.eval()
        yield
    finally:
        for m in inplace:
            m.inplace = True
        for m, flag in training.items():
            m.training = flag
        for m, before in attrs.items():
            for key in set(vars(m)) - before:
                delattr(m, key)


def check_target(target: Any, output: torch.Tensor) -> torch.Tensor:
    """The target class of every input as an int64 tensor (N,); None means the predicted class.

    Raises:
        AttributionError: a target that is not integer, outside ``[0, classes)`` or of the wrong length.
    """
    n, classes = output.shape[0], output.shape[-1]
    if output.dim() != 2:
        raise AttributionError("attribution needs a model output of shape (N, classes), "
                               f"got {tuple(output.shape)}")
    if target is None:
        return output.detach().argmax(dim=1)
    t = torch.as_tensor(target, device=output.device)
    if torch.is_floating_point(t) or torch.is_complex(t) or t.dtype == torch.bool:
        raise AttributionError(f"target must be class indices (int), got {t.dtype} "
                               f"{t.reshape(-1)[:4].tolist()}; pass int(target) or target.long() if the "
                               "values are whole classes")
    t = t.long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise AttributionError(f"target has {t.numel()} entries for {n} inputs; "
                               "give one class, or one per input")
    bad = (t < 0) | (t >= classes)
    if bad.any():
        raise AttributionError(f"target {int(t[bad][0])} is out of range: the model has {classes} outputs "
                               f"(classes 0..{classes - 1})")
    return t.clone()


def _module_map(model: nn.Module, layers: list[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    return {name: modules[name] for name in layers}


def _layer_list(model: nn.Module, layer: str | Sequence[str] | None) -> list[str]:
    if layer is None:
        return []
    names = [layer] if isinstance(layer, str) else list(layer)
    out = []
    for name in names:
        out += [n for n in resolve_layers(model, name) if n not in out]
    return out


def lrp(model: nn.Module, inputs: torch.Tensor, target: Any = None, layers: Sequence[str] = (),
        composite: Any = "epsilon_plus_flat", canonizers: Sequence[Any] | None = None,
        **options: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """LRP of a batch in one forward and one backward pass: (output, input relevance, layer relevances).

    The relevance at each named layer is read from the backward pass itself by a tensor hook on
    the layer's output, so any number of layers costs nothing extra. ``target`` None means the
    predicted class. The model must not change between calls (see :func:`attribute`).
    """
    comp = make_composite(composite, canonizers, **options) if isinstance(composite, str) else composite
    modules = _module_map(model, list(layers))
    captured: dict[str, torch.Tensor] = {}
    handles: list[Any] = []

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor) and out.requires_grad:
                def keep(grad: torch.Tensor) -> None:
                    captured[name] = grad.detach()
                out.register_hook(keep)
        return hook

    x = inputs.detach().clone().requires_grad_(True)
    with _neutral(model, no_inplace=False), comp.context(model):
        try:
            for name, module in modules.items():
                handles.append(module.register_forward_hook(hook_for(name)))
            with torch.enable_grad():
                output = forward_checked(model, x)
                t = check_target(target, output)
                start = torch.zeros_like(output)
                start.scatter_(1, t[:, None], output.detach().gather(1, t[:, None]))
                (relevance,) = torch.autograd.grad(output, x, grad_outputs=start)
        finally:
            for h in handles:
                h.remove()
    missing = [n for n in modules if n not in captured]
    if missing:
        raise AttributionError(f"no relevance reached layer(s) {missing}: they did not run, or their "
                               "output does not depend on the input")
    return output.detach(), relevance.detach(), {n: captured[n] for n in modules}


def _captum(method: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: nn.Module | None,
            options: dict[str, Any]) -> torch.Tensor:
    import captum.attr as ca

    options = dict(options)
    baselines = options.pop("baselines", None)
    seed = options.pop("seed", 0)
    if method == "saliency":
        if layer is None:
            return ca.Saliency(model).attribute(x, target=t, abs=options.pop("abs", False), **options)
        algo = ca.LayerGradientXActivation(model, layer, multiply_by_inputs=False)
        return algo.attribute(x, target=t, **options)
    if method == "integrated_gradients":
        algo = ca.IntegratedGradients(model) if layer is None else ca.LayerIntegratedGradients(model, layer)
        return algo.attribute(x, baselines=baselines, target=t, **options)
    if method == "deeplift":
        algo = ca.DeepLift(model) if layer is None else ca.LayerDeepLift(model, layer)
        with warnings.catch_warnings():  # captum announces the hooks it sets; _neutral removes them all
            warnings.filterwarnings("ignore", message="Setting forward, backward hooks")
            return algo.attribute(x, baselines=baselines, target=t, **options)
    base = torch.zeros_like(x[:1]) if baselines is None else baselines
    algo = ca.GradientShap(model) if layer is None else ca.LayerGradientShap(model, layer)
    import numpy as np

    state = np.random.get_state()
    try:  # captum draws the baselines' coefficients from numpy's global generator: seed it, then restore
        np.random.seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return algo.attribute(x, baselines=base, target=t, **options)
    finally:
        np.random.set_state(state)


def attribute(model: nn.Module, inputs: torch.Tensor, target: Any = None, method: str = "lrp",
              layer: str | Sequence[str] | None = None, composite: Any = "epsilon_plus_flat",
              canonizers: Sequence[Any] | None = None, **options: Any
              ) -> torch.Tensor | dict[str, torch.Tensor]:
    """Attribution of the target class score to the inputs, or to the units of a layer.

    Args:
        model: the network (its outputs are class scores, shape (N, classes)).
        inputs: a batch, shape (N, ...).
        target: one class for every input, one per input, or None for the predicted class.
        method: one of :data:`METHODS`.
        layer: a layer name (or glob, or list): the relevance of its output units, same shape
            as the output, instead of the input's. A list of names gives a dict by name.
        composite: LRP only: a rule set name (:data:`RULE_SETS`) or a zennit ``Composite``.
        canonizers: LRP only: zennit canonizers (None: batch norm merged into the layer before).
        **options: passed on: to the composite for LRP (``epsilon=``...), to captum's
            ``attribute`` otherwise (``baselines=``, ``n_steps=``, ``n_samples=``...; ``seed=``
            fixes gradient SHAP's draws).

    Returns:
        The relevance, shaped like ``inputs`` (or the layer's output), or a dict of those.

    Raises:
        AttributionError: unknown method or rule set, or a target out of range.
        unitscope.InputError: the inputs do not fit the model (the message names the sample shape
            it declares, if any, and the one given).
    """
    if method not in METHODS:
        raise AttributionError(f"unknown attribution method {method!r}; use one of {', '.join(METHODS)}")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        raise AttributionError("inputs must be a batch tensor of shape (N, ...)")
    check_input_shape(model, tuple(inputs.shape[1:]), what="the shape of one input")
    names = _layer_list(model, layer)
    single = isinstance(layer, str) and len(names) == 1
    if method == "lrp":
        _, rel, by_layer = lrp(model, inputs, target, names, composite, canonizers, **options)
        if layer is None:
            return rel
        return by_layer[names[0]] if single else by_layer
    if options.get("abs") and method != "saliency":
        raise AttributionError("abs= is an option of saliency only")
    with _neutral(model):
        with torch.no_grad():
            t = check_target(target, forward_checked(model, inputs))
        x = inputs.detach().clone().requires_grad_(True)
        modules = _module_map(model, names)
        if layer is None:
            return _captum(method, model, x, t, None, options).detach()
        out = {n: _captum(method, model, x, t, m, options).detach() for n, m in modules.items()}
    return out[names[0]] if single else out


def plot_heatmaps(inputs: torch.Tensor, relevance: torch.Tensor, labels: Sequence[Any] | None = None,
                  ax: Any = None, cmap: str = "bwr") -> Any:
    """Inputs (top row) and their relevance maps (bottom row, summed over channels); returns the figure.

    The colour scale of each map is symmetric about 0 (red positive, blue negative), so maps
    with different ranges stay readable. ``ax`` may be a (2, N) array of axes.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = inputs.shape[0]
    if relevance.shape[0] != n:
        raise ValueError(f"{n} inputs but {relevance.shape[0]} relevance maps")
    if ax is None:
        fig, ax = plt.subplots(2, n, figsize=(1.6 * n + 0.4, 3.4), squeeze=False, layout="constrained")
    else:
        fig = ax.flat[0].figure
    for i in range(n):
        img = inputs[i].detach().cpu().float()
        img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
        lo, hi = float(img.min()), float(img.max())
        ax[0, i].imshow(((img - lo) / (hi - lo + 1e-12)).numpy(), cmap="gray")
        rel = relevance[i].detach().cpu().float()
        rel = rel.sum(0) if rel.dim() == 3 else rel
        bound = float(rel.abs().max()) or 1.0
        ax[1, i].imshow(rel.numpy(), cmap=cmap, vmin=-bound, vmax=bound)
        if labels is not None:
            ax[0, i].set_title(str(labels[i]), fontsize=8)
        for a in (ax[0, i], ax[1, i]):
            a.set_xticks([])
            a.set_yticks([])
    ax[1, 0].set_ylabel("relevance")
    return fig
