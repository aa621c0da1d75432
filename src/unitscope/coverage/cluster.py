"""Cluster-based coverage CC (TensorFuzz; spec coverage.md §2.7): greedy online clustering per layer.

Example:
    >>> import torch
    >>> from unitscope.coverage.cluster import CC
    >>> cc = CC(threshold=1.0)
    >>> cc.update(torch.tensor([[0.0, 0.5, 1.0], [2.0, 0.0, 1.0], [-0.5, 0.4, 1.5]]))
    2.0
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .base import Criterion

__all__ = ["CC", "min_distance", "squared_distances"]

#: entries (rows × representatives) per float64 distance block, about 32 MB
BLOCK = 1 << 22

#: acceptances a batch takes one at a time (each costs one distance vector) before the remaining
#: candidates are settled from their distance matrix
STEPS = 8


def squared_distances(x: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances ``(len(x), len(reps))``, float64, by one matrix product.

    ‖a − b‖² = ‖a‖² + ‖b‖² − 2a·b in float64. The rounding error of the sums is at most about
    (units + 4) float64 rounding units of ‖a‖² + ‖b‖², so a result within that bound is set to
    exactly 0: equal vectors are 0 apart whatever the batch (and vectors equal to about
    sqrt(units) · 1e-8 relative count as equal).
    """
    a, b = x.double(), reps.double()
    na, nb = a.square().sum(1), b.square().sum(1)
    d2 = na[:, None] + nb[None, :] - 2 * (a @ b.T)
    scale = (na[:, None] + nb[None, :]) * ((a.shape[1] + 4) * torch.finfo(torch.float64).eps)
    return torch.where(d2 <= scale, torch.zeros_like(d2), d2)


def min_distance(x: torch.Tensor, reps: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Distance (float64) from every row of ``x`` to its nearest row of ``reps``; ``inf`` when none."""
    if reps.shape[0] == 0 or x.shape[0] == 0:
        return torch.full((x.shape[0],), math.inf, dtype=torch.float64, device=x.device)
    step = max(1, BLOCK // reps.shape[0])
    d2 = torch.cat([squared_distances(x[i:i + step], reps).amin(1) for i in range(0, x.shape[0], step)])
    return d2 if squared else d2.sqrt()


class CC(Criterion):
    """Cluster coverage: the number of representatives a greedy online clustering keeps (a count).

    Inputs are taken in order. An input is *new* for a layer when no stored representative of
    that layer is within ``threshold`` of it (distance ``> threshold``); a new input becomes a
    representative. CC = the sum over layers of the number of representatives.

    CC depends on the order of the inputs (greedy), not on how they are batched: a batch is
    compared with the stored representatives in one float64 matrix product (see
    :func:`squared_distances`), then its candidates are accepted in input order: the first is
    accepted and every candidate within τ of it dropped, one distance vector per acceptance, and
    after ``STEPS`` acceptances in one batch the rest are settled from their distance matrix (a
    first batch of 360 digits inputs: 14.7 ms with the matrix alone, 1.8 ms). Equal vectors are
    at distance 0, so ``threshold=0`` counts distinct vectors (vectors equal to rounding error
    count as one). An input with a NaN or infinite value in a layer, or one so large that its
    squared norm overflows float64, is left out for that layer (it has no finite distance). The
    representatives are stored, so memory grows as O(representatives × units) per layer.

    Args:
        threshold: τ >= 0. The anchor (NeuraL-Coverage) and SEED use 10 (default) on the squared
            L2 distance at CIFAR-10 scale; here it applies to the distance chosen by ``squared``.
            ``math.inf`` keeps only the first input of each layer: CC = 1 per layer.
        squared: compare τ with the squared L2 distance (anchor) instead of the L2 distance
            (default, recommended).
        count_first: count the first representative of each layer (default, recommended); the
            anchor stores it without counting it, so its CC is this one minus 1 per layer.

    ``merge(other)`` feeds ``other``'s representatives, in their order, after this state's: an
    honest combination, but, CC being order-dependent, not in general the value of one pass over
    both shards' inputs.
    """

    key = "cc"
    kind = "count"

    def __init__(self, threshold: float = 10.0, squared: bool = False, count_first: bool = True) -> None:
        super().__init__()
        if not (threshold >= 0):
            raise ValueError(f"CC(threshold={threshold}): the threshold must be >= 0 (math.inf keeps "
                             "one representative per layer)")
        self.threshold, self.squared, self.count_first = float(threshold), bool(squared), bool(count_first)

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"threshold": self.threshold, "squared": self.squared, "count_first": self.count_first}

    def _start(self) -> None:
        for layer in self._layers:
            self._st[layer]["reps"] = torch.zeros(0, self._units[layer])

    def _add(self, layer: str, x: torch.Tensor) -> None:
        st = self._st[layer]
        reps = st["reps"]
        # the first input fixes the dtype of the representatives
        reps = reps.to(x.device, x.dtype) if reps.shape[0] == 0 else reps.to(x.device)
        x = x.to(reps.dtype)
        # a row with NaN or inf, or whose squared norm overflows float64 (|x| above about 1e154),
        # has no finite distance: it is never a representative (a NaN or inf makes the norm so too)
        x = x[torch.isfinite(x.double().square().sum(1))]
        # an empty layer takes its first input whatever τ (a distance is never > ∞)
        cand = x if reps.shape[0] == 0 else x[min_distance(x, reps, self.squared) > self.threshold]
        kept = []
        while cand.shape[0] and len(kept) < STEPS:  # greedy in input order, one step per acceptance
            kept.append(cand[:1])
            rest = cand[1:]
            cand = rest[self._distance(squared_distances(rest, cand[:1])[:, 0]) > self.threshold]
        if cand.shape[0]:  # many acceptances: one distance matrix for the remaining candidates
            kept.append(self._greedy(cand))
        if kept:
            reps = torch.cat([reps, *kept])
        st["reps"] = reps

    def _distance(self, d2: torch.Tensor) -> torch.Tensor:
        return d2 if self.squared else d2.sqrt()

    def _greedy(self, cand: torch.Tensor) -> torch.Tensor:
        """The candidates the greedy pass accepts, from their pairwise distances (O(m²) memory)."""
        close = (self._distance(squared_distances(cand, cand)) <= self.threshold).cpu().numpy()
        keep = np.ones(cand.shape[0], dtype=bool)
        for i in range(cand.shape[0]):
            if keep[i]:
                keep[i + 1:] &= ~close[i, i + 1:]
        return cand[torch.from_numpy(keep).to(cand.device)]

    def _update_layers(self, layers: dict[str, torch.Tensor], classes: torch.Tensor | None) -> None:
        for layer, t in layers.items():
            self._add(layer, t)

    def _merge_covered(self, other: Criterion) -> None:
        for layer in self._layers:
            self._add(layer, other._st[layer]["reps"])

    def representatives(self) -> dict[str, torch.Tensor]:
        """The stored representatives of every layer, in the order they were accepted."""
        return {k: self._st[k]["reps"].clone() for k in self._layers if "reps" in self._st[k]}

    def _layer_values(self) -> dict[str, float]:
        out = {}
        for layer in self._layers:
            n = self._st[layer]["reps"].shape[0]
            out[layer] = float(n if self.count_first or n == 0 else n - 1)
        return out

    def _value(self) -> float:
        return float(sum(self._layer_values().values()))

