"""Occlusion discrepancy maps and empirical receptive fields (Zhou et al. 2015, §3.2).

For a unit ``c`` of layer ``ℓ`` and one of its top images ``x`` (see :mod:`unitscope.analyses.topk`):

1. ``a0`` is the unit's activation at its location ``(i*, j*)`` (the argmax of its map).
2. A ``k×k`` occluder slides over ``x`` on a grid of stride ``s`` (top-left corners
   ``0, s, …, ⌊(H−k)/s⌋·s``); ``a_p`` is the activation at the same location with window ``p``
   occluded, and ``d_p = |a0 − a_p|`` (or the signed ``a0 − a_p``) is the discrepancy.
3. The pixel-space map ``D(y)`` is the mean of ``d_p`` over the windows covering pixel ``y``
   (NaN where no window covers it).
4. Each map is pasted into a ``(2H−1)×(2W−1)`` canvas so that the unit's analytic RF centre
   ``start − ½ + J·(i*, j*)`` (a pixel index) lands in the middle; the canvases of the top images
   are averaged pixel by pixel over the images that cover that pixel.
5. The empirical RF is ``{R ≥ τ·max R}`` restricted to the connected component at the centre; its
   size is ``√area`` (the side of a square of the same area).

All occluded copies run in batches through the network **truncated at the layer** (a forward hook
raises :class:`unitscope.capture.StopForward` once the layer has run). With ``local=True`` (the
default) the analytic receptive field (:func:`unitscope.receptive_fields`) is used twice, exactly:
only the windows that intersect the unit's RF are evaluated (the others give ``d_p = 0``), and the
network runs on a crop of the image that holds the RF, aligned to the layer's stride. The crop's
baseline activation is checked against the full image's, so a model that the RF arithmetic does not
describe raises instead of giving wrong maps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..capture import StopForward, resolve_layers
from ..models.info import probe_dtype_device
from ..models.modes import preserved
from ..units import UnitLayout

log = logging.getLogger(__name__)

FILLS = ("uniform", "normal", "mean")
DISCREPANCIES = ("absolute", "signed")


class UnreachableLayerError(ValueError):
    """The truncated forward never reached the requested layer."""


# --------------------------------------------------------------------------- truncated forward
def layer_module(model: nn.Module, layer: str) -> nn.Module:
    """The module named ``layer``; an unknown name raises :class:`unitscope.LayerError` with hints."""
    modules = dict(model.named_modules())
    if isinstance(layer, str) and layer and layer in modules:
        return modules[layer]
    names = resolve_layers(model, layer)  # raises with the closest names when nothing matches
    raise ValueError(f"occlusion needs one layer name, but {layer!r} selects {len(names)} layers "
                     f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); name one of them")


def truncated_forward(model: nn.Module, layer: str, x: torch.Tensor,
                      select: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Run ``model`` on ``x`` only up to ``layer`` and return that layer's output.

    A forward hook on ``layer`` reads the output, units on dim 1 (a channels-last map is moved,
    see :class:`unitscope.units.UnitLayout`), through ``select`` when given (e.g. to keep
    one value per input), and raises :class:`unitscope.capture.StopForward`, so nothing after the
    layer is computed. The hook is removed in every case. A module called several times returns
    its first call.

    Raises:
        UnreachableLayerError: the forward finished without calling ``layer`` (a module that is
            defined but not used by ``forward``).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> tuple(truncated_forward(net, "1", torch.randn(5, 3)).shape)
        (5, 4)
    """
    module = layer_module(model, layer)
    units = UnitLayout(model)
    box: dict[str, torch.Tensor] = {}

    def hook(mod: nn.Module, args: Any, output: Any) -> None:
        t = units.first(layer, output if isinstance(output, torch.Tensor) else output[0])
        box["out"] = select(t) if select is not None else t.detach().clone()
        raise StopForward

    handles = [module.register_forward_hook(hook), units.watch([layer])]
    try:
        with torch.inference_mode():
            model(x)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if "out" not in box:
        raise UnreachableLayerError(
            f"layer {layer!r} ({type(module).__name__}) never ran in the forward of "
            f"{type(model).__name__}: it is defined but not on the path from input to output, so a "
            "forward truncated there cannot reach it; pick a layer that the forward calls")
    return box["out"]


# --------------------------------------------------------------------------- geometry
def occluder_positions(height: int, width: int, occluder: int, stride: int) -> torch.Tensor:
    """Top-left corners ``(P, 2)`` of the occluder windows, row-major; ``P = ny·nx``.

    Example:
        >>> occluder_positions(5, 4, 3, 2).tolist()
        [[0, 0], [2, 0]]
    """
    if occluder < 1 or stride < 1:
        raise ValueError(f"occluder ({occluder}) and stride ({stride}) must be positive integers")
    if occluder > height or occluder > width:
        raise ValueError(f"the occluder ({occluder}×{occluder}) is larger than the image "
                         f"({height}×{width}); use occluder <= {min(height, width)}")
    ys = torch.arange(0, height - occluder + 1, stride)
    xs = torch.arange(0, width - occluder + 1, stride)
    return torch.cartesian_prod(ys, xs).reshape(-1, 2)


