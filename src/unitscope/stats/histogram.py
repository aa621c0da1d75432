"""Per-unit fixed-range histograms, streamed and mergeable, with approximate quantiles.

Every unit has ``bins`` equal-width bins between its ``low`` and ``high`` edge (shared floats or
per-unit tensors). Bin ``i`` holds ``edges[i] <= x < edges[i + 1]``; the last bin also holds
``x == high``. Values below ``low`` and above ``high`` are counted in ``underflow`` and
``overflow``; NaN and +-inf only in ``nonfinite``. Counts are integers, so merging is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import Accumulator, MergeError, as_matrix

PER_UNIT = "per-unit"


@dataclass(frozen=True)
class HistogramResult:
    """Histogram of every unit.

    Attributes:
        counts: ``(units, bins)`` int64.
        underflow: ``(units,)`` int64, finite values below ``low``.
        overflow: ``(units,)`` int64, finite values above ``high``.
        nonfinite: ``(units,)`` int64, NaN and +-inf (in no other count).
        edges: ``(units, bins + 1)`` float64 bin edges (the same as ``numpy.linspace(low, high,
            bins + 1)`` for every unit).
    """

    counts: torch.Tensor
    underflow: torch.Tensor
    overflow: torch.Tensor
    nonfinite: torch.Tensor
    edges: torch.Tensor

    def quantile(self, q: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Approximate quantiles of the finite values of every unit.

        The cumulative count runs through ``underflow``, then the bins, then ``overflow``; the
        quantile is found by linear interpolation inside the bin where it crosses
        ``q * total``, so it is exact to within one bin width. A quantile that falls among the
        underflow values returns ``low``, one that falls among the overflow values returns
        ``high`` (the histogram knows nothing finer about them). ``q = 0`` with no underflow gives
        the left edge of the first non-empty bin; units without finite values give NaN.

        Args:
            q: a quantile in ``[0, 1]`` or a 1-D sequence/tensor of them.

        Returns:
            ``(units,)`` float64 for a scalar ``q``, else ``(units, len(q))``.
        """
        device = self.counts.device
        qt = torch.as_tensor(q, dtype=torch.float64, device=device)
        scalar = qt.dim() == 0
        if qt.dim() > 1:
            raise ValueError(f"quantile: q must be a scalar or 1-D, got shape {tuple(qt.shape)}")
        qt = qt.reshape(1, -1)
        if bool(((qt < 0) | (qt > 1) | qt.isnan()).any()):
            raise ValueError(f"quantile: q must lie in [0, 1], got {q!r}")
        counts = self.counts.to(torch.float64)
        units, bins = counts.shape
        under = self.underflow.to(torch.float64).unsqueeze(1)  # (U, 1)
        inside = counts.sum(1, keepdim=True)
        total = under + inside + self.overflow.to(torch.float64).unsqueeze(1)
        target = qt * total  # (U, Q)
        right = under + counts.cumsum(1)  # cumulative count at the right edge of every bin
        left = right - counts
        # first bin whose right cumulative count reaches the target, but never an empty bin
        # before the first non-empty one (matters for target == underflow == 0)
        j = torch.searchsorted(right, target.contiguous(), side="left")
        first = torch.searchsorted(right, under.contiguous(), side="right")
        j = torch.maximum(j, first).clamp(max=bins - 1)
        c_left = left.gather(1, j)
        c_bin = counts.gather(1, j)
        frac = ((target - c_left) / c_bin.clamp(min=1)).clamp(0.0, 1.0)
        lo_edge = self.edges.gather(1, j)
        hi_edge = self.edges.gather(1, j + 1)
        value = lo_edge + frac * (hi_edge - lo_edge)
        low = self.edges[:, :1].expand(units, qt.shape[1])
        high = self.edges[:, -1:].expand(units, qt.shape[1])
        in_bins = (inside > 0) & (target <= under + inside)
        out = torch.where(in_bins, value, high)
        out = torch.where((under > 0) & (target <= under), low, out)
        out = torch.where(total > 0, out, torch.nan)
        return out[:, 0] if scalar else out


