"""Layer selection and activation capture with forward hooks.

Layers are the dotted names of ``model.named_modules()``. A selection may mix exact names,
globs (``"features.*"``, ``"layer?.?.relu"``), module types (``nn.ReLU`` or ``"Conv2d"``) and
lists of these. Hooks reduce each output inside the hook (``"mean"``/``"max"`` over spatial
positions, ``"flatten"``, ``"pool:D"`` adaptive average pooling, ``"none"``), so a full map is
kept only when asked, and a reduction is taken before any later in-place operation (an
``inplace=True`` ReLU after a conv) can change the tensor. Every hook is removed on exit,
also when the forward raises.

Example:
    >>> import torch, unitscope
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU())
    >>> with unitscope.capture(net, "1", reduce="mean") as acts:
    ...     _ = net(torch.randn(2, 1, 8, 8))
    >>> tuple(acts["1"].shape)
    (2, 4)
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .units import UnitLayout

LayerSpec = str | type | Sequence[str | type]
Reduction = str | Callable[[torch.Tensor], torch.Tensor]

_GLOB = re.compile(r"[*?\[]")


class LayerError(KeyError):
    """A layer selection that names no module of the model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class CaptureError(RuntimeError):
    """A forward that capture cannot record faithfully (e.g. a module called twice).

    ``module`` names the module concerned, when there is one.
    """

    def __init__(self, message: str, module: str | None = None) -> None:
        super().__init__(message)
        self.module = module


class StopForward(Exception):
    """Raised inside a hook once every requested layer has run, to skip the rest of the network."""


# --------------------------------------------------------------------------- layer selection
def resolve_layers(model: nn.Module, layers: LayerSpec | None) -> list[str]:
    """Turn a layer selection into module names, in the order of ``model.named_modules()``.

    Args:
        model: the network.
        layers: an exact name, a glob, a module type or its class name, or a list of these.
            ``None`` selects every leaf module.

    Returns:
        The matching names, each once, in module order.

    Raises:
        LayerError: a name or pattern matches nothing; the message lists the closest names.
    """
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    if layers is None:
        return [n for n in names if not any(True for _ in modules[n].children())]
    specs = [layers] if isinstance(layers, (str, type)) else list(layers)
    if not specs:
        raise LayerError("empty layer selection: name at least one layer, glob or module type")
    type_names = {type(m).__name__ for m in modules.values()}
    chosen: set[str] = set()
    for spec in specs:
        if isinstance(spec, type):
            hit = {n for n in names if isinstance(modules[n], spec)}
            what = f"module type {spec.__name__}"
        elif not isinstance(spec, str):
            raise LayerError(f"layer selection items must be str or type, got {type(spec).__name__}")
        elif spec in modules and spec:
            hit = {spec}
        elif _GLOB.search(spec):
            hit = {n for n in names if fnmatch.fnmatchcase(n, spec)}
            what = f"pattern {spec!r}"
        elif spec in type_names:
            hit = {n for n in names if type(modules[n]).__name__ == spec}
        else:
            hit = set()
            what = f"layer {spec!r}"
        if not hit:
            raise LayerError(_unknown_message(what, spec, names, type_names))
        chosen |= hit
    return [n for n in names if n in chosen]


def _unknown_message(what: str, spec: Any, names: list[str], type_names: set[str]) -> str:
    target = spec if isinstance(spec, str) else getattr(spec, "__name__", str(spec))
    close = difflib.get_close_matches(target, names + sorted(type_names), n=5, cutoff=0.4)
    hint = f" Closest: {', '.join(close)}." if close else ""
    return (f"{what} matches no module of the model.{hint} "
            "Run `unitscope layers MODEL` (or unitscope.layer_names(model)) to list them all.")


def layer_names(model: nn.Module) -> list[str]:
    """Every addressable module name of ``model`` (the root excluded)."""
    return [n for n, _ in model.named_modules() if n]