@dataclass(frozen=True)
class LayerRF:
    """The analytic receptive field of a layer: size, jump (total stride), start (0.5 = pixel 0).

    ``upsampled``: an upsampling step lies before the layer, so size and start are averages over
    the units' positions, not every unit's field.
    """

    size: float
    jump: float
    start: float
    upsampled: bool = False

    def centre(self, loc: torch.Tensor) -> torch.Tensor:
        """Pixel index (0-based, may be fractional) of the RF centre of cells ``loc`` ``(..., 2)``."""
        return self.start - 0.5 + self.jump * loc.to(torch.float64)


def layer_rf(model: nn.Module, layer: str, input_size: tuple[int, int]) -> LayerRF | None:
    """The analytic RF of ``layer`` for images of ``input_size`` (None for a layer without a 2-D map)."""
    from .receptive_fields import receptive_fields

    table = receptive_fields(model, input_size)
    rows = table[table["layer"] == layer]
    if rows.empty:
        return None
    row = rows.iloc[0]
    return LayerRF(float(row["rf_size"]), float(row["jump"]), float(row["start"]),
                   layer in table.attrs.get("upsampled", ()))


# --------------------------------------------------------------------------- fills
def _hash_uniform(key: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float64 from int64 keys (splitmix64 finaliser): reproducible, chunk-invariant."""
    mask = (1 << 62) - 1 + (1 << 62)  # 2**63 - 1: emulates logical shifts on int64

    def shr(z: torch.Tensor, n: int) -> torch.Tensor:
        return (z >> n) & (mask >> (n - 1))

    z = key + 0x1E3779B97F4A7C15
    z = (z ^ shr(z, 30)) * -0x40A7B892E31B1A47
    z = (z ^ shr(z, 27)) * -0x6B2FB644ECCEEE15
    z = z ^ shr(z, 31)
    return shr(z, 11).to(torch.float64) / float(1 << 53)


def _image_stats(images: torch.Tensor) -> torch.Tensor:
    """Per image and channel ``(M, C, 4)``: min, max, mean and std, the parameters of the fills."""
    flat = images.flatten(2).to(torch.float64)
    return torch.stack([flat.amin(2), flat.amax(2), flat.mean(2), flat.std(2, correction=0)], -1)


def _fill_values(kind: str | float, stats: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor,
                 seed: int, occluder: int, dtype: torch.dtype) -> torch.Tensor:
    """The occluder patch ``(B, C, k, k)`` of every row, from its image's ``stats`` ``(B, C, 4)``.

    ``ids`` are the image ids and ``pos`` the position numbers of the rows; noise depends only on
    ``(seed, id, position, channel, pixel)``, so it does not depend on batching or cropping.
    """
    b, c = stats.shape[:2]
    dev = stats.device
    if not isinstance(kind, str):
        return torch.full((b, c, occluder, occluder), float(kind), dtype=dtype, device=dev)
    lo, hi, mean, std = (stats[..., i, None, None] for i in range(4))
    if kind == "mean":
        return mean.expand(b, c, occluder, occluder).to(dtype)
    cell = torch.arange(c * occluder * occluder, device=dev).reshape(1, c, occluder, occluder)
    base = ((seed * 1_000_003 + ids) * 10_000_019 + pos) * (2 * c * occluder * occluder)
    u1 = _hash_uniform(base[:, None, None, None] + 2 * cell)
    if kind == "uniform":
        out = lo + u1 * (hi - lo)
    else:  # normal with the image's channel mean and std (Box-Muller)
        u2 = _hash_uniform(base[:, None, None, None] + 2 * cell + 1)
        out = mean + torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2 * math.pi * u2) * std
    return out.to(dtype)


def _check_fill(fill: str | float) -> None:
    if isinstance(fill, str) and fill not in FILLS:
        raise ValueError(f"fill={fill!r}: use 'uniform' (noise between the image's channel min and "
                         "max), 'normal' (noise with its channel mean and std), 'mean' or a number")


# --------------------------------------------------------------------------- discrepancy maps
@dataclass
class OcclusionMaps:
    """Discrepancy maps of ``M`` (image, unit) pairs.

    Attributes:
        grid: ``(M, ny, nx)`` float64, ``d_p`` per occluder position (exactly 0 where the window
            cannot reach the unit and was not evaluated).
        evaluated: ``(M, ny, nx)`` bool, the positions that ran through the network.
        maps: ``(M, H, W)`` float64, the mean of ``d_p`` over the windows covering each pixel
            (NaN where no window covers it).
        baseline: ``(M,)`` float64, the unit's activation on the unoccluded image.
        units: ``(M,)`` int64; locations: ``(M, 2)`` int64 (``-1`` for layers without a map).
        occluder, stride: the sweep.
    """

    grid: torch.Tensor
    evaluated: torch.Tensor
    maps: torch.Tensor
    baseline: torch.Tensor
    units: torch.Tensor
    locations: torch.Tensor
    occluder: int
    stride: int


def pixel_maps(grid: torch.Tensor, occluder: int, stride: int, size: tuple[int, int]) -> torch.Tensor:
    """Paint grid discrepancies ``(M, ny, nx)`` into pixel space ``(M, H, W)``: the mean over covering
    windows, as two transposed convolutions with a ``k×k`` box; NaN where no window covers a pixel.

    Example:
        >>> pixel_maps(torch.tensor([[[1.0, 3.0]]]), 2, 1, (2, 4))[0, 0].tolist()
        [1.0, 2.0, 3.0, nan]
    """
    box = torch.ones(1, 1, occluder, occluder, dtype=torch.float64, device=grid.device)
    g = grid.to(torch.float64).unsqueeze(1)
    total = nn.functional.conv_transpose2d(g, box, stride=stride)
    count = nn.functional.conv_transpose2d(torch.ones_like(g[:1]), box, stride=stride)
    h, w = size
    total = nn.functional.pad(total, (0, w - total.shape[-1], 0, h - total.shape[-2]))[:, 0]
    count = nn.functional.pad(count, (0, w - count.shape[-1], 0, h - count.shape[-2]))[:, 0]
    return torch.where(count > 0, total / count.clamp(min=1), torch.nan)


def _readout(units: torch.Tensor, ly: torch.Tensor,
             lx: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def select(t: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(t.shape[0], device=t.device).reshape(-1, *[1] * (units.dim() - 1))
        if t.dim() == 2:
            return t[rows, units].to(torch.float64)
        return t[rows, units, ly, lx].to(torch.float64)
    return select


def occlusion_maps(model: nn.Module, layer: str, images: torch.Tensor, units: torch.Tensor,
                   locations: torch.Tensor | None = None, *, occluder: int = 11, stride: int = 3,
                   fill: str | float = "uniform", discrepancy: str = "absolute", local: bool = True,
                   batch_size: int = 256, device: str | torch.device = "auto", seed: int = 0,
                   image_ids: torch.Tensor | None = None, draws: int = 1) -> OcclusionMaps:
    """Occlusion discrepancy maps of many (image, unit) pairs, batched through a truncated network.

    Args:
        model: the network (put in eval mode for the sweep, restored afterwards).
        layer: the name of the layer whose units are read.
        images: ``(M, C, H, W)``, exactly the tensors the network sees (cast to the dtype of
            its parameters: float32 images for a float64 model run in float64), one per pair (an
            image may repeat for several units).
        units: ``(M,)`` channel (conv) or feature (linear) index of every pair.
        locations: ``(M, 2)`` map cell ``(i*, j*)`` read for every pair; default the argmax of the
            unit's map on the unoccluded image (the first in row-major order, as in TopK).
        occluder: side ``k`` of the square occluder (Zhou et al.: 11).
        stride: step ``s`` of the occluder grid (Zhou et al.: 3).
        fill: ``"uniform"`` noise between the image's per-channel min and max (the default, "a
            patch of random pixels"), ``"normal"`` noise with its channel mean and std, ``"mean"``
            (the channel mean) or a number. Noise is seeded by ``(seed, image id, position)``.
        discrepancy: ``"absolute"`` ``|a0 − a_p|`` or ``"signed"`` ``a0 − a_p``.
        local: evaluate only windows inside the unit's analytic RF, on a crop holding that RF
            (exact; see the module docstring). ``False`` runs every window on the whole image.
        batch_size: occluded copies per forward.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        seed: seed of the noise fills.
        image_ids: ``(M,)`` ids that seed the noise (default ``0..M−1``); pairs with the same id
            get the same occluders (pass dataset indices).
        draws: average the discrepancies over this many noise draws (seeds ``seed, seed + 1, …``);
            only for the noise fills.

    Returns:
        An :class:`OcclusionMaps`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
        >>> r = occlusion_maps(net, "1", torch.rand(2, 1, 12, 12), torch.tensor([0, 1]),
        ...                    occluder=3, stride=3, device="cpu")
        >>> tuple(r.grid.shape), tuple(r.maps.shape)
        ((2, 4, 4), (2, 12, 12))
    """
    from ..engine import resolve_device

    if images.dim() != 4 or not torch.is_floating_point(images):
        raise ValueError(f"images must be a float tensor (M, C, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    if discrepancy not in DISCREPANCIES:
        raise ValueError(f"discrepancy={discrepancy!r}: use 'absolute' or 'signed'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_fill(fill)
    if draws < 1 or (draws > 1 and fill not in ("uniform", "normal")):
        raise ValueError(f"draws={draws}: use draws >= 1, and draws > 1 only with a noise fill "
                         "('uniform' or 'normal'); other fills are the same every time")
    m, _, h, w = images.shape
    pos = occluder_positions(h, w, occluder, stride)
    ny, nx = len(range(0, h - occluder + 1, stride)), len(range(0, w - occluder + 1, stride))
    units = torch.as_tensor(units, dtype=torch.int64).reshape(-1)
    if units.shape[0] != m:
        raise ValueError(f"units has {units.shape[0]} entries for {m} images; give one unit per image")
    if m == 0:
        raise ValueError("no images given: pass at least one (image, unit) pair")
    ids = torch.arange(m) if image_ids is None else torch.as_tensor(image_ids, dtype=torch.int64).reshape(-1)
    if ids.shape[0] != m:
        raise ValueError(f"image_ids has {ids.shape[0]} entries for {m} images; give one id per image")
    dev = resolve_device(device)
    layer_module(model, layer)
    rf = None
    if local:
        try:
            rf = layer_rf(model, layer, (h, w))
        except ValueError as exc:  # reported; the sweep stays exact without the RF, only slower
            log.warning("occlusion: no analytic receptive field for %s (%s); every window is "
                        "evaluated on the whole image", layer, exc)
        if rf is not None and rf.upsampled:
            log.warning("occlusion: an upsampling step lies before %s, so its analytic receptive field "
                        "is an average over the units' positions, not each unit's field; every window "
                        "is evaluated on the whole image", layer)
            rf = None
    with preserved(model):
        model.eval().to(dev)
        x = images.to(dev, probe_dtype_device(model)[0] or images.dtype)  # in the model's dtype
        units_d = units.to(dev)
        a0, loc, spatial = _baseline(model, layer, x, units_d, locations, batch_size)
        if rf is not None and spatial:
            box, reach = _local_geometry(rf, loc, pos.to(dev), occluder, (h, w))
        else:
            box = torch.tensor([[0, h, 0, w]], device=dev).expand(m, 4)
            reach = torch.ones(m, len(pos), dtype=torch.bool, device=dev)
        grid = torch.zeros(m, len(pos), dtype=torch.float64, device=dev)
        jump = int(rf.jump) if rf is not None and spatial else 1
        for size in torch.unique(box[:, [1, 3]] - box[:, [0, 2]], dim=0).tolist():
            sel = torch.nonzero(((box[:, 1] - box[:, 0]) == size[0])
                                & ((box[:, 3] - box[:, 2]) == size[1])).flatten()
            for draw in range(draws):
                grid[sel] += _sweep(model, layer, x, sel, box, loc, jump, units_d, a0, reach, pos.to(dev),
                                    ids.to(dev), tuple(size), fill, discrepancy, occluder, batch_size,
                                    seed + draw) / draws
    grid = grid.reshape(m, ny, nx).cpu()
    return OcclusionMaps(grid=grid, evaluated=reach.reshape(m, ny, nx).cpu(),
                         maps=pixel_maps(grid, occluder, stride, (h, w)), baseline=a0.cpu(),
                         units=units, locations=loc.cpu(), occluder=occluder, stride=stride)


def _baseline(model: nn.Module, layer: str, x: torch.Tensor, units: torch.Tensor,
              locations: torch.Tensor | None, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The unoccluded activation and location of every pair, and whether the layer has a 2-D map;
    only those values are kept from each batch's output, not the maps."""
    given = None if locations is None else torch.as_tensor(locations).to(x.device).reshape(len(x), -1)
    values, locs, spatial = [], [], []
    for i in range(0, len(x), batch_size):
        part = slice(i, i + batch_size)

        def pick(t: torch.Tensor, part: slice = part) -> torch.Tensor:
            loc = _locations(t, units[part], None if given is None else given[part], layer)
            locs.append(loc)
            spatial.append(t.dim() == 4)
            return _readout(units[part], loc[:, 0], loc[:, 1])(t)

        values.append(truncated_forward(model, layer, x[part], pick))
    return torch.cat(values), torch.cat(locs), spatial[0]


def _locations(out0: torch.Tensor, units: torch.Tensor, locations: torch.Tensor | None,
               layer: str) -> torch.Tensor:
    m, c = out0.shape[:2]
    bad = (units < 0) | (units >= c)
    if bad.any():
        raise ValueError(f"unit {int(units[bad][0])} is out of range: layer {layer!r} has {c} units "
                         f"(0..{c - 1})")
    if out0.dim() == 2:
        return torch.full((m, 2), -1, dtype=torch.int64, device=out0.device)
    if out0.dim() != 4:
        raise ValueError(f"layer {layer!r} outputs {out0.dim()}-D tensors; occlusion reads units of "
                         "(N, C, H, W) or (N, F) outputs")
    hh, ww = out0.shape[2:]
    if locations is None:
        flat = out0[torch.arange(m, device=out0.device), units].flatten(1).argmax(1)
        return torch.stack([flat // ww, flat % ww], 1)
    loc = torch.as_tensor(locations, dtype=torch.int64, device=out0.device).reshape(m, 2)
    outside = (loc[:, 0] < 0) | (loc[:, 0] >= hh) | (loc[:, 1] < 0) | (loc[:, 1] >= ww)
    if outside.any():
        raise ValueError(f"location {loc[outside][0].tolist()} is outside layer {layer!r}'s "
                         f"{hh}×{ww} map")
    return loc


def _local_geometry(rf: LayerRF, loc: torch.Tensor, pos: torch.Tensor, occluder: int,
                    size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, the crop box ``(y0, y1, x0, x1)`` that holds its RF and the windows that reach it."""
    centre = rf.centre(loc)
    half = (rf.size - 1) / 2
    lo = torch.floor(centre - half).to(torch.int64)
    hi = torch.ceil(centre + half).to(torch.int64)
    reach = ((pos[None, :, 0] <= hi[:, None, 0]) & (pos[None, :, 0] + occluder - 1 >= lo[:, None, 0])
             & (pos[None, :, 1] <= hi[:, None, 1]) & (pos[None, :, 1] + occluder - 1 >= lo[:, None, 1]))
    if not float(rf.jump).is_integer():
        full = torch.tensor([0, size[0], 0, size[1]], device=loc.device)
        return full.expand(len(loc), 4), reach
    j = int(rf.jump)
    start = (torch.div(lo.clamp(min=0), j, rounding_mode="floor") * j)
    stop = torch.minimum(hi + 1, torch.tensor(size, device=loc.device))
    stop = torch.maximum(stop, start + 1)
    return torch.stack([start[:, 0], stop[:, 0], start[:, 1], stop[:, 1]], 1), reach


def _shared_sweeps(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group pairs by ``key`` rows ``(n, 3)`` = (image id, location): one sweep per distinct key.

    Returns the representative pair of every sweep ``(S,)``, the sweep of every pair ``(n,)`` and
    the members table ``(S, width)`` (pair numbers, ``-1`` padding).
    """
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    n, dev = len(key), key.device
    count = torch.bincount(inverse)
    order = torch.argsort(inverse, stable=True)
    first = torch.cumsum(count, 0) - count
    slot = torch.empty_like(inverse)
    slot[order] = torch.arange(n, device=dev) - first[inverse[order]]
    members = torch.full((len(count), int(count.max())), -1, dtype=torch.int64, device=dev)
    members[inverse, slot] = torch.arange(n, device=dev)
    return members[:, 0], inverse, members


def _sweep(model: nn.Module, layer: str, x: torch.Tensor, sel: torch.Tensor, box: torch.Tensor,
           loc: torch.Tensor, jump: int, units: torch.Tensor, a0: torch.Tensor, reach: torch.Tensor,
           pos: torch.Tensor, ids: torch.Tensor, size: tuple[int, int], fill: str | float,
           discrepancy: str, occluder: int, batch_size: int, seed: int) -> torch.Tensor:
    """Discrepancies ``(len(sel), P)`` of the pairs ``sel``, whose crops all have ``size``.

    Pairs with the same image id and location (several units of one layer on one top image) share
    one sweep: each occluded copy is read for all of them.
    """
    hc, wc = size
    dev = x.device
    rep, inverse, members = _shared_sweeps(torch.stack([ids[sel], loc[sel, 0], loc[sel, 1]], 1))
    src = sel[rep]  # one pair per sweep: its image, crop box and location
    b = box[src]
    ry = b[:, 0, None] + torch.arange(hc, device=dev)
    rx = b[:, 2, None] + torch.arange(wc, device=dev)
    crops = x[src[:, None, None], :, ry[:, :, None], rx[:, None, :]].permute(0, 3, 1, 2).contiguous()
    ly = torch.where(loc[src, 0] >= 0, loc[src, 0] - b[:, 0] // jump, loc[src, 0])
    lx = torch.where(loc[src, 1] >= 0, loc[src, 1] - b[:, 2] // jump, loc[src, 1])
    u = units[sel]
    stats = _image_stats(x[src])
    base = torch.cat([truncated_forward(model, layer, crops[inverse[i:i + batch_size]],
                                        _readout(u[i:i + batch_size], ly[inverse[i:i + batch_size]],
                                                 lx[inverse[i:i + batch_size]]))
                      for i in range(0, len(sel), batch_size)])
    scale = float(a0[sel].abs().max()) if len(sel) else 0.0
    tol = 1e-4 if dev.type == "cpu" else 1e-2  # CUDA convolutions may round in TF32
    if not torch.allclose(base, a0[sel], rtol=tol, atol=0.1 * tol * max(scale, 1.0)):
        worst = int((base - a0[sel]).abs().argmax())
        raise RuntimeError(
            f"occlusion(local=True): layer {layer!r} unit {int(u[worst])} reads {float(base[worst]):.6g} "
            f"on the crop that holds its analytic receptive field but {float(a0[sel][worst]):.6g} on "
            "the whole image, so the RF arithmetic does not describe this model (a branch, global "
            "operation or ceil-mode pooling before the layer); pass local=False")
    rows = torch.nonzero(reach[src])  # (R, 2): sweep, position number
    out = torch.zeros(len(sel), len(pos), dtype=torch.float64, device=dev)
    member_units = u[members.clamp(min=0)]
    ar_h, ar_w = torch.arange(hc, device=dev), torch.arange(wc, device=dev)
    for start in range(0, len(rows), batch_size):
        r = rows[start:start + batch_size]
        sw, p = r[:, 0], r[:, 1]
        img = crops[sw]
        oy = pos[p, 0] - b[sw, 0]
        ox = pos[p, 1] - b[sw, 2]
        dy = ar_h[None, :] - oy[:, None]
        dx = ar_w[None, :] - ox[:, None]
        mask = (((dy >= 0) & (dy < occluder))[:, None, :, None]
                & ((dx >= 0) & (dx < occluder))[:, None, None, :])
        patch = _fill_values(fill, stats[sw], ids[src[sw]], p, seed, occluder, img.dtype)
        c = patch.shape[1]
        gy = dy.clamp(0, occluder - 1)[:, None, :, None].expand(-1, c, -1, occluder)
        full = patch.gather(2, gy)
        gx = dx.clamp(0, occluder - 1)[:, None, None, :].expand(-1, c, hc, -1)
        full = full.gather(3, gx)
        occluded = torch.where(mask, full, img)
        vals = truncated_forward(model, layer, occluded,
                                 _readout(member_units[sw], ly[sw, None], lx[sw, None]))  # (B, width)
        who = members[sw]
        valid = who >= 0
        d = base[who.clamp(min=0)] - vals
        d = d.abs() if discrepancy == "absolute" else d
        out[who[valid], p[:, None].expand_as(who)[valid]] = d[valid]
    return out


# --------------------------------------------------------------------------- empirical RF
def centre_maps(maps: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste maps ``(M, H, W)`` into ``(M, 2H−1, 2W−1)`` canvases with ``centres`` ``(M, 2)`` (pixel
    indices, rounded half up) at the middle ``(H−1, W−1)``; returns the canvases (0 where invalid)
    and the validity masks (the pixel came from the image and was covered by a window).

    Example:
        >>> c, v = centre_maps(torch.tensor([[[1.0, 2.0]]]), torch.tensor([[0, 1]]))
        >>> c[0].tolist(), v[0].tolist()
        ([[1.0, 2.0, 0.0]], [[True, True, False]])
    """
    m, h, w = maps.shape
    c = torch.floor(centres.to(torch.float64) + 0.5).to(torch.int64)
    c = torch.stack([c[:, 0].clamp(0, h - 1), c[:, 1].clamp(0, w - 1)], 1)  # a centre in the padding
    oy = (h - 1) - c[:, 0]
    ox = (w - 1) - c[:, 1]
    canvas = torch.zeros(m, 2 * h - 1, 2 * w - 1, dtype=torch.float64)
    valid = torch.zeros(m, 2 * h - 1, 2 * w - 1, dtype=torch.bool)
    ry = (oy[:, None] + torch.arange(h))[:, :, None].expand(m, h, w)
    rx = (ox[:, None] + torch.arange(w))[:, None, :].expand(m, h, w)
    rows = torch.arange(m)[:, None, None].expand(m, h, w)
    ok = ~torch.isnan(maps)
    canvas[rows, ry, rx] = torch.where(ok, maps.to(torch.float64), 0.0)
    valid[rows, ry, rx] = ok
    return canvas, valid


@dataclass
class EmpiricalRF:
    """Averaged, thresholded discrepancy maps of ``U`` units (canvases ``(2H−1)×(2W−1)``).

    Attributes:
        maps: ``(U, 2H−1, 2W−1)`` float64 averages (NaN where no image covers a pixel).
        counts: ``(U, 2H−1, 2W−1)`` int64, how many images cover each pixel.
        masks: ``(U, 2H−1, 2W−1)`` bool thresholded RF (the component at the centre).
        sizes: ``(U,)`` float64 ``√area`` of the masks in pixels; NaN for a unit whose averaged
            map has no positive value (occlusion never changed it, e.g. a dead unit): it has no
            field, which is not a field of size 0.
        centred: ``(U,)`` bool: the centre is above the threshold, so the mask is the component
            at the centre (the spec's definition). False: the centre is below it and the mask is
            the component at the map's peak instead, an off-centre field to read with care.
    """

    maps: torch.Tensor
    counts: torch.Tensor
    masks: torch.Tensor
    sizes: torch.Tensor
    centred: torch.Tensor


def average_centred(canvas: torch.Tensor, valid: torch.Tensor, group: torch.Tensor,
                    threshold: float = 0.5) -> EmpiricalRF:
    """Average centred maps per group (unit) and threshold them at ``threshold · max``.

    ``R = Σ canvas / Σ valid`` over each group's maps; the RF mask is ``R ≥ threshold · max R``
    restricted to its connected component (8-neighbourhood) at the canvas centre, or at the
    maximum when the centre is below threshold. The size is ``√area``.

    Args:
        canvas, valid: from :func:`centre_maps`.
        group: ``(M,)`` group number ``0..U−1`` of every map.
        threshold: the fraction ``τ`` of the maximum (Zhou's toolkit segments at 0.4–0.5).
    """
    import numpy as np
    from scipy import ndimage

    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold}: use a fraction of the maximum in (0, 1]")
    group = torch.as_tensor(group, dtype=torch.int64)
    n = int(group.max()) + 1 if len(group) else 0
    shape = (n, *canvas.shape[1:])
    total = torch.zeros(shape, dtype=torch.float64).index_add_(0, group, canvas)
    counts = torch.zeros(shape, dtype=torch.int64).index_add_(0, group, valid.to(torch.int64))
    maps = torch.where(counts > 0, total / counts.clamp(min=1), torch.nan)
    filled = torch.nan_to_num(maps, nan=-torch.inf)
    peak = filled.flatten(1).amax(1)
    above = (filled >= threshold * peak[:, None, None]) & (peak[:, None, None] > 0)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, _ = ndimage.label(above.numpy(), structure=structure)
    labels = torch.from_numpy(labels)
    cy, cx = (shape[1] - 1) // 2, (shape[2] - 1) // 2
    at_centre = labels[:, cy, cx]
    at_peak = labels.flatten(1).gather(1, filled.flatten(1).argmax(1, keepdim=True))[:, 0]
    chosen = torch.where(at_centre > 0, at_centre, at_peak)
    masks = (labels == chosen[:, None, None]) & (chosen[:, None, None] > 0)
    sizes = masks.flatten(1).sum(1).to(torch.float64).sqrt()
    sizes = torch.where(peak > 0, sizes, torch.nan)
    return EmpiricalRF(maps=maps, counts=counts, masks=masks, sizes=sizes, centred=at_centre > 0)


def empirical_receptive_fields(model: nn.Module, data: Any, layer: str, units: list[int],
                               topk: pd.DataFrame, *, k: int = 10, occluder: int = 11, stride: int = 3,
                               fill: str | float = "uniform", discrepancy: str = "absolute",
                               threshold: float = 0.5, centre: str = "rf", local: bool = True,
                               batch_size: int = 256, device: str | torch.device = "auto", seed: int = 0,
                               draws: int = 1) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """The empirical RF of ``units`` of ``layer`` from their top-``k`` images (Zhou et al. 2015).

    Args:
        model, layer: the network and the layer of the units.
        data: the dataset the ``topk`` table indexes (items ``x`` or ``(x, y, ...)``).
        units: channel numbers.
        topk: a ``topk`` table (:class:`unitscope.analyses.topk.TopK`) holding those units.
        k: how many top images per unit, >= 1 (at most those in the table).
        threshold: fraction of the averaged map's maximum that bounds the RF.
        centre: ``"rf"`` centres each map on the analytic RF centre of the unit's location (Zhou's
            "spatial location of the unit"); ``"argmax"`` on the map's own maximum (as DNNBrain
            does), which also serves layers without a 2-D map (their ``rf_size`` is NaN).
        Others: see :func:`occlusion_maps`.

    Returns:
        ``(table, arrays)``: one row per unit with ``layer, unit, images, rf_size_empirical,
        rf_area, rf_size`` (analytic), ``ratio`` (empirical / analytic) and ``centred`` (False
        when the centre is below the threshold and the field is the component at the peak); arrays
        ``"layer:unit"`` -> averaged map, ``"layer:unit:mask"`` -> thresholded mask (float) and
        ``"layer:unit:maps"`` -> the ``(k, H, W)`` pixel discrepancy maps of its top images in
        rank order.
    """
    from .topk import check_k, unit_topk

    check_k(k, "Zhou et al. use 10", required=True)
    rows = []
    for u in units:
        sel = unit_topk(topk, layer, int(u)).head(k)
        if len(sel) < k:
            raise ValueError(f"unit {layer}:{u} has {len(sel)} top images, fewer than k={k}; lower k "
                             "or rank a larger dataset")
        rows.append(sel)
    chosen = pd.concat(rows, ignore_index=True)
    idx = chosen["index"].astype("int64").tolist()
    images = torch.stack([_item_x(data[i]) for i in idx])
    loc = torch.tensor(chosen[["y", "x"]].to_numpy(), dtype=torch.int64)
    result = occlusion_maps(model, layer, images, torch.tensor(chosen["unit"].to_numpy()),
                            loc if bool((loc >= 0).all()) else None, occluder=occluder, stride=stride,
                            fill=fill, discrepancy=discrepancy, local=local, batch_size=batch_size,
                            device=device, seed=seed, image_ids=torch.tensor(idx), draws=draws)
    h, w = images.shape[-2:]
    try:
        rf = layer_rf(model, layer, (h, w))
    except ValueError:
        if centre != "argmax":
            raise
        rf = None  # argmax centring needs no RF; the table reports rf_size NaN
    if centre == "argmax":
        flat = torch.nan_to_num(result.maps, nan=-torch.inf).flatten(1).argmax(1)
        centres = torch.stack([flat // w, flat % w], 1)
    elif centre != "rf":
        raise ValueError(f"centre={centre!r}: use 'rf' (the unit's analytic RF centre) or 'argmax'")
    elif rf is None:
        raise ValueError(f"layer {layer!r} has no 2-D map, so its units have no location to centre "
                         "on; pick a conv, pool or activation layer, or pass centre='argmax'")
    else:
        centres = rf.centre(result.locations)
    canvas, valid = centre_maps(result.maps, centres)
    group = torch.arange(len(units)).repeat_interleave(k)
    erf = average_centred(canvas, valid, group, threshold)
    fieldless = [int(u) for u, size in zip(units, erf.sizes.tolist()) if math.isnan(size)]
    if fieldless:
        log.warning("units %s of %s: occluding their top images never changed them (a dead or "
                    "constant unit), so they have no empirical RF (NaN, left out of the layer's mean)",
                    fieldless, layer)
    table = pd.DataFrame({
        "layer": layer, "unit": [int(u) for u in units], "images": k,
        "rf_size_empirical": erf.sizes.numpy(), "rf_area": erf.masks.flatten(1).sum(1).numpy(),
        "rf_size": rf.size if rf is not None else float("nan"),
        "ratio": erf.sizes.numpy() / (rf.size if rf is not None else float("nan")),
        "centred": erf.centred.numpy(),
    })
    arrays = {}
    for i, u in enumerate(units):
        arrays[f"{layer}:{int(u)}"] = erf.maps[i].to(torch.float32)
        arrays[f"{layer}:{int(u)}:mask"] = erf.masks[i].to(torch.float32)
        arrays[f"{layer}:{int(u)}:maps"] = result.maps[group == i].to(torch.float32)
    return table, arrays


def _item_x(item: Any) -> torch.Tensor:
    return item if isinstance(item, torch.Tensor) else item[0]


def summarize_layers(table: pd.DataFrame) -> pd.DataFrame:
    """Per layer: units, mean and std of the empirical RF size, the analytic size, their ratio.

    Units without a field (``rf_size_empirical`` NaN) are left out of the mean and std and
    counted in ``no_field``.
    """
    g = table.groupby("layer", sort=False)
    out = pd.DataFrame({
        "units": g["unit"].count(),
        "no_field": g["unit"].count() - g["rf_size_empirical"].count(),  # count() leaves NaN out
        "rf_size_empirical": g["rf_size_empirical"].mean(),
        "rf_size_empirical_std": g["rf_size_empirical"].std(ddof=0),
        "rf_size": g["rf_size"].first(),
    }).reset_index()
    out["ratio"] = out["rf_size_empirical"] / out["rf_size"]
    return out


# --------------------------------------------------------------------------- figures
def plot_empirical_rf(arrays: dict[str, torch.Tensor], table: pd.DataFrame | None = None,
                      ax: Any = None) -> Any:
    """The averaged discrepancy maps of the units in ``arrays`` with their RF outline; returns the figure.

    ``arrays`` maps ``"layer:unit"`` to an averaged map and ``"layer:unit:mask"`` to its mask (as
    returned by :func:`empirical_receptive_fields`).
    """
    from matplotlib.figure import Figure

    keys = [key for key in arrays if not key.endswith((":mask", ":maps"))]
    cols = min(4, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    fig = Figure(figsize=(2.6 * cols, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    for axis, key in zip(axes.flat, keys):
        rf = arrays[key].to(torch.float64)
        mask = arrays.get(f"{key}:mask")
        window = _support_window(rf)
        axis.imshow(rf[window].numpy(), cmap="magma")
        if mask is not None and bool(mask.any()):
            axis.contour(mask[window].numpy(), levels=[0.5], colors="cyan", linewidths=0.8)
        title = key
        if table is not None:
            layer, unit = key.rsplit(":", 1)
            hit = table[(table["layer"] == layer) & (table["unit"] == int(unit))]
            if not hit.empty:
                size, analytic = hit["rf_size_empirical"].iloc[0], hit["rf_size"].iloc[0]
                title += f"\n{size:.0f} px (analytic {analytic:.0f})"
        axis.set_title(title, fontsize=8)
    fig.suptitle("empirical receptive fields (centred, averaged discrepancy)")
    return fig


def _support_window(rf: torch.Tensor) -> tuple[slice, slice]:
    """A square around the canvas centre that holds every non-zero pixel (plus a margin)."""
    cy, cx = (rf.shape[0] - 1) // 2, (rf.shape[1] - 1) // 2
    nz = torch.nonzero(torch.nan_to_num(rf) != 0)
    half = int((nz - torch.tensor([cy, cx])).abs().max()) + 3 if len(nz) else 5
    half = min(half, cy, cx)
    return slice(cy - half, cy + half + 1), slice(cx - half, cx + half + 1)


def plot_rf_sizes(layers: pd.DataFrame, ax: Any = None) -> Any:
    """Empirical (mean ± std over units) and analytic RF size per layer; returns the figure."""
    from matplotlib.figure import Figure

    if ax is None:
        fig = Figure(figsize=(max(5.0, 0.8 * len(layers) + 2), 3.5), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    x = list(range(len(layers)))
    ax.bar([i - 0.2 for i in x], layers["rf_size_empirical"], 0.4,
           yerr=layers["rf_size_empirical_std"], label="empirical (mean over units)")
    ax.bar([i + 0.2 for i in x], layers["rf_size"], 0.4, label="analytic")
    ax.set_xticks(x, layers["layer"], rotation=45)
    ax.set_ylabel("receptive field size (px)")
    ax.legend()
    return fig
