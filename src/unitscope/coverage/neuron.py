"""Neuron-level coverage criteria: NC, KMNC, NBC, SNAC, TKNC and TKNP (spec coverage.md §2.1–2.6).

Every criterion here is a set union over the inputs seen so far, so it never decreases, does
not depend on the order or the batching of the inputs, and two shards merged equal one pass.
All work is elementwise or top-k over ``(n, units)`` tensors, vectorised over inputs and units.

Example:
    >>> import torch
    >>> from unitscope.coverage.neuron import NC, KMNC
    >>> test = torch.tensor([[0.0, 0.5, 1.0], [2.0, 0.0, 1.0], [-0.5, 0.4, 1.5]])
    >>> NC(threshold=0.5, scale="none").update(test)
    0.6666666666666666
    >>> kmnc = KMNC(k=2).fit(torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, 1.0]]))
    >>> round(kmnc.update(test), 4)
    0.8333
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..stats.moments import chan_combine
from .base import Criterion, nonfinite_to, pack_rows, topk_mask, union_rows

__all__ = ["KMNC", "NBC", "NC", "SNAC", "TKNC", "TKNP"]


def _fraction(covered: int, total: int) -> float:
    return covered / total if total else 0.0


class _CoveredUnits(Criterion):
    """A criterion whose state is one boolean ``covered`` vector per layer (NC, TKNC)."""

    def _start(self) -> None:
        for layer in self._layers:
            self._st[layer]["covered"] = torch.zeros(self._units[layer], dtype=torch.bool)

    def _update_layers(self, layers: dict[str, torch.Tensor], classes: torch.Tensor | None) -> None:
        for layer, t in layers.items():
            st = self._st[layer]
            st["covered"] = st["covered"].to(t.device) | self._hits(t).any(0)

    def _hits(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _merge_covered(self, other: Criterion) -> None:
        for layer in self._layers:
            self._st[layer]["covered"] = self._st[layer]["covered"] | other._st[layer]["covered"]

    def _value(self) -> float:
        covered = sum(int(self._st[k]["covered"].sum()) for k in self._layers)
        return _fraction(covered, sum(self._units.values()))

    def _layer_values(self) -> dict[str, float]:
        return {k: _fraction(int(self._st[k]["covered"].sum()), self._units[k]) for k in self._layers}


class NC(_CoveredUnits):
    """Neuron coverage (DeepXplore): the fraction of units with a value above ``threshold``.

    A unit is covered once some input gives it a scaled value ``s > threshold`` (strict).

    Args:
        threshold: t; the anchor (NeuraL-Coverage) and DeepImportance use 0.75 (the default).
        scale: how a value is scaled before the comparison:

            * ``"layer_minmax"`` (default, anchor): per input, min-max over the layer's units of
              the spatially averaged values; a layer whose units are all equal (0/0) covers nothing;
            * ``"map_minmax"`` (DeepXplore, DeepImportance): per input, min-max over every value of
              the layer's whole map ``(C, *spatial)``, then the spatial mean per channel; needs
              unreduced maps ``(n, C, *spatial)`` (for ``(n, units)`` it equals ``layer_minmax``);
            * ``"none"``: the raw value.

    NaN never covers a unit; NaN and ``±inf`` are left out of the min and max of the min-max scales.
    ``NC(t1) >= NC(t2)`` whenever ``t1 <= t2``.
    """

    key = "nc"

    def __init__(self, threshold: float = 0.75, scale: str = "layer_minmax") -> None:
        super().__init__()
        if scale not in ("layer_minmax", "map_minmax", "none"):
            raise ValueError(f"NC(scale={scale!r}): use 'layer_minmax', 'map_minmax' or 'none'")
        if not math.isfinite(threshold):
            raise ValueError(f"NC(threshold={threshold}): the threshold must be finite")
        self.threshold = float(threshold)
        self.scale = scale

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"threshold": self.threshold, "scale": self.scale}

    def _prepare(self, t: torch.Tensor) -> torch.Tensor:
        if self.scale == "none":
            return super()._prepare(t)
        if self.scale == "layer_minmax":
            t = super()._prepare(t)
        flat = t.reshape(t.shape[0], -1)
        lo = nonfinite_to(flat, math.inf).amin(1)  # NaN and inf stay out of the min and the max
        hi = nonfinite_to(flat, -math.inf).amax(1)
        shape = (-1,) + (1,) * (t.dim() - 1)
        s = (t - lo.view(shape)) / (hi - lo).view(shape)  # 0/0 -> NaN -> never covered
        return super()._prepare(s)

    def _hits(self, t: torch.Tensor) -> torch.Tensor:
        return t > self.threshold


class TKNC(_CoveredUnits):
    """Top-k neuron coverage (DeepGauge): units that were among the k largest of their layer.

    TKNC = |union over inputs and layers of top_k(x, layer)| / N. Ties go to the smaller unit
    index; a layer with at most k units is covered whole by any input.

    Args:
        k: units per layer and input; 10 in the anchor's fuzzing and in SEED (default), 3 in
            DeepImportance.
    """

    key = "tknc"

    def __init__(self, k: int = 10) -> None:
        super().__init__()
        if int(k) < 1:
            raise ValueError(f"TKNC(k={k}): k must be >= 1")
        self.k = int(k)

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"k": self.k}

    def _hits(self, t: torch.Tensor) -> torch.Tensor:
        return topk_mask(t, self.k)


class TKNP(Criterion):
    """Top-k neuron patterns (DeepGauge): the number of distinct top-k patterns seen (a count).

    The pattern of an input is, for every layer, the *set* of its k largest units (ties to the
    smaller index). Patterns are kept as exact bit-packed keys (64 units per int64 word; no string
    keys, no hashing) in a tensor of distinct rows, so the state grows with the number of distinct
    patterns.

    Args:
        k: units per layer; 10 as in SEED (default), 50 in the anchor's fuzzing, 3 in DeepImportance.
        mode: ``"network"`` (default): one pattern over all layers together; ``"layer"``: the sum
            over layers of the distinct per-layer patterns (the anchor's layer mode).
    """

    key = "tknp"
    kind = "count"

    def __init__(self, k: int = 10, mode: str = "network") -> None:
        super().__init__()
        if int(k) < 1:
            raise ValueError(f"TKNP(k={k}): k must be >= 1")
        if mode not in ("network", "layer"):
            raise ValueError(f"TKNP(mode={mode!r}): use 'network' or 'layer'")
        self.k = int(k)
        self.mode = mode

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"k": self.k, "mode": self.mode}

    def _start(self) -> None:
        if self.mode == "network":
            width = (sum(self._units.values()) + 63) // 64
            self._sh["patterns"] = torch.zeros(0, width, dtype=torch.int64)
        else:
            for layer in self._layers:
                words = (self._units[layer] + 63) // 64
                self._st[layer]["patterns"] = torch.zeros(0, words, dtype=torch.int64)

    def _update_layers(self, layers: dict[str, torch.Tensor], classes: torch.Tensor | None) -> None:
        masks = {k: topk_mask(t, self.k) for k, t in layers.items()}
        if self.mode == "network":
            keys = pack_rows(torch.cat([masks[k] for k in self._layers], dim=1))
            self._sh["patterns"] = union_rows(keys, self._sh["patterns"])
        else:
            for layer, m in masks.items():
                self._st[layer]["patterns"] = union_rows(pack_rows(m), self._st[layer]["patterns"])

    def _merge_covered(self, other: Criterion) -> None:
        if self.mode == "network":
            self._sh["patterns"] = union_rows(self._sh["patterns"], other._sh["patterns"])
        else:
            for layer in self._layers:
                st = self._st[layer]
                st["patterns"] = union_rows(st["patterns"], other._st[layer]["patterns"])

    def _value(self) -> float:
        if self.mode == "network":
            return float(self._sh["patterns"].shape[0])
        return float(sum(self._st[k]["patterns"].shape[0] for k in self._layers))

    def _has_layer_values(self) -> bool:
        return self.mode == "layer"

    def _layer_values(self) -> dict[str, float]:
        if self.mode == "network":
            return {}
        return {k: float(self._st[k]["patterns"].shape[0]) for k in self._layers}


class _RangeCriterion(Criterion):
    """Criteria built on each unit's [lo, hi] over the training set (KMNC, NBC, SNAC).

    The profile is a running min and max, and count, mean and centred second moment (Chan et al.
    update, float64) for NBC's and SNAC's ``margin``; NaN and ``±inf`` are left out of all of them.
    It streams over any number of ``fit`` batches and merges exactly (min/max) or to float
    tolerance (moments).
    """

    needs_fit = True
    profile_fields = ("lo", "hi", "count", "mean", "m2")

    def _fit_layers(self, layers: dict[str, torch.Tensor], classes: torch.Tensor | None) -> None:
        for layer, t in layers.items():
            v = t.double()
            finite = torch.isfinite(v)
            lo, hi = v.masked_fill(~finite, math.inf).amin(0), v.masked_fill(~finite, -math.inf).amax(0)
            n = finite.sum(0).double()
            mean = v.masked_fill(~finite, 0).sum(0) / n.clamp(min=1)
            m2 = (v - mean).masked_fill(~finite, 0).square().sum(0)
            st = self._st[layer]
            if "lo" in st:
                lo, hi = torch.minimum(st["lo"].to(lo.device), lo), torch.maximum(st["hi"].to(hi.device), hi)
                n, mean, m2 = chan_combine(st["count"].to(n.device), st["mean"].to(n.device),
                                           st["m2"].to(n.device), n, mean, m2)
            st["lo"], st["hi"], st["count"], st["mean"], st["m2"] = lo, hi, n, mean, m2

    def _merge_profile(self, other: Criterion) -> None:
        for layer in self._layers:
            st, ot = self._st[layer], other._st[layer]
            st["lo"], st["hi"] = torch.minimum(st["lo"], ot["lo"]), torch.maximum(st["hi"], ot["hi"])
            st["count"], st["mean"], st["m2"] = chan_combine(st["count"], st["mean"], st["m2"],
                                                             ot["count"], ot["mean"], ot["m2"])

    def std(self) -> dict[str, torch.Tensor]:
        """The training standard deviation of every unit (population, float64), by layer."""
        return {k: (self._st[k]["m2"] / self._st[k]["count"].clamp(min=1)).sqrt() for k in self._layers}

    def ranges(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The fitted ``(lo, hi)`` of every unit, by layer (float64)."""
        return {k: (self._st[k]["lo"], self._st[k]["hi"]) for k in self._layers if "lo" in self._st[k]}


class KMNC(_RangeCriterion):
    """k-multisection neuron coverage (DeepGauge): the fraction of (unit, section) pairs hit.

    Each unit's training range [lo, hi] is cut into k sections of equal width; a test value in
    the range covers its section, a value outside covers none. KMNC = covered / (k · N).

    Args:
        k: sections per unit; 1000 as in DeepImportance and SEED (default), 100 in the anchor's fuzzing.
        boundary: how a value maps to its section (the sources disagree):

            * ``"floor"`` (default, recommended): ``j = min(floor((v - lo) / w), k - 1)``, so lo is
              in the first section and hi in the last;
            * ``"ceil"`` (anchor): ``j = ceil((v - lo) / w) - 1``, so a value equal to lo covers nothing.
        degenerate: units with hi <= lo have no sections to hit: ``"count_in_denominator"``
            (default, anchor) keeps them in N, ``"exclude"`` leaves them out.
            :meth:`diagnostics` reports how many there are.

    The covered state is a ``(units, k)`` boolean table per layer.
    """

    key = "kmnc"

    def __init__(self, k: int = 1000, boundary: str = "floor",
                 degenerate: str = "count_in_denominator") -> None:
        super().__init__()
        if int(k) < 1:
            raise ValueError(f"KMNC(k={k}): k must be >= 1")
        if boundary not in ("floor", "ceil"):
            raise ValueError(f"KMNC(boundary={boundary!r}): use 'floor' (recommended) or 'ceil' (anchor)")
        if degenerate not in ("count_in_denominator", "exclude"):
            raise ValueError(f"KMNC(degenerate={degenerate!r}): use 'count_in_denominator' or 'exclude'")
        self.k, self.boundary, self.degenerate = int(k), boundary, degenerate

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"k": self.k, "boundary": self.boundary, "degenerate": self.degenerate}

    def _start(self) -> None:
        for layer in self._layers:
            st = self._st[layer]
            st["covered"] = torch.zeros(self._units[layer], self.k, dtype=torch.bool, device=st["lo"].device)

    def _sections(self, layer: str, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``lo, hi, hi - lo``, the valid units and each unit's first cell, cached per layer.

        The profile is frozen in the test phase, so these are computed once, not per batch.
        """
        key = ("sections", layer, str(device))
        if key not in self._cache:
            st = self._st[layer]
            lo, hi = st["lo"].to(device), st["hi"].to(device)
            valid = hi > lo
            first = torch.arange(len(lo), device=device) * self.k
            self._cache[key] = (lo, hi, hi - lo, valid, first)
        return self._cache[key]

    def _update_layers(self, layers: dict[str, torch.Tensor], classes: torch.Tensor | None) -> None:
        k = self.k
        for layer, t in layers.items():
            st = self._st[layer]
            lo, hi, width, valid, first = self._sections(layer, t.device)
            v = t.double()
            ok = valid & (v >= lo) & (v <= hi)
            pos = (v - lo).div_(width).mul_(k)
            if self.boundary == "floor":
                j = pos.floor_().clamp_(max=k - 1)
            else:
                j = pos.ceil_().sub_(1)
                ok &= j >= 0
            cells = (first + j.long())[ok]
            covered = st["covered"].to(t.device)
            covered.view(-1)[cells] = True
            st["covered"] = covered

    def _merge_covered(self, other: Criterion) -> None:
        for layer in self._layers:
            self._st[layer]["covered"] = self._st[layer]["covered"] | other._st[layer]["covered"]

    def _denominator(self, layer: str) -> int:
        if self.degenerate == "exclude":
            st = self._st[layer]
            return int((st["hi"] > st["lo"]).sum())
        return self._units[layer]

    def _value(self) -> float:
        covered = sum(int(self._st[k]["covered"].sum()) for k in self._layers)
        return _fraction(covered, self.k * sum(self._denominator(k) for k in self._layers))

    def _layer_values(self) -> dict[str, float]:
        return {k: _fraction(int(self._st[k]["covered"].sum()), self.k * self._denominator(k))
                for k in self._layers}

    def diagnostics(self) -> dict[str, float]:
        """``degenerate``: the number of units whose training range is empty (hi <= lo)."""
        if not self.initialized:
            return {}
        return {"degenerate": float(sum(int((self._st[k]["hi"] <= self._st[k]["lo"]).sum())
                                        for k in self._layers))}


class NBC(_RangeCriterion):
    """Neuron boundary coverage (DeepGauge): corner regions beyond the training range that were hit.

    NBC = (|{units with some v > hi}| + |{units with some v < lo}|) / (2N), comparisons strict,
    [lo, hi] from the training set. NBC of the training set itself is 0.

    Args:
        margin: γ. The corners start at hi + γσ and lo − γσ, σ the unit's training standard
            deviation (DeepGauge's widened bounds); 0 (default) as the anchor and DeepImportance.
    """

    key = "nbc"
    _corners = ("upper", "lower")

    def __init__(self, margin: float = 0.0) -> None:
        super().__init__()
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"{type(self).__name__}(margin={margin}): the margin must be finite and >= 0")
        self.margin = float(margin)

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"margin": self.margin}

    def _bounds(self, layer: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The corners' ``(lo, hi)``, cached per layer (the profile is frozen while testing).

        A unit with no finite training value has ``hi = -inf`` (``lo = +inf``), which no value
        may exceed: its bounds are set to ``+inf`` (``-inf``) here, so no value covers them.
        """
        key = ("bounds", layer, str(device))
        if key not in self._cache:
            st = self._st[layer]
            lo, hi = st["lo"].to(device), st["hi"].to(device)
            if self.margin:
                width = self.margin * self.std()[layer].to(device)
                lo, hi = lo - width, hi + width
            self._cache[key] = (torch.where(torch.isfinite(lo), lo, -math.inf),
                                torch.where(torch.isfinite(hi), hi, math.inf))
        return self._cache[key]

    def _start(self) -> None:
        for layer in self._layers:
            st = self._st[layer]
            for corner in self._corners:
                st[corner] = torch.zeros(self._units[layer], dtype=torch.bool, device=st["lo"].device)

    def _update_layers(self, layers: dict[str, torch.Tensor], classes: torch.Tensor | None) -> None:
        for layer, t in layers.items():
            st = self._st[layer]
            v = t.double()
            lo, hi = self._bounds(layer, t.device)
            st["upper"] = st["upper"].to(t.device) | (v > hi).any(0)
            if "lower" in self._corners:
                st["lower"] = st["lower"].to(t.device) | (v < lo).any(0)

    def _merge_covered(self, other: Criterion) -> None:
        for layer in self._layers:
            for corner in self._corners:
                self._st[layer][corner] = self._st[layer][corner] | other._st[layer][corner]

    def _count(self, layer: str) -> int:
        return sum(int(self._st[layer][c].sum()) for c in self._corners)

    def _value(self) -> float:
        total = len(self._corners) * sum(self._units.values())
        return _fraction(sum(self._count(k) for k in self._layers), total)

    def _layer_values(self) -> dict[str, float]:
        return {k: _fraction(self._count(k), len(self._corners) * self._units[k]) for k in self._layers}


class SNAC(NBC):
    """Strong neuron activation coverage (DeepGauge): units with some value above the training max.

    SNAC = |{units with some v > hi}| / N (strict). SNAC of the training set itself is 0, and
    SNAC <= 2 · NBC on the same data. ``margin`` γ moves the bound to hi + γσ, as in :class:`NBC`.
    """

    key = "snac"
    _corners = ("upper",)