# --------------------------------------------------------------------------- reductions
def make_reduction(spec: Reduction) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function a hook applies to a layer's output.

    ``"none"`` keeps the output (cloned, so later in-place ops cannot change it), ``"mean"`` and
    ``"max"`` reduce every dimension after the channel dimension (a 2-D output is returned as
    is), ``"flatten"`` gives ``(N, -1)``, ``"channelwise"`` makes every spatial position a sample
    (``(N, C, H, W)`` -> ``(N·H·W, C)``), ``"pool:D"`` adaptive-average-pools 1-D, 2-D or 3-D
    maps to ``D`` per spatial dimension. A callable is used as given. Hooks pass detached
    outputs, so nothing captured keeps the autograd graph alive.
    """
    if callable(spec):
        return spec
    if spec == "none":
        return lambda t: t.detach().clone()
    if spec == "mean":
        return lambda t: t.mean(dim=tuple(range(2, t.dim()))) if t.dim() > 2 else t.detach().clone()
    if spec == "max":
        return lambda t: t.amax(dim=tuple(range(2, t.dim()))) if t.dim() > 2 else t.detach().clone()
    if spec == "flatten":
        return lambda t: t.detach().reshape(t.shape[0], -1).clone()
    if spec == "channelwise":
        return _channelwise
    if isinstance(spec, str) and spec.startswith("pool:"):
        try:
            d = int(spec.split(":", 1)[1])
        except ValueError:
            d = 0
        if d < 1:
            raise ValueError(f"reduction {spec!r}: the pooled size must be a positive integer, e.g. 'pool:4'")
        return lambda t: _adaptive_pool(t, d)
    raise ValueError(
        f"unknown reduction {spec!r}; use 'none', 'mean', 'max', 'flatten', 'channelwise', 'pool:D' "
        "or a callable"
    )


def _channelwise(t: torch.Tensor) -> torch.Tensor:
    if t.dim() <= 2:
        return t.detach().clone()
    out = t.detach().movedim(1, -1).reshape(-1, t.shape[1])
    # reshape copies unless the map is 1×1; a view would change under a later in-place op
    return out.clone() if out.data_ptr() == t.data_ptr() else out


def _adaptive_pool(t: torch.Tensor, d: int) -> torch.Tensor:
    pools = {3: nn.functional.adaptive_avg_pool1d, 4: nn.functional.adaptive_avg_pool2d,
             5: nn.functional.adaptive_avg_pool3d}
    if t.dim() not in pools:
        return t.detach().clone()
    return pools[t.dim()](t, d)


# --------------------------------------------------------------------------- the hooks
class Capture:
    """Forward hooks on the selected layers that store reduced outputs of the latest forward.

    ``outputs[reduction_name][key]`` holds the reduced output of module ``key`` from the most
    recent forward of ``model``, with the units on dim 1: an output whose units are on its last
    axis (a ``Linear`` on tokens ``(N, T, D)``, a channels-last block) is seen as ``(N, D, T)``
    (see :class:`unitscope.units.UnitLayout`). ``key`` is the module name; with ``calls="all"``
    the second and later calls of a module within one forward are keyed ``name#1``, ``name#2``.

    Args:
        model: the network; a pre-hook on it marks the start of each forward.
        layers: the selection (see :func:`resolve_layers`).
        reductions: name -> reduction spec; every selected layer gets each of them.
        calls: ``"error"`` (a module called twice in one forward raises :class:`CaptureError`),
            ``"all"`` (each call is kept under its own key), ``"first"`` or ``"last"``.
        stop: raise :class:`StopForward` once every selected module has run (skips the rest of
            the network; the caller catches it). Only with ``calls="first"``: with ``"error"``,
            ``"last"`` or ``"all"`` a selected module may still be called again later in the
            forward (a ReLU module shared by the two convs of a ResNet block), so the forward
            runs to its end to raise, keep the last call or keep every call.
        targets: reduction name -> the layers it applies to (default: every selected layer), so
            a full map is kept only for the layers that asked for it.
    """

    def __init__(self, model: nn.Module, layers: LayerSpec | None,
                 reductions: dict[str, Reduction] | None = None, calls: str = "error",
                 stop: bool = False, targets: dict[str, set[str]] | None = None) -> None:
        if calls not in ("error", "all", "first", "last"):
            raise ValueError(f"calls={calls!r}: use 'error', 'all', 'first' or 'last'")
        self.model = model
        self.layers = resolve_layers(model, layers)
        self.reductions = {k: make_reduction(v) for k, v in (reductions or {"none": "none"}).items()}
        self.calls = calls
        self.stop = stop and calls == "first"
        self.outputs: dict[str, dict[str, torch.Tensor]] = {k: {} for k in self.reductions}
        self._per_layer = {
            name: [(red, fn) for red, fn in self.reductions.items()
                   if targets is None or name in targets.get(red, ())]
            for name in self.layers
        }
        self.units = UnitLayout(model)
        self._counts: dict[str, int] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> Capture:
        modules = dict(self.model.named_modules())
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._start_forward))
            self._handles.append(self.units.watch(self.layers))
            for name in self.layers:
                self._handles.append(modules[name].register_forward_hook(self._make_hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.remove()
        return exc_type is StopForward

    def remove(self) -> None:
        """Remove every hook this capture registered."""
        while self._handles:
            self._handles.pop().remove()

    def _start_forward(self, module: nn.Module, args: Any) -> None:
        self._counts.clear()
        for store in self.outputs.values():
            store.clear()

    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            calls = self._counts.get(name, 0)
            self._counts[name] = calls + 1
            if calls:
                if self.calls == "error":
                    raise CaptureError(
                        f"module {name!r} was called {calls + 1} times in one forward; pass "
                        f"calls='all' to keep each call ({name!r}, '{name}#1', ...), or "
                        "calls='first'/'last'", module=name
                    )
                if self.calls == "first":
                    return
            key = f"{name}#{calls}" if calls and self.calls == "all" else name
            tensor = self.units.first(name, _first_tensor(output, name).detach())
            for red_name, fn in self._per_layer[name]:
                self.outputs[red_name][key] = fn(tensor)
            if self.stop and len(self._counts) == len(self.layers):
                raise StopForward
        return hook


def _first_tensor(output: Any, name: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    raise CaptureError(f"layer {name!r} returned {type(output).__name__}, not a tensor; select a "
                       "submodule that returns a tensor")


@contextmanager
def capture(model: nn.Module, layers: LayerSpec | None, reduce: Reduction = "none",
            calls: str = "error", stop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Record the (reduced) outputs of the selected layers during ``model``'s forwards.

    Yields a dict that, after each forward, holds every selected layer's output of that forward,
    units on dim 1 (a token map ``(N, T, D)`` is given as ``(N, D, T)``, see :class:`Capture`).
    All hooks are removed on exit, also after an exception. With ``stop=True`` and
    ``calls="first"`` the forward is cut short after the last selected layer and the ``with``
    block ends there (with the other ``calls`` modes a selected module may run again later, so
    the forward runs to its end).

    Example:
        >>> import torch, unitscope
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(inplace=True))
        >>> with unitscope.capture(net, ["0", "1"]) as acts:
        ...     _ = net(torch.randn(4, 3))
        >>> bool((acts["0"] < 0).any()), bool((acts["1"] >= 0).all())  # the ReLU ran in place
        (True, True)
    """
    cap = Capture(model, layers, {"out": reduce}, calls=calls, stop=stop)
    with cap:
        yield cap.outputs["out"]
