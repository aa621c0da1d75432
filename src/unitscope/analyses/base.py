"""What every analysis shares: which layers and reduction it needs, its accumulators, its tables.

An analysis is a set of accumulators keyed by layer, fed by the engine from one forward pass.
Merging, syncing and saving work on the accumulators, so every analysis built this way is
resumable and distributable without code of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
import torch
from torch import nn

from ..capture import LayerSpec, Reduction
from ..registry import Registry
from ..stats.base import Accumulator

ANALYSES: Registry = Registry("analysis", "analyses")


@dataclass
class Batch:
    """One batch as the engine hands it to analyses.

    Attributes:
        x: the inputs, on the run's device.
        y: the labels (None when the dataset has none).
        index: global dataset indices, shape (N,), int64, on the run's device.
        output: the model's output, when an analysis asked for it (``needs_output``).
    """

    x: torch.Tensor
    y: torch.Tensor | None
    index: torch.Tensor
    output: torch.Tensor | None = None


class Analysis:
    """Base class of the analyses that ``unitscope.analyze`` runs.

    Subclasses set ``name`` (the registry key and table name), ``reduce`` (what the capture hook
    computes for them) and implement :meth:`new_accumulator`, :meth:`update_layer` and
    :meth:`tables`. ``layers=None`` means the layers given to ``analyze``.
    """

    name: ClassVar[str] = ""
    reduce: Reduction = "mean"
    needs_output: bool = False

    def __init__(self, layers: LayerSpec | None = None) -> None:
        self.layers = layers
        self.accumulators: dict[str, Accumulator] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            ANALYSES.register(cls.name)(cls)

    def config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-able (recorded in the manifest, used to rebuild from states)."""
        layers = self.layers
        if isinstance(layers, type):
            layers = layers.__name__
        elif isinstance(layers, (list, tuple)):
            layers = [x.__name__ if isinstance(x, type) else x for x in layers]
        return {"layers": layers}

    # ------------------------------------------------------------------ streaming
    def start(self, keys: list[str]) -> None:
        """Create one (empty) accumulator per layer key, unless resuming from loaded states."""
        for key in keys:
            self.accumulators.setdefault(key, self.new_accumulator(key))

    def new_accumulator(self, key: str) -> Accumulator:
        """A fresh accumulator for layer ``key``."""
        raise NotImplementedError

    def update(self, acts: Mapping[str, torch.Tensor], batch: Batch) -> None:
        """Fold one batch's captured activations (reduced as ``self.reduce``) into the state."""
        for key, acc in self.accumulators.items():
            if key in acts:
                self.update_layer(acc, acts[key], batch)

    def update_layer(self, acc: Accumulator, act: torch.Tensor, batch: Batch) -> None:
        """Fold one layer's activations into its accumulator (default: ``acc.update(act)``)."""
        acc.update(act)

    def merge(self, other: Analysis) -> Analysis:
        """Merge another analysis of the same kind (layer by layer); returns ``self``.

        The result holds finished passes, so ``analyze`` refuses to add another to it.
        """
        self._passed = True
        for key, acc in other.accumulators.items():
            if key in self.accumulators:
                self.accumulators[key].merge(acc)
            else:
                self.accumulators[key] = acc.clone()
        return self

    def models(self) -> list[nn.Module]:
        """Models besides the analysed one that the analysis runs (the engine restores them)."""
        return []

    def sync(self) -> None:
        """All-reduce every accumulator over the initialised process group (no-op otherwise)."""
        for key in sorted(self.accumulators):
            self.accumulators[key].sync()

    def to(self, device: torch.device | str) -> Analysis:
        """Move every accumulator to ``device``."""
        for acc in self.accumulators.values():
            acc.to(device)
        return self

    # ------------------------------------------------------------------ results
    def tables(self) -> dict[str, pd.DataFrame]:
        """Tidy results: table name -> DataFrame (first column ``layer``, then ``unit`` if per unit)."""
        raise NotImplementedError

    def arrays(self) -> dict[str, torch.Tensor]:
        """Results that are not tabular (matrices, maps), by name; none by default."""
        return {}


def build_analysis(name: str, config: Mapping[str, Any]) -> Analysis:
    """Rebuild an analysis from its registry name and :meth:`Analysis.config`."""
    return ANALYSES[name](**dict(config))
