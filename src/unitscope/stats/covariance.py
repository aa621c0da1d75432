"""Streaming covariance (and correlation) between all units of a layer.

Each batch contributes its exact mean and centred cross-product matrix ``Xc^T Xc`` in float64;
batches and shards are combined with the matrix form of the Chan, Golub and LeVeque (1979) update
(:func:`~unitscope.stats.moments.chan_combine` with ``outer=True``), so no
``E[xy] - E[x]E[y]`` cancellation occurs even for activations with a large common offset.

A covariance needs every unit of a sample at once, so a sample (row) with any non-finite value is
left out as a whole and counted in ``nonfinite_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from .base import Accumulator, MergeError, as_matrix
from .moments import chan_combine


@dataclass(frozen=True)
class CovarianceResult:
    """Covariance of the units of a layer.

    Attributes:
        count: 0-d float64, number of finite rows used.
        mean: ``(units,)`` float64 mean of every unit (NaN when ``count == 0``).
        cov: ``(units, units)`` float64 covariance, normalised by ``count - ddof``; NaN when
            ``count <= ddof``.
        nonfinite_rows: 0-d int64, number of rows left out because they held a NaN or an inf.
    """

    count: torch.Tensor
    mean: torch.Tensor
    cov: torch.Tensor
    nonfinite_rows: torch.Tensor

    def correlation(self) -> torch.Tensor:
        """Pearson correlation matrix ``(units, units)``, clamped to ``[-1, 1]``.

        Entries involving a unit whose variance is 0 (or undefined) are NaN.
        """
        var = torch.diagonal(self.cov)
        std = torch.where(var > 0, var, torch.nan).sqrt()
        corr = self.cov / torch.outer(std, std)
        return corr.clamp(-1.0, 1.0)


class Covariance(Accumulator):
    """Mean and covariance matrix of all units, streamed and mergeable.

    The state is ``O(units^2)``: flatten or pool large feature maps before using it.

    Example:
        >>> import torch
        >>> from unitscope.stats import Covariance
        >>> c = Covariance()
        >>> c.update(torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]]))
        >>> c.compute().cov.tolist()
        [[1.0, 2.0], [2.0, 4.0]]
        >>> c.compute().correlation().tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """

    rules: ClassVar[dict[str, str]] = {
        "count": "custom", "mean": "custom", "comoment": "custom", "nonfinite_rows": "sum",
    }

    def __init__(self, products: str = "float64") -> None:
        """``products``: the precision of each batch's centred cross-product matrix.

        ``"float64"`` (default) casts the batch to float64 first. ``"float32"`` centres a float32
        batch on its (float64) mean rounded to float32 and multiplies in float32, then corrects for
        the rounding of the mean and folds the product into the float64 state: about 4x cheaper on
        a CPU, with a relative error of the order of 1e-6 on each entry (for batches of tens of
        thousands of rows). The state, merges and results stay float64 either way.
        """
        super().__init__()
        if products not in ("float64", "float32"):
            raise ValueError(f"products={products!r}: use 'float64' or 'float32'")
        self.products = products

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"products": self.products}

    def _init_states(self, units: int, device: torch.device) -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self._states = {
            "count": torch.zeros((), **f64),
            "mean": torch.zeros(units, **f64),
            "comoment": torch.zeros(units, units, **f64),
            "nonfinite_rows": torch.zeros((), dtype=torch.int64, device=device),
        }

    @property
    def units(self) -> int | None:
        """Number of units (None before the first update)."""
        return int(self._states["mean"].shape[0]) if self.initialized else None

    def update(self, x: torch.Tensor) -> None:
        """Fold in a batch of shape ``(N, *unit_shape)`` (flattened to ``(N, units)``).

        Rows with any non-finite value are left out and counted in ``nonfinite_rows``.
        """
        x = as_matrix(x)
        low = self.products == "float32" and x.dtype == torch.float32
        if not low:
            x = x.to(torch.float64)
        if not self.initialized:
            self._init_states(x.shape[1], x.device)
        s = self._states
        if x.shape[1] != s["mean"].shape[0]:
            raise ValueError(f"Covariance: expected {s['mean'].shape[0]} units, got {x.shape[1]}")
        if x.shape[0] == 0:
            return
        colsum = x.sum(0, dtype=torch.float64)
        if bool(torch.isfinite(colsum).all()):
            # fast path: every value is finite (a NaN or inf would make its column sum non-finite)
            good = None
            n_b = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
            mean_b = colsum / n_b
            if low:
                # centre on the mean rounded to float32, multiply in float32, then remove the
                # rounding offset r exactly: sum (x-m)(x-m)^T = sum (x-m32)(x-m32)^T - n r r^T
                m32 = mean_b.to(torch.float32)
                xc32 = x - m32
                r = mean_b - m32.to(torch.float64)
                comoment_b = (xc32.T @ xc32).to(torch.float64) - n_b * torch.outer(r, r)
            else:
                xc = x - mean_b
                comoment_b = xc.T @ xc
        else:
            x = x.to(torch.float64)
            good = torch.isfinite(x).all(1, keepdim=True)  # (N, 1)
            n_b = good.sum(dtype=torch.float64)
            mean_b = torch.where(good, x, 0.0).sum(0) / n_b.clamp(min=1)
            xc = torch.where(good, x - mean_b, 0.0)
            comoment_b = xc.T @ xc
        s["count"], s["mean"], s["comoment"] = chan_combine(
            s["count"], s["mean"], s["comoment"], n_b, mean_b, comoment_b, outer=True)
        if good is not None:
            s["nonfinite_rows"] = s["nonfinite_rows"] + (~good).sum()

    def merge(self, other: Accumulator) -> Accumulator:
        """Fold ``other`` into ``self``; refuses states with a different number of units."""
        # checked before the base class touches any state, so a refused merge changes nothing
        if (isinstance(other, Covariance) and self.initialized and other.initialized
                and other._states["mean"].shape != self._states["mean"].shape):
            raise MergeError(
                f"Covariance: unit counts differ ({self._states['mean'].shape[0]} vs "
                f"{other._states['mean'].shape[0]})"
            )
        return super().merge(other)

    def _merge_states(self, theirs: dict[str, torch.Tensor]) -> None:
        s = self._states
        s["count"], s["mean"], s["comoment"] = chan_combine(
            s["count"], s["mean"], s["comoment"],
            theirs["count"], theirs["mean"], theirs["comoment"], outer=True)

    def _sync_states(self, group: Any) -> bool:
        # Sum-reducible form of the Chan merge (as in Moments): agree on the global mean, re-centre
        # each rank's comoment on it, then sum. Three all_reduces, no gather.
        s = self._states
        n_local, mean_local = s["count"].clone(), s["mean"].clone()
        total = n_local * mean_local
        dist.all_reduce(s["count"], group=group)
        dist.all_reduce(total, group=group)
        mean = total / s["count"].clamp(min=1)
        delta = mean_local - mean
        s["comoment"] = s["comoment"] + n_local * torch.outer(delta, delta)
        dist.all_reduce(s["comoment"], group=group)
        s["mean"] = torch.where(s["count"] > 0, mean, 0.0)
        self._all_reduce_elementwise(group)
        return True

    def compute(self, ddof: int = 1) -> CovarianceResult:
        """Mean and covariance normalised by ``count - ddof`` (``ddof=1``: unbiased)."""
        self._require_initialized()
        s = self._states
        n = s["count"]
        denom = torch.where(n > ddof, n - ddof, torch.ones_like(n))
        cov = torch.where(n > ddof, s["comoment"] / denom, torch.nan)
        mean = torch.where(n > 0, s["mean"], torch.nan)
        return CovarianceResult(count=n.clone(), mean=mean, cov=cov,
                                nonfinite_rows=s["nonfinite_rows"].clone())
