"""Top-k inputs per unit: the k dataset items that drive each unit hardest, and where.

For every unit (a channel of a conv layer, a feature of a linear layer) the analysis keeps the k
largest scores with their global dataset indices and the spatial position of the maximum, in the
streaming, exactly mergeable :class:`unitscope.stats.topk.TopK` accumulator (values descending,
ties broken by the smaller dataset index). Memory is O(units · k) whatever the dataset size, so all
ReLU layers of AlexNet fit at once. This is step 1 of Zhou et al. (2015), "Object detectors emerge
in deep scene CNNs", §3.2: the top-ranked images of a unit, later occluded to map its empirical
receptive field (:mod:`unitscope.analyses.occlusion`) and shown as mosaics
(:mod:`unitscope.analyses.mosaics`).
"""

from __future__ import annotations

import logging
import numbers
from typing import Any

import pandas as pd
import torch

from ..capture import LayerSpec
from ..stats.base import Accumulator
from ..stats.topk import EMPTY
from ..stats.topk import TopK as TopKAccumulator
from .base import Analysis, Batch

log = logging.getLogger(__name__)

SCORES = ("max", "mean")
COLUMNS = ["layer", "unit", "rank", "index", "value", "y", "x"]


def score_with_location(output: torch.Tensor, score: str = "max") -> torch.Tensor:
    """Per-unit score of every input and the (row, column) of its spatial maximum.

    Args:
        output: a layer's output, ``(N, C, H, W)`` (any number of spatial dimensions; they are
            flattened, and the location is given for the last two) or ``(N, F)``.
        score: ``"max"`` (the maximum over positions) or ``"mean"`` (their mean; the location is
            still that of the maximum).

    Returns:
        ``(N, C, 3)`` float64: score, row and column of the first maximum in row-major order.
        A layer without spatial dimensions reports row and column -1.

    Example:
        >>> t = torch.tensor([[[[0.0, 2.0], [5.0, 1.0]]]])
        >>> score_with_location(t).tolist()
        [[[5.0, 1.0, 0.0]]]
    """
    t = output.detach()
    if t.dim() <= 2:
        t = t.reshape(t.shape[0], -1).to(torch.float64)
        loc = torch.full_like(t, -1.0)
        return torch.stack([t, loc, loc], -1)
    n, c = t.shape[:2]
    width = t.shape[-1]
    flat = t.reshape(n, c, -1)
    best, where = flat.max(dim=2)  # the first maximum (torch returns the first index)
    value = best if score == "max" else flat.mean(dim=2)
    if t.dim() > 4:  # (N, C, D, H, W): the location within the last two dimensions
        where = where % (t.shape[-2] * width)
    return torch.stack([value.to(torch.float64), (where // width).to(torch.float64),
                        (where % width).to(torch.float64)], -1)


class _Score:
    """The capture reduction of :class:`TopK` (a callable with a readable name)."""

    def __init__(self, score: str) -> None:
        self.score = score

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return score_with_location(t, self.score)

    def __repr__(self) -> str:
        return f"score_with_location({self.score!r})"


class TopK(Analysis):
    """The ``k`` inputs with the largest activation of every unit, their values and locations.

    The score of an input for a unit is the maximum of the unit's spatial map (``reduce="max"``,
    Zhou et al. 2015) or its mean (``"mean"``); the location ``(y, x)`` is always that of the
    map's maximum (the first in row-major order), ``-1`` for layers without spatial dimensions.
    Indices are global dataset indices, so shards (``unitscope.analyze(..., shard=(i, n))``)
    merge exactly into the top-k of one pass.

    Args:
        k: how many inputs to keep per unit.
        reduce: ``"max"`` or ``"mean"``.
        layers: the layers to rank (default: those given to ``unitscope.analyze``).

    Example:
        >>> import unitscope
        >>> from unitscope.analyses.topk import TopK
        >>> run = unitscope.analyze(unitscope.load_model("digits-cnn"),
        ...                         unitscope.load_dataset("digits", "test"), layers="relu3",
        ...                         analyses=[TopK(k=3)], progress=False)
        >>> t = run.table("topk")
        >>> list(t.columns), len(t)
        (['layer', 'unit', 'rank', 'index', 'value', 'y', 'x'], 192)
    """

    name = "topk"

    def __init__(self, k: int = 10, reduce: str = "max", layers: LayerSpec | None = None) -> None:
        super().__init__(layers)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"TopK(k={k!r}): k must be a positive integer, e.g. TopK(k=10)")
        if reduce not in SCORES:
            raise ValueError(f"TopK(reduce={reduce!r}): use 'max' (Zhou et al.) or 'mean'")
        self.k = k
        self.score = reduce
        self.reduce = _Score(reduce)

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {**super().config(), "k": self.k, "reduce": self.score}

    def new_accumulator(self, key: str) -> Accumulator:
        """One :class:`unitscope.stats.topk.TopK` with a (row, column) payload per layer."""
        return TopKAccumulator(self.k, aux_dim=2)

    def update_layer(self, acc: Accumulator, act: torch.Tensor, batch: Batch) -> None:
        """Fold one batch: the scores, the global indices and the maximum's location."""
        acc.update(act[..., 0], index=batch.index, aux=act[..., 1:].to(torch.int64))

    def tables(self) -> dict[str, pd.DataFrame]:
        """``topk``: one row per (layer, unit, rank) of a filled slot; rank 0 is the largest."""
        frames = []
        short = []
        for key, acc in self.accumulators.items():
            if not acc.initialized:
                continue
            r = acc.compute()
            units, k = r.values.shape
            filled = (r.indices != EMPTY).reshape(-1).cpu().numpy()
            if not filled.all():
                short.append(key)
            aux = r.aux.reshape(units * k, 2).cpu().numpy()
            frame = pd.DataFrame({
                "layer": key,
                "unit": torch.arange(units).repeat_interleave(k).numpy(),
                "rank": torch.arange(k).repeat(units).numpy(),
                "index": r.indices.reshape(-1).cpu().numpy(),
                "value": r.values.reshape(-1).cpu().numpy(),
                "y": aux[:, 0], "x": aux[:, 1],
            })
            frames.append(frame[filled].reset_index(drop=True))
        if short:
            log.warning("topk: fewer than k=%d inputs were seen for some units of %s (a dataset "
                        "smaller than k, or NaN activations); their lists are shorter", self.k,
                        ", ".join(short))
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
        return {self.name: table}


