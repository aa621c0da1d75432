"""Which axis of a layer's output holds its units: dim 1 (convolutions) or the last (tokens).

Every analysis reads units on dim 1, the layout of convolutions, batch norms and pooling. A
``Linear``, ``LayerNorm``, ``Embedding`` or attention layer acts on the *last* axis instead: a
transformer's token map is ``(N, T, D)``, a ConvNeXt or Swin block runs channels-last
``(N, H, W, C)``. :class:`UnitLayout` tells, per module, where the units are, so that every hook
site can move them to dim 1 first (a view, no copy) and treat the other axes as positions.

Modules that fix the layout (``Linear``: last; ``Conv2d``: first; ``Permute``: wherever it sends
the units) say it themselves. Any other module (an activation, dropout, a container) follows the
last layout-fixing module that ran before it in the forward (while :meth:`UnitLayout.watch` is
on; the one defined before it otherwise), whose unit count then picks the axis: ``GELU`` after
``Linear(·, 3072)`` on ``(N, 197, 3072)`` takes the last axis, a container that permutes back to
``(N, C, H, W)`` takes dim 1. A 2-D output ``(N, D)`` has its units on dim 1 either way.

Attention, RNN and transformer layers with ``batch_first=False`` also put their inputs on dim 1,
``(T, N, D)``; :meth:`UnitLayout.axes` says so for them, and for no other layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

_FIRST: tuple[type, ...] = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._LPPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._MaxUnpoolNd, nn.PixelShuffle, nn.PixelUnshuffle, nn.Upsample,
    nn.ChannelShuffle,
)
_LAST: tuple[type, ...] = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding, nn.EmbeddingBag,
                           nn.MultiheadAttention, nn.RNNBase)
_LAST += (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()


@dataclass(frozen=True)
class _Layout:
    last: bool  # units on the last axis (else on dim 1)
    count: int | None  # how many units the defining module makes (None: unknown)
    fixed: bool  # the module itself fixes the layout (no guessing from the shape)
    ndim: int | None = None  # the defining module's output dimensions, where its type fixes them
    size: int | None = None  # values per input of the defining module's output (seen in a forward)
    seq_first: bool = False  # inputs on dim 1: (T, N, D) of batch_first=False attention and RNNs


_DEFAULT = _Layout(last=False, count=None, fixed=False)


def _count(module: nn.Module) -> int | None:
    if isinstance(module, nn.RNNBase):
        width = module.proj_size or module.hidden_size
        return width * (2 if module.bidirectional else 1)
    for attr in ("out_channels", "out_features", "num_features", "num_channels", "embedding_dim",
                 "embed_dim"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and shape:
        return int(shape[-1])
    return None


def _conv_ndim(module: nn.Module) -> int | None:
    """Output dimensions of an N-d convolution, norm or pool (N + 2), where the class says N."""
    for n in (1, 2, 3):
        if type(module).__name__.endswith(f"{n}d"):
            return n + 2
    return None


def _permute_dims(module: nn.Module) -> list[int] | None:
    dims = getattr(module, "dims", None)
    if type(module).__name__ == "Permute" and isinstance(dims, (list, tuple)) and len(dims) >= 2 \
            and all(isinstance(d, int) for d in dims):
        return [d % len(dims) for d in dims]
    return None


def _own(module: nn.Module, before: _Layout) -> _Layout | None:
    """The layout ``module`` fixes by itself, given the layout of its input; None if it fixes none.

    Attention, RNNs and transformer layers also say where their inputs are: ``batch_first``, an
    attribute of theirs or of their ``self_attn``. No other layer inherits it: a functional
    transpose between layers is invisible, so guessing it from the layers before (or from sizes,
    tried and dropped: a batch as long as the sequence flipped rows) misread them.
    """
    own = _own_units(module, before)
    attn = getattr(module, "self_attn", None)
    batch_first = getattr(module, "batch_first", getattr(attn, "batch_first", None))
    if isinstance(batch_first, bool):
        if own is None:  # a transformer layer: a container that fixes its layout
            count = getattr(attn, "embed_dim", None)
            own = _Layout(True, count if isinstance(count, int) else None, True)
        return replace(own, seq_first=not batch_first)
    return own


def _own_units(module: nn.Module, before: _Layout) -> _Layout | None:
    """Where ``module`` puts its units, given the layout of its input; None if it does not say."""
    if isinstance(module, nn.LayerNorm) and type(module).forward is not nn.LayerNorm.forward:
        # a subclass with its own forward (torchvision's LayerNorm2d normalises channels-first):
        # its unit count is known, its layout is read off the output
        return _Layout(False, _count(module), False)
    if isinstance(module, _LAST):
        return _Layout(True, _count(module), True)
    if isinstance(module, (nn.PixelShuffle, nn.PixelUnshuffle)) and before.count is not None:
        r2 = (module.upscale_factor if isinstance(module, nn.PixelShuffle) else module.downscale_factor) ** 2
        count = before.count // r2 if isinstance(module, nn.PixelShuffle) else before.count * r2
        return _Layout(False, count, True, 4)
    if isinstance(module, _FIRST):
        return _Layout(False, _count(module) or before.count, True, _conv_ndim(module))
    dims = _permute_dims(module)
    if dims is not None:
        n = len(dims)
        src = n - 1 if before.last else 1
        dst = dims.index(src)
        return _Layout(dst == n - 1 and dst != 1, before.count, True, n)
    return None


class Watch:
    """What :meth:`UnitLayout.watch` returns: a hook handle whose ``remove()`` stops the watching."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        self._stop()


