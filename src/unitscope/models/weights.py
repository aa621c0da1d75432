"""Reading and changing a model's weights by layer: views, unit surgery, switching state dicts.

``weights(model)["features.0"].w`` (or ``weights(model).features[0].w``) reads a layer's weight;
``set_weights(model, "conv1:3", 0.0)`` zeroes unit 3 of ``conv1``; ``switch_weights(model,
state)`` loads another state dict in place and returns the previous one, so switching back
restores the model bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..capture import LayerError, resolve_layers
from .registry import WeightsError, check_state_dict

MODES = ("both", "weight", "bias")


class WeightsView:
    """Read-only access to the parameters of a module tree, by dotted name or attribute.

    ``view["layer1.0.conv1"]``, ``view.layer1[0].conv1`` and ``view["layer1"][0]["conv1"]`` are
    the same layer; ``.w`` and ``.b`` are its weight and bias (detached tensors sharing memory
    with the model: change weights with :func:`set_weights`).
    """

    def __init__(self, module: nn.Module, name: str = "") -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_name", name)

    def _child(self, key: str) -> WeightsView:
        full = f"{self._name}.{key}" if self._name else key
        try:
            return WeightsView(self._module.get_submodule(key), full)
        except AttributeError:
            raise LayerError(_no_layer(self._module, full, key)) from None

    def __getitem__(self, key: str | int) -> WeightsView:
        return self._child(str(key))

    def __getattr__(self, key: str) -> WeightsView:
        if key.startswith("__"):
            raise AttributeError(key)
        if key == "w":  # the property raised: say why instead of looking for a child named "w"
            return self._param("weight")
        return self._child(key)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError("weights views are read-only; use unitscope.set_weights(model, layer, value)")

    @property
    def w(self) -> torch.Tensor:
        """The layer's ``weight`` (detached)."""
        return self._param("weight")

    @property
    def b(self) -> torch.Tensor | None:
        """The layer's ``bias`` (detached), or None when it has none."""
        bias = getattr(self._module, "bias", None)
        return bias.detach() if isinstance(bias, torch.Tensor) else None

    def _param(self, which: str) -> torch.Tensor:
        value = getattr(self._module, which, None)
        if not isinstance(value, torch.Tensor):
            raise AttributeError(f"layer {self._name or '<root>'!r} ({type(self._module).__name__}) "
                                 f"has no {which}")
        return value.detach()

    def names(self) -> list[str]:
        """The names (relative to this view) of every module below it that has its own parameters."""
        return [n for n, m in self._module.named_modules()
                if n and any(True for _ in m.parameters(recurse=False))]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"WeightsView({self._name or '<root>'}: {type(self._module).__name__})"


def _no_layer(root: nn.Module, full: str, key: str) -> str:
    try:
        resolve_layers(root, key)
    except LayerError as err:
        return str(err).replace(f"layer {key!r}", f"layer {full!r}")
    return f"layer {full!r} does not exist"


def weights(model: nn.Module) -> WeightsView:
    """A read-only view of ``model``'s weights by layer.

    Example:
        >>> import unitscope
        >>> w = unitscope.weights(unitscope.load_model("digits-cnn"))
        >>> tuple(w["conv1"].w.shape), tuple(w.fc.b.shape)
        ((16, 1, 3, 3), (10,))
    """
    return WeightsView(model)


def _parse_target(model: nn.Module, target: str) -> tuple[str, nn.Module, int | None]:
    layer, _, unit = target.partition(":")
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        resolve_layers(model, layer)  # raises with the closest names
        raise LayerError(f"{layer!r} is a pattern; set_weights takes one exact layer name")
    if not unit:
        if target.endswith(":"):
            raise ValueError(f"{target!r} names no unit; pass {layer!r} for the whole layer or "
                             f"'{layer}:<unit>' for one unit")
        return layer, modules[layer], None
    try:
        index = int(unit)
    except ValueError:
        raise ValueError(f"unit in {target!r} must be an integer, as in 'conv1:3'") from None
    return layer, modules[layer], index


