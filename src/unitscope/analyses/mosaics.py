"""Mosaics of a unit's top-k inputs with the receptive field of its maximum marked or cropped.

Each top input (read from the dataset by its index in a ``topk`` table) is shown as the network sees
it, rescaled to [0, 1] per image. The analytic receptive field (:func:`unitscope.receptive_fields`:
``rf_size``, ``jump``, ``start``) of the cell that held the maximum is either outlined
(``mode="mark"``) or cut out (``mode="crop"``, padded with grey where the field leaves the image),
and the images are tiled into one picture per unit, saved as PNG and shown in the report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..models.modes import restores_model
from .occlusion import LayerRF, layer_rf
from .topk import check_k

MODES = ("mark", "crop")
#: what :func:`unit_mosaics` draws: the two :func:`mosaic` modes, or ``"segment"`` (mark, and dim what
#: lies outside Zhou's segmentation by the unit's map)
UNIT_MODES = (*MODES, "segment")


def rf_boxes(rf: LayerRF, locations: torch.Tensor) -> torch.Tensor:
    """Pixel boxes ``(K, 4)`` = ``(y0, y1, x0, x1)`` (end exclusive, not clipped) of the receptive
    fields of the map cells ``locations`` ``(K, 2)``.

    Example:
        >>> rf_boxes(LayerRF(size=3, jump=2, start=1.5), torch.tensor([[0, 2]])).tolist()
        [[0, 3, 4, 7]]
    """
    centre = rf.centre(locations)
    lo = torch.floor(centre - (rf.size - 1) / 2 + 1e-9).to(torch.int64)
    side = math.ceil(rf.size)
    return torch.stack([lo[:, 0], lo[:, 0] + side, lo[:, 1], lo[:, 1] + side], 1)


def display_images(images: torch.Tensor) -> torch.Tensor:
    """``(K, C, H, W)`` network inputs as ``(K, 3, H, W)`` pictures in [0, 1] (min-max per image;
    one channel is repeated to grey, more than three keep the first three)."""
    x = images.detach().to(torch.float32)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        x = x[:, :3] if x.shape[1] > 3 else torch.cat([x, x[:, :1].expand(-1, 3 - x.shape[1], -1, -1)], 1)
    flat = x.flatten(1)
    lo, hi = flat.amin(1)[:, None, None, None], flat.amax(1)[:, None, None, None]
    return ((x - lo) / (hi - lo).clamp(min=1e-12)).clamp(0, 1)


def overlay(pics: torch.Tensor, maps: torch.Tensor, alpha: float = 0.7) -> torch.Tensor:
    """Blend discrepancy ``maps`` ``(K, H, W)`` (scaled to [0, 1] per map, NaN as 0) into pictures
    ``(K, 3, H, W)`` as a red-yellow heat overlay (silver-system's third mosaic row, in colour)."""
    m = torch.nan_to_num(maps.to(pics.dtype), nan=0.0).clamp(min=0)
    m = (m / m.flatten(1).amax(1).clamp(min=1e-12)[:, None, None])[:, None]
    heat = torch.cat([torch.ones_like(m), m, torch.zeros_like(m)], 1)
    grey = pics.mean(1, keepdim=True).expand_as(pics) * 0.6
    return (grey * (1 - alpha * m) + heat * alpha * m).clamp(0, 1)


def mosaic(images: torch.Tensor, boxes: torch.Tensor, mode: str = "mark", nrow: int | None = None,
           colour: Sequence[float] = (1.0, 0.1, 0.1), padding: int = 2,
           maps: torch.Tensor | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Tile ``images`` ``(K, C, H, W)`` into one ``(3, H', W')`` picture with their ``boxes``.

    Args:
        images: the inputs as the network sees them.
        boxes: ``(K, 4)`` from :func:`rf_boxes`.
        mode: ``"mark"`` outlines each box (2 px, clipped to the image); ``"crop"`` shows only the
            box (grey outside the image).
        nrow: images per row (default ``ceil(sqrt(K))``).
        colour: RGB of the outline.
        padding: pixels between tiles.
        maps: optional discrepancy maps ``(K, H, W)`` (:func:`unitscope.analyses.occlusion.occlusion_maps`);
            a second row shows them over the images (``mode="mark"`` only), one row of ``K`` each.
        segments: optional ``(K, H, W)`` bool masks (:func:`unit_segments`); pixels outside are
            dimmed to a quarter.

    Example:
        >>> m = mosaic(torch.rand(4, 1, 10, 10), torch.tensor([[2, 7, 2, 7]] * 4))
        >>> tuple(m.shape)
        (3, 26, 26)
    """
    from torchvision.utils import make_grid

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use 'mark' (outline the receptive field) or 'crop'")
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (K, C, H, W) tensor, got {tuple(images.shape)}")
    if maps is not None and (mode != "mark" or maps.shape != (images.shape[0], *images.shape[2:])):
        raise ValueError(f"maps must be (K, H, W) = {(images.shape[0], *images.shape[2:])} and need "
                         f"mode='mark', got {tuple(maps.shape)} with mode={mode!r}")
    pics = display_images(images)
    heat = overlay(pics, maps) if maps is not None else None
    if segments is not None:
        if segments.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"segments must be (K, H, W) = {(images.shape[0], *images.shape[2:])}, got "
                             f"{tuple(segments.shape)}")
        pics = torch.where(segments[:, None].bool(), pics, pics * 0.25)
    k, _, h, w = pics.shape
    boxes = boxes.to(torch.int64)
    if mode == "crop":
        side_y, side_x = int(boxes[0, 1] - boxes[0, 0]), int(boxes[0, 3] - boxes[0, 2])
        pad = max(side_y, side_x)
        padded = nn.functional.pad(pics, (pad, pad, pad, pad), value=0.5)
        ry = boxes[:, 0, None] + pad + torch.arange(side_y)
        rx = boxes[:, 2, None] + pad + torch.arange(side_x)
        pics = padded[torch.arange(k)[:, None, None], :, ry[:, :, None], rx[:, None, :]].permute(0, 3, 1, 2)
    else:
        yy = torch.arange(h)[None, :, None]
        xx = torch.arange(w)[None, None, :]
        y0, y1 = boxes[:, 0, None, None], boxes[:, 1, None, None] - 1
        x0, x1 = boxes[:, 2, None, None], boxes[:, 3, None, None] - 1
        inside = (yy >= y0 - 1) & (yy <= y1 + 1) & (xx >= x0 - 1) & (xx <= x1 + 1)
        core = (yy > y0) & (yy < y1) & (xx > x0) & (xx < x1)
        edge = (inside & ~core)[:, None]
        paint = torch.tensor(list(colour), dtype=pics.dtype)[None, :, None, None]
        pics = torch.where(edge, paint, pics)
    if heat is not None:
        pics = torch.cat([pics, heat])
        nrow = k
    nrow = nrow or math.ceil(math.sqrt(k))
    return make_grid(pics.contiguous(), nrow=nrow, padding=padding, pad_value=1.0)


@restores_model
def unit_segments(model: nn.Module, layer: str, images: torch.Tensor, units: torch.Tensor,
                  threshold: float = 0.4) -> torch.Tensor:
    """Zhou's segmentation of inputs by a unit's feature map (``generate_unitsegments.m``).

    The unit's map on each image, in absolute value, is smoothed by a 3×3 mean (zero padding),
    divided by its
    maximum, upsampled bilinearly to the image size, and thresholded at ``threshold`` (0.4 in
    Zhou's toolkit for AlexNet-like networks; 0.2–0.5 elsewhere).

    Args:
        model, layer: the network and a layer with 2-D maps.
        images: ``(K, C, H, W)`` network inputs; units: ``(K,)`` the channel read on each.
        threshold: the fraction of the smoothed map's maximum kept.

    Returns:
        ``(K, H, W)`` bool masks (all False for a map that is zero everywhere).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False))
        >>> _ = nn.init.ones_(net[0].weight)
        >>> x = torch.zeros(1, 1, 8, 8)
        >>> x[0, 0, 1, 1] = 1.0
        >>> unit_segments(net, "0", x, torch.tensor([0]))[0, :3, :3].int().tolist()
        [[1, 1, 1], [1, 1, 1], [1, 1, 1]]
    """
    model.eval()  # batch statistics and dropout off; the decorator restores every flag
    from .occlusion import truncated_forward

    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold}: use a fraction of the maximum in (0, 1]")
    units = torch.as_tensor(units, dtype=torch.int64).reshape(-1)
    maps = truncated_forward(model, layer, images,
                             lambda t: t[torch.arange(t.shape[0]), units].detach().clone())
    if maps.dim() != 3:
        raise ValueError(f"layer {layer!r} has no 2-D maps to segment with; pick a conv, pool or "
                         "activation layer")
    # zero padding at the border, as MATLAB's imfilter does
    m = nn.functional.avg_pool2d(maps.abs().unsqueeze(1).to(torch.float32), 3, stride=1, padding=1,
                                 count_include_pad=True)
    m = m / m.flatten(1).amax(1).clamp(min=1e-30)[:, None, None, None]
    up = nn.functional.interpolate(m, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
    return (up[:, 0] > threshold) & (m.flatten(1).amax(1) > 0)[:, None, None]


def _item_x(item: Any) -> torch.Tensor:
    return item if isinstance(item, torch.Tensor) else item[0]


def unit_mosaics(model: nn.Module, data: Any, topk: pd.DataFrame,
                 units: Sequence[str | tuple[str, int]], k: int | None = None, mode: str = "mark",
                 nrow: int | None = None, maps: dict[str, torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
    """One mosaic per unit from a ``topk`` table: ``"layer:unit"`` -> ``(3, H', W')`` in [0, 1].

    Args:
        model: the network (for the analytic receptive fields).
        data: the dataset the table's ``index`` column refers to.
        topk: a table from :class:`unitscope.analyses.topk.TopK`.
        units: ``"layer:unit"`` strings or ``(layer, unit)`` pairs.
        k: how many top inputs, >= 1 (default all in the table).
        mode: ``"mark"`` or ``"crop"`` (see :func:`mosaic`), or ``"segment"``: marked, with what lies
            outside Zhou's segmentation (:func:`unit_segments`, threshold 0.4) dimmed.
        nrow: see :func:`mosaic`.
        maps: ``"layer:unit"`` -> discrepancy maps ``(k, H, W)`` of its top inputs in rank order
            (the ``"layer:unit:maps"`` arrays of
            :func:`unitscope.analyses.occlusion.empirical_receptive_fields`), shown in a second row.

    Example:
        >>> import unitscope
        >>> from unitscope.analyses.topk import TopK
        >>> model, data = unitscope.load_model("digits-cnn"), unitscope.load_dataset("digits", "test")
        >>> run = unitscope.analyze(model, data, layers="relu2", analyses=[TopK(k=4)], progress=False)
        >>> m = unit_mosaics(model, data, run.table("topk"), ["relu2:3"])
        >>> list(m), tuple(m["relu2:3"].shape)
        (['relu2:3'], (3, 22, 22))
    """
    from .topk import parse_unit, unit_topk

    if mode not in UNIT_MODES:
        raise ValueError(f"mode={mode!r}: use 'mark' (outline the receptive field), 'crop' or 'segment'")
    check_k(k)
    out: dict[str, torch.Tensor] = {}
    rfs: dict[str, LayerRF | None] = {}
    for spec in units:
        layer, unit = parse_unit(spec) if isinstance(spec, str) else (spec[0], int(spec[1]))
        rows = unit_topk(topk, layer, unit)
        if k is not None:
            rows = rows.head(k)
        images = torch.stack([_item_x(data[int(i)]) for i in rows["index"]])
        if layer not in rfs:
            rfs[layer] = layer_rf(model, layer, tuple(images.shape[-2:]))
        rf = rfs[layer]
        loc = torch.tensor(rows[["y", "x"]].to_numpy(), dtype=torch.int64)
        if rf is None or bool((loc < 0).any()):  # no map: the whole image is the field
            h, w = images.shape[-2:]
            boxes = torch.tensor([[0, h, 0, w]]).expand(len(rows), 4)
        else:
            boxes = rf_boxes(rf, loc)
        key = f"{layer}:{unit}"
        unit_maps = maps.get(key) if maps is not None else None
        if unit_maps is not None:
            unit_maps = unit_maps[:len(rows)]
            images, boxes = images[:len(unit_maps)], boxes[:len(unit_maps)]
        segments = None
        if mode == "segment":
            segments = unit_segments(model, layer, images, torch.full((len(images),), unit))
        out[key] = mosaic(images, boxes, mode="crop" if mode == "crop" else "mark", nrow=nrow,
                          maps=unit_maps, segments=segments)
    return out


def save_mosaics(mosaics: dict[str, torch.Tensor], out_dir: str | Path, scale: int = 1) -> list[Path]:
    """Write every mosaic as ``out_dir/<layer>_<unit>.png`` (``scale``× nearest upsampling)."""
    from torchvision.utils import save_image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, pic in mosaics.items():
        if scale > 1:
            pic = nn.functional.interpolate(pic[None], scale_factor=scale, mode="nearest")[0]
        path = out_dir / f"{key.replace(':', '_').replace('/', '_')}.png"
        save_image(pic, str(path))
        paths.append(path)
    return paths


def render_mosaics(run_dir: str | Path, units: Sequence[str], out: str | Path | None = None,
                   mode: str = "mark", k: int | None = None, scale: int = 2) -> list[Path]:
    """Render and save the mosaics of ``units`` from a saved run that holds a ``topk`` table.

    The model, weights and dataset are rebuilt from the run's recorded config (``unitscope run``
    writes it), so mosaics of any ranked unit can be drawn later without a new pass. This is what
    a ``unitscope mosaics RUN layer:unit ...`` command calls.

    Args:
        run_dir: a run directory with ``tables/topk.parquet`` and a config naming ``model`` and
            ``dataset``.
        units: ``"layer:unit"`` strings.
        out: where to write the PNGs (default ``RUN/mosaics``).
        mode, k: see :func:`unit_mosaics`; scale: see :func:`save_mosaics`.

    Returns:
        The written paths.
    """
    from ..data import load_dataset
    from ..models import load_model
    from ..results import load_run

    check_k(k)  # before the model and the dataset are loaded
    run = load_run(run_dir)
    if "topk" not in run.tables:
        raise ValueError(f"{run_dir} has no topk table; run a 'topk' experiment (or analyze with TopK) first")
    config = run.manifest.get("config") or {}
    missing = [key for key in ("model", "dataset", "split") if not config.get(key)]
    if missing:
        raise ValueError(f"{run_dir} records no {' or '.join(missing)} in its config, so its inputs cannot "
                         "be read back; call unit_mosaics(model, data, table, units) instead")
    model = load_model(config["model"], weights=config.get("weights"))
    data = load_dataset(config["dataset"], split=config["split"],
                        **(config.get("dataset_options") or {}))
    mosaics = unit_mosaics(model, data, run.tables["topk"], units, k=k, mode=mode)
    return save_mosaics(mosaics, out if out is not None else Path(run_dir) / "mosaics", scale=scale)


def plot_mosaics(mosaics: dict[str, torch.Tensor], cols: int = 3,
                 title: str = "top inputs per unit, receptive field of the maximum marked",
                 ax: Any = None) -> Any:
    """The mosaics side by side, titled by unit; returns the figure."""
    from matplotlib.figure import Figure

    keys = list(mosaics)
    cols = max(1, min(cols, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    first = mosaics[keys[0]] if keys else torch.zeros(3, 1, 1)
    width = 3.4 if cols > 1 else 9.0
    height = width * first.shape[1] / max(first.shape[2], 1) + 0.4
    fig = Figure(figsize=(width * cols, height * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    for axis, key in zip(axes.flat, keys):
        axis.imshow(mosaics[key].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        axis.set_title(key, fontsize=9)
    fig.suptitle(title)
    return fig
