"""Which axis of a layer's output holds its units: dim 1 (convolutions) or the last (tokens).

Every analysis reads units on dim 1, the layout of convolutions, batch norms and pooling. A
``Linear``, ``LayerNorm``, ``Embedding`` or attention layer acts on the *last* axis instead: a
transformer's token map is ``(N, T, D)``, a ConvNeXt or Swin block runs channels-last
``(N, H, W, C)``. :class:`UnitLayout` tells, per module, where the units are, so that every hook
site can move them to dim 1 first (a view, no copy) and treat the other axes as positions.

Modules that fix the layout (``Linear``: last; ``Conv2d``: first; ``Permute``: wherever it sends
the units) say it themselves. Any other module (an activation, dropout, a container) follows the
module defined before it, whose unit count then picks the axis: ``GELU`` after ``Linear(·, 3072)``
on ``(N, 197, 3072)`` takes the last axis, a container that permutes back to ``(N, C, H, W)``
takes dim 1. A 2-D output ``(N, D)`` has its units on dim 1 either way.
"""

from __future__ import annotations

from dataclasses import dataclass

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
                           nn.MultiheadAttention) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@dataclass(frozen=True)
class _Layout:
    last: bool  # units on the last axis (else on dim 1)
    count: int | None  # how many units the defining module makes (None: unknown)
    fixed: bool  # the module itself fixes the layout (no guessing from the shape)


_DEFAULT = _Layout(last=False, count=None, fixed=False)


def _count(module: nn.Module) -> int | None:
    for attr in ("out_channels", "out_features", "num_features", "num_channels", "embedding_dim",
                 "embed_dim"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and shape:
        return int(shape[-1])
    return None


def _permute_dims(module: nn.Module) -> list[int] | None:
    dims = getattr(module, "dims", None)
    if type(module).__name__ == "Permute" and isinstance(dims, (list, tuple)) and len(dims) >= 2 \
            and all(isinstance(d, int) for d in dims):
        return list(dims)
    return None


def _own(module: nn.Module, before: _Layout) -> _Layout | None:
    """The layout ``module`` fixes by itself, given the layout of its input; None if it fixes none."""
    if isinstance(module, _LAST):
        return _Layout(True, _count(module), True)
    if isinstance(module, _FIRST):
        return _Layout(False, _count(module) or before.count, True)
    dims = _permute_dims(module)
    if dims is not None:
        n = len(dims)
        src = n - 1 if before.last else 1
        dst = dims.index(src) if src in dims else 1
        return _Layout(dst == n - 1 and dst != 1, before.count, True)
    return None


class UnitLayout:
    """Per module of ``model``: the axis of its output that holds the units.

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
        self._layouts: dict[str, _Layout] = {}
        self._walk(model, "", _DEFAULT)

    def _walk(self, module: nn.Module, name: str, before: _Layout) -> _Layout:
        own = _own(module, before)
        after = before
        for child_name, child in module.named_children():
            after = self._walk(child, f"{name}.{child_name}" if name else child_name, after)
        if own is not None:
            after = own
        elif after.fixed or after is not before:
            after = _Layout(after.last, after.count, False)  # follows what ran before it
        self._layouts[name] = after
        return after

    def axis(self, name: str, t: torch.Tensor) -> int:
        """The axis of ``t`` (module ``name``'s output) that holds the units: 1 or ``t.dim() - 1``."""
        if t.dim() < 3:
            return 1
        layout = self._layouts.get(name, _DEFAULT)
        last = t.dim() - 1
        preferred, other = (last, 1) if layout.last else (1, last)
        if layout.fixed or layout.count is None or t.shape[preferred] == layout.count:
            return preferred
        return other if t.shape[other] == layout.count else preferred

    def first(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` with the units on dim 1 (a view)."""
        axis = self.axis(name, t)
        return t if axis == 1 else t.movedim(axis, 1)