class UnitLayout:
    """Per module of ``model``: the axis of its output that holds the units.

    While :meth:`watch` is on, hooks on the modules that define a layout record the last one that
    ran, and a module that defines none follows it: the module that ran before it, in execution
    order. Without watching it follows the module defined before it (definition order), which
    differs where ``__init__`` defines modules out of order (a ReLU shared by two convolutions, a
    norm defined after the layer it precedes).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(2), nn.Linear(36, 5), nn.GELU())
        >>> layout = UnitLayout(net)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> [layout.axis(name, t) for name, t in (("1", net[:2](x)), ("4", net(x)))]
        [1, 2]
        >>> tuple(layout.first("4", net(x)).shape)  # (N, units, positions)
        (2, 5, 8)
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._layouts: dict[str, _Layout] = {}
        self._own: dict[str, _Layout] = {}  # the modules that define a layout (or a unit count)
        # unit counts of the fixed layers inside each module (itself included), last-axis and
        # dim-1 ones: a module that calls its layers' weights functionally (torchvision's Swin V2
        # attention) runs none of them as modules
        self._inner: dict[str, tuple[set[int], set[int]]] = {}
        self._live: _Layout | None = None
        self._walk(model, "", _DEFAULT)

    def _walk(self, module: nn.Module, name: str, before: _Layout) -> _Layout:
        own = _own(module, before)
        after = before
        inner_last: set[int] = set()
        inner_first: set[int] = set()
        for child_name, child in module.named_children():
            child_key = f"{name}.{child_name}" if name else child_name
            after = self._walk(child, child_key, after)
            inner_last |= self._inner[child_key][0]
            inner_first |= self._inner[child_key][1]
        if own is not None:
            after = self._own[name] = own
            if own.fixed and own.count is not None:
                (inner_last if own.last else inner_first).add(own.count)
        elif after.fixed or after is not before:
            after = replace(after, fixed=False, seq_first=False)  # follows what ran before it
        self._layouts[name] = after
        self._inner[name] = (inner_last, inner_first)
        return after

    def watch(self, names: Sequence[str] | None = None) -> Watch:
        """Follow the execution order in the forwards to come; returns the handle that stops it.

        Only needed for the modules of ``names`` (default: all) that define no layout of their
        own; when there are none, nothing is hooked.
        """
        if names is not None and all(n in self._own and self._own[n].fixed for n in names):
            return Watch(lambda: None)
        modules = dict(self.model.named_modules())
        watched = {id(modules[name]) for name in self._own}

        def saw(module: nn.Module, args: Any, output: Any) -> None:
            if id(module) in watched:
                self._saw(module, args, output)

        # one global hook, not a hook per module: torch's fused transformer path is switched off
        # by any hook on a submodule of the layer
        handles = [self.model.register_forward_pre_hook(self._reset),
                   nn.modules.module.register_module_forward_hook(saw)]

        def stop() -> None:
            while handles:
                handles.pop().remove()
            self._live = None
        return Watch(stop)

    def _reset(self, module: nn.Module, args: Any) -> None:
        self._live = None

    def _saw(self, module: nn.Module, args: Any, output: Any) -> None:
        own = _own(module, self._live or _DEFAULT)
        out = output if isinstance(output, torch.Tensor) else (
            output[0] if isinstance(output, (tuple, list)) and output else None)
        if own is not None:
            seen = isinstance(out, torch.Tensor) and out.dim() > 0
            ndim = out.dim() if seen else own.ndim
            size = out[0].numel() if seen else None
            self._live = replace(own, fixed=True, ndim=ndim, size=size)

    def axis(self, name: str, t: torch.Tensor) -> int:
        """The axis of ``t`` (module ``name``'s output) that holds the units: 1 or ``t.dim() - 1``.

        A module that does not fix its layout takes the axis that the module before it uses, if
        that axis has the expected unit count. An output with other dimensions than that module
        made (a convolution's map flattened into tokens) tries the last axis first. Else the last
        axis if only it has the expected count and the output holds as many values as that
        module's (a permute or window partition, not a ``cat`` or ``GLU`` that changes the
        channels), or if its size is the unit count of a last-axis layer inside the module; else
        dim 1, the convolutions' layout.
        """
        if t.dim() < 3:
            return 1
        own = self._own.get(name)
        if own is not None and own.fixed:
            return t.dim() - 1 if own.last else 1
        layout = own or self._live or self._layouts.get(name, _DEFAULT)
        last = t.dim() - 1
        if layout.count is None:
            return last if layout.last else 1
        reshaped = layout.ndim is not None and t.dim() != layout.ndim
        preferred = last if layout.last != reshaped else 1
        if t.shape[preferred] == layout.count:
            return preferred
        rearranged = layout.size is None or t[0].numel() == layout.size
        if t.shape[last] == layout.count and t.shape[1] != layout.count and rearranged:
            return last  # moved there by functional code that keeps the values (a permute, windows)
        inner_last, inner_first = self._inner.get(name, (set(), set()))
        if t.shape[last] in inner_last and t.shape[1] not in inner_first:
            return last
        return 1

    def axes(self, name: str, t: torch.Tensor) -> tuple[int, int]:
        """``(batch axis, units axis)`` of ``t``: the batch is on dim 1 of the ``(T, N, D)`` output
        of an attention, RNN or transformer layer with ``batch_first=False``, else on dim 0.

        Other layers of such a model (the ``Linear`` inside a transformer layer, a dropout after
        it) are read batch-first: their rows are then tokens (documented, not guessed).
        """
        units = self.axis(name, t)
        own = self._own.get(name)
        if own is not None and own.seq_first and t.dim() >= 3 and units != 1:
            return 1, units
        return 0, units

    def first(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` with the batch on dim 0 and the units on dim 1 (a view)."""
        batch, units = self.axes(name, t)
        if batch == 1:
            return t.movedim((1, units), (0, 1))
        return t if units == 1 else t.movedim(units, 1)
