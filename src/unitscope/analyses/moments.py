"""Per-unit activation statistics: count, mean, std, min, max (the first analysis)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from ..capture import LayerSpec, Reduction
from ..stats.base import Accumulator
from ..stats.moments import Moments as MomentsAccumulator
from .base import Analysis


class Moments(Analysis):
    """Count, mean, standard deviation, min and max of every unit of the selected layers.

    A unit is a channel of a conv layer (its activation is reduced over spatial positions with
    ``reduce``, the spatial mean by default) or a feature of a linear layer. Non-finite
    activations are counted per unit (``nonfinite`` column) and left out of the statistics.

    Args:
        layers: the layers to summarise (default: those given to ``unitscope.analyze``).
        reduce: how a unit's spatial map becomes one number per input: ``"mean"`` or ``"max"``;
            ``"flatten"`` makes every (channel, position) a unit.

    Example:
        >>> import unitscope
        >>> model = unitscope.load_model("digits-cnn")
        >>> data = unitscope.load_dataset("digits", split="test")
        >>> run = unitscope.analyze(model, data, layers="relu*", analyses=[unitscope.Moments()],
        ...                         progress=False)
        >>> list(run.table("moments").columns)
        ['layer', 'unit', 'count', 'mean', 'std', 'min', 'max', 'nonfinite']
    """

    name = "moments"

    def __init__(self, layers: LayerSpec | None = None, reduce: Reduction = "mean") -> None:
        super().__init__(layers)
        if callable(reduce):
            raise ValueError("Moments(reduce=...) takes 'mean', 'max', 'flatten' or 'none' (a name, "
                             "so the run can be saved and resumed)")
        self.reduce = reduce

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {**super().config(), "reduce": self.reduce}

    def new_accumulator(self, key: str) -> Accumulator:
        """One :class:`unitscope.stats.Moments` per layer."""
        return MomentsAccumulator()

    def tables(self) -> dict[str, pd.DataFrame]:
        """``moments``: one row per (layer, unit)."""
        frames = []
        for key, acc in self.accumulators.items():
            if not acc.initialized:
                continue
            r = acc.compute()
            frames.append(pd.DataFrame({
                "layer": key, "unit": range(len(r.mean)), "count": r.count.cpu().numpy().astype("int64"),
                "mean": r.mean.cpu().numpy(), "std": r.std.cpu().numpy(), "min": r.min.cpu().numpy(),
                "max": r.max.cpu().numpy(), "nonfinite": r.nonfinite.cpu().numpy(),
            }))
        columns = ["layer", "unit", "count", "mean", "std", "min", "max", "nonfinite"]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
        return {self.name: table}