def _edge_arg(value: float | torch.Tensor | str, name: str) -> float | torch.Tensor | None:
    """Normalise a ``low``/``high`` argument: a float, a 1-D float64 tensor, or None (per-unit,
    to be restored from a state dict)."""
    if isinstance(value, str):
        if value != PER_UNIT:
            raise ValueError(f"Histogram: {name} must be a float, a 1-D tensor or {PER_UNIT!r}")
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = float(value)
        else:
            if value.dim() != 1:
                raise ValueError(f"Histogram: {name} must be 1-D (one edge per unit)")
            t = value.detach().to("cpu", torch.float64).clone()
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"Histogram: {name} must be finite")
            return t
    if isinstance(value, bool):
        raise ValueError(f"Histogram: {name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"Histogram: {name} must be finite, got {value!r}")
    return v


class Histogram(Accumulator):
    """Per-unit histogram with ``bins`` equal-width bins on ``[low, high]``.

    Args:
        bins: number of bins (>= 1).
        low: lower edge, a float shared by all units or a 1-D tensor with one edge per unit.
        high: upper edge, likewise; must exceed ``low`` everywhere.

    The bin of ``x`` is ``floor((x - low) / (high - low) * bins)``, corrected by at most one so
    the counts agree exactly with the reported ``edges``; ``x == high`` goes into the last bin.

    Example:
        >>> import torch
        >>> from unitscope.stats import Histogram
        >>> h = Histogram(bins=4, low=0.0, high=1.0)
        >>> h.update(torch.tensor([[0.1], [0.3], [0.3], [1.0], [2.0], [float("nan")]]))
        >>> r = h.compute()
        >>> r.counts.tolist(), r.overflow.tolist(), r.nonfinite.tolist()
        ([[1, 2, 0, 1]], [1], [1])
        >>> h.quantile(0.5).tolist()
        [0.4375]
    """

    rules: ClassVar[dict[str, str]] = {
        # the "equal" states come first so a refused merge fails before any count is touched
        "low": "equal", "high": "equal",
        "counts": "sum", "underflow": "sum", "overflow": "sum", "nonfinite": "sum",
    }

    def __init__(self, bins: int = 100, low: float | torch.Tensor | str = 0.0,
                 high: float | torch.Tensor | str = 1.0) -> None:
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"Histogram: bins must be an int >= 1, got {bins!r}")
        self.bins = bins
        self._low = _edge_arg(low, "low")
        self._high = _edge_arg(high, "high")
        lo, hi = self._low, self._high
        if lo is not None and hi is not None:
            if isinstance(lo, torch.Tensor) and isinstance(hi, torch.Tensor) \
                    and lo.shape != hi.shape:
                raise ValueError(
                    f"Histogram: low and high have different lengths ({lo.numel()} vs {hi.numel()})"
                )
            if not bool(torch.all(torch.as_tensor(hi) > torch.as_tensor(lo))):
                raise ValueError("Histogram: high must be greater than low (for every unit)")

    def config(self) -> dict[str, Any]:
        def edge(v: float | torch.Tensor | None) -> float | str:
            return v if isinstance(v, float) else PER_UNIT

        return {"bins": self.bins, "low": edge(self._low), "high": edge(self._high)}

    def clone(self) -> Histogram:
        """An independent copy (per-unit edges included, even before the first update)."""
        other = Histogram(self.bins,
                          PER_UNIT if self._low is None else self._low,
                          PER_UNIT if self._high is None else self._high)
        other.load_state_dict(self.state_dict())
        return other

    def _edges_for(self, units: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for name, v in (("low", self._low), ("high", self._high)):
            if v is None:
                raise ValueError(
                    f"Histogram: {name}={PER_UNIT!r} has no edges yet; build it with tensors or "
                    "load a state dict before updating"
                )
            if isinstance(v, float):
                out.append(torch.full((units,), v, dtype=torch.float64, device=device))
            else:
                if v.numel() != units:
                    raise ValueError(f"Histogram: {name} has {v.numel()} edges but the batch has "
                                     f"{units} units")
                out.append(v.to(device))
        return out[0], out[1]

    def _init_states(self, units: int, device: torch.device) -> None:
        low, high = self._edges_for(units, device)
        i64 = {"dtype": torch.int64, "device": device}
        self._states = {
            "low": low, "high": high,
            "counts": torch.zeros(units, self.bins, **i64),
            "underflow": torch.zeros(units, **i64),
            "overflow": torch.zeros(units, **i64),
            "nonfinite": torch.zeros(units, **i64),
        }

    def merge(self, other: Accumulator) -> Accumulator:
        """Fold ``other`` in; edges must be equal (also when ``self`` is still empty)."""
        if (isinstance(other, Histogram) and not self.initialized and other.initialized
                and other.config() == self.config()):
            units = other._states["low"].shape[0]
            if all(v is not None for v in (self._low, self._high)):
                try:
                    low, high = self._edges_for(units, other._states["low"].device)
                except ValueError as exc:
                    raise MergeError(str(exc)) from exc
                if not (torch.equal(low, other._states["low"])
                        and torch.equal(high, other._states["high"])):
                    raise MergeError("Histogram.low/high must be equal in both states")
        return super().merge(other)

    @staticmethod
    def _edges(low: torch.Tensor, high: torch.Tensor, bins: int) -> torch.Tensor:
        # the same float operations as numpy.linspace(low, high, bins + 1), last edge exact
        step = ((high - low) / bins).unsqueeze(1)
        ar = torch.arange(bins + 1, dtype=torch.float64, device=low.device)
        edges = ar * step + low.unsqueeze(1)
        edges[:, -1] = high
        return edges

    def update(self, x: torch.Tensor) -> None:
        """Fold in a batch of shape ``(N, *unit_shape)`` (flattened to ``(N, units)``)."""
        x = as_matrix(x).to(torch.float64)
        if not self.initialized:
            self._init_states(x.shape[1], x.device)
        s = self._states
        units, bins = s["low"].shape[0], self.bins
        if x.shape[1] != units:
            raise ValueError(f"Histogram: expected {units} units, got {x.shape[1]}")
        if x.shape[0] == 0:
            return
        low, high = s["low"], s["high"]
        finite = torch.isfinite(x)
        under = finite & (x < low)
        over = finite & (x > high)
        inside = finite & ~under & ~over
        xs = torch.where(inside, x, low)
        b = torch.floor((xs - low) / (high - low) * bins).clamp(0, bins - 1).to(torch.int64)
        # correct floating-point rounding at the edges, as numpy.histogram does
        edges = self._edges(low, high, bins).T  # (bins + 1, U)
        b = b - (xs < edges.gather(0, b)).to(torch.int64)
        b = b + ((xs >= edges.gather(0, b + 1)) & (b < bins - 1)).to(torch.int64)
        flat = (b + torch.arange(units, device=x.device) * bins).reshape(-1)
        add = torch.zeros(units * bins, dtype=torch.int64, device=x.device)
        add.scatter_add_(0, flat, inside.reshape(-1).to(torch.int64))
        s["counts"] = s["counts"] + add.view(units, bins)
        s["underflow"] = s["underflow"] + under.sum(0)
        s["overflow"] = s["overflow"] + over.sum(0)
        s["nonfinite"] = s["nonfinite"] + (~finite).sum(0)

    def compute(self) -> HistogramResult:
        """Counts, under/overflow, non-finite counts and bin edges of every unit."""
        self._require_initialized()
        s = self._states
        return HistogramResult(
            counts=s["counts"].clone(), underflow=s["underflow"].clone(),
            overflow=s["overflow"].clone(), nonfinite=s["nonfinite"].clone(),
            edges=self._edges(s["low"], s["high"], self.bins),
        )

    def quantile(self, q: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Shorthand for ``compute().quantile(q)``."""
        return self.compute().quantile(q)