def check_k(k: int | None, hint: str = "leave it out for all ranked inputs", required: bool = False) -> None:
    """Refuse a ``k`` (top inputs per unit) that is not an integer >= 1; ``None`` means the default.

    ``hint`` ends the message; with ``required`` a ``None`` is refused too.

    Raises:
        ValueError: ``k`` is 0, negative or not an integer (``rows.head(-2)`` would silently drop
            the last ranks and ``k=0`` would leave nothing to draw).
    """
    if k is None and not required:
        return
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k={k!r}: k must be >= 1 (the number of top inputs per unit); {hint}")


def unit_topk(table: pd.DataFrame, layer: str, unit: int) -> pd.DataFrame:
    """The rows of a ``topk`` table for one unit, best first.

    Raises:
        KeyError: the table has no such layer or unit; the message lists what it has.
    """
    rows = table[table["layer"] == layer]
    if rows.empty:
        raise KeyError(f"the topk table has no layer {layer!r}; it has: "
                       f"{', '.join(dict.fromkeys(table['layer']))}")
    sel = rows[rows["unit"] == unit]
    if sel.empty:
        raise KeyError(f"layer {layer!r} has units 0..{int(rows['unit'].max())} in the topk table, "
                       f"not {unit}")
    return sel.sort_values("rank").reset_index(drop=True)


def parse_unit(spec: str) -> tuple[str, int]:
    """``"features.6:3"`` -> ``("features.6", 3)``.

    Example:
        >>> parse_unit("features.6:3")
        ('features.6', 3)
    """
    layer, sep, unit = str(spec).rpartition(":")
    if not sep or not layer or not unit.lstrip("-").isdigit():
        raise ValueError(f"unit {spec!r}: write it as 'layer:channel', e.g. 'features.6:3'")
    return layer, int(unit)