def set_weights(model: nn.Module, target: str, source: nn.Module | float | torch.Tensor,
                mode: str = "both") -> None:
    """Overwrite a layer's (or one unit's) weight and/or bias in place.

    Args:
        model: the model to change.
        target: ``"layer"`` or ``"layer:unit"`` (unit = output channel / feature: index 0 of the
            weight and bias, dim 1 of a transposed convolution's weight).
        source: a model of the same architecture (the same layer is copied from it), a number
            (every addressed value is set to it) or a tensor of the addressed shape.
        mode: ``"both"``, ``"weight"`` or ``"bias"``. With ``"both"``, a tensor ``source`` must fit
            the weight and the bias (a one-element tensor always does); a weight-shaped tensor
            needs ``mode="weight"``.

    Raises:
        WeightsError: a source does not fit; every shape is checked before anything is written,
            so the model is unchanged after any error.

    Example:
        >>> import unitscope
        >>> m = unitscope.load_model("digits-cnn")
        >>> unitscope.set_weights(m, "conv1:3", 0.0)
        >>> float(unitscope.weights(m)["conv1"].w[3].abs().sum())
        0.0
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {', '.join(MODES)}")
    layer, module, unit = _parse_target(model, target)
    names = ["weight", "bias"] if mode == "both" else [mode]
    params = {n: getattr(module, n, None) for n in names}
    params = {n: p for n, p in params.items() if isinstance(p, torch.Tensor)}
    if not params:
        raise ValueError(f"layer {layer!r} ({type(module).__name__}) has no {' or '.join(names)}")
    if mode == "bias" and "bias" not in params:
        raise ValueError(f"layer {layer!r} has no bias")
    src_module = None
    if isinstance(source, nn.Module):
        try:
            src_module = source.get_submodule(layer)
        except AttributeError:
            raise LayerError(f"the source model has no layer {layer!r}") from None
    elif not isinstance(source, torch.Tensor):
        try:
            source = torch.tensor(float(source))
        except (TypeError, ValueError):
            raise TypeError(f"set_weights source must be a model, a number or a tensor, got "
                            f"{type(source).__name__}") from None
    # every value is checked and converted first, so an error leaves the model unchanged
    with torch.no_grad():
        index = None if unit is None else _unit_index(module, unit, layer)
        writes = [_planned_write(target, layer, name, params, index, mode, source, src_module)
                  for name in params]
        for dest, value in writes:
            dest.copy_(value)


def _planned_write(target: str, layer: str, name: str, params: dict[str, torch.Tensor],
                   unit: dict[str, Any] | None, mode: str, source: torch.Tensor | nn.Module,
                   src_module: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(destination, value)`` of one parameter, the value already cast and expanded to fit."""
    param = params[name]
    dest = param if unit is None else param[unit[name]]
    if src_module is not None:
        value = getattr(src_module, name, None)
        if not isinstance(value, torch.Tensor) or value.shape != param.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else None
            raise WeightsError(f"source layer {layer!r}.{name} has shape {got}, "
                               f"the model's is {tuple(param.shape)}; nothing was changed")
        value = value if unit is None else value[unit[name]]
    else:
        assert isinstance(source, torch.Tensor)
        value = source
        if value.numel() == 1:
            value = value.reshape(())
        elif value.shape != dest.shape:
            raise WeightsError(_shape_message(target, name, dest, value, params, unit, mode))
    return dest, value.detach().to(dest.device, dest.dtype).expand_as(dest)


def _shape_message(target: str, name: str, dest: torch.Tensor, value: torch.Tensor,
                   params: dict[str, torch.Tensor], unit: int | None, mode: str) -> str:
    """Why a tensor source does not fit, with the ``mode`` that would take it when there is one."""
    msg = (f"{target} {name} has shape {tuple(dest.shape)}, the value has {tuple(value.shape)}; "
           "nothing was changed")
    if mode == "both":
        fits = [n for n, p in params.items()
                if (p.shape if unit is None else p[unit[n]].shape) == value.shape]
        if fits:
            msg += (f". A tensor with mode='both' must fit the weight and the bias; to set only the "
                    f"{fits[0]}, pass mode={fits[0]!r}")
    return msg


def _unit_index(module: nn.Module, unit: int, layer: str) -> dict[str, Any]:
    """Where output unit ``unit`` sits in the module's ``weight`` and ``bias``.

    Index 0 of both for most layers. A transposed convolution keeps its output channels on dim 1
    of the weight, ``(in_channels, out_channels / groups, *kernel)``: unit ``u`` of group ``g``
    is column ``u mod (out / groups)`` of that group's input rows.
    """
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    weight = getattr(module, "weight", None)
    ref = weight if isinstance(weight, torch.Tensor) else getattr(module, "bias", None)
    count = module.out_channels if transposed else ref.shape[0]
    if not -count <= unit < count:
        raise IndexError(f"layer {layer!r} has {count} units; unit {unit} does not exist")
    unit %= count
    if not transposed:
        return {"weight": unit, "bias": unit}
    per_group, rows = count // module.groups, module.in_channels // module.groups
    group = unit // per_group
    return {"weight": (slice(group * rows, (group + 1) * rows), unit % per_group), "bias": unit}


def switch_weights(model: nn.Module, state: Mapping[str, torch.Tensor] | str | Path | nn.Module
                   ) -> dict[str, torch.Tensor]:
    """Load another state dict into ``model`` in place; return (a copy of) the previous one.

    ``state`` may be a state dict, a weights file or a model of the same architecture. Nothing
    is changed when it does not fit (the error names the first key that differs).

    Example:
        >>> import unitscope, torch
        >>> a, b = unitscope.load_model("digits-cnn"), unitscope.load_model("digits-cnn")
        >>> old = unitscope.switch_weights(a, b)
        >>> _ = unitscope.switch_weights(a, old)   # back, bit for bit
    """
    if isinstance(state, (str, Path)):
        from .registry import read_state_dict

        state = read_state_dict(Path(state))
    elif isinstance(state, nn.Module):
        state = state.state_dict()
    check_state_dict(model, dict(state))
    previous = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return previous
