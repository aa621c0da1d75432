"""Streaming covariance (and correlation) between all units of a layer.

Each batch contributes its exact mean and centred cross-product matrix ``Xc^T Xc`` in float64;
batches and shards are combined with the matrix form of the Chan, Golub and LeVeque (1979) update
(:func:`~unitscope.stats.moments.chan_combine` with ``outer=True``), so no
``E[xy] - E[x]E[y]`` cancellation occurs even for activations with a large common offset.
(:meth:`Covariance.update_shifted` centres on a shift given by its caller instead, and is as
accurate as that shift is close to the mean.)

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

        ``"float64"`` (default) casts the batch to float64 first. ``"float32"`` keeps a float32
        batch in float32 (and lifts a float16 or bfloat16 one to float32): it is centred on its
        float32 mean, its sums and cross-products are taken in float32, the offset of that centre
        from the exact mean is removed, and the result is folded into the float64 state. That is
        about 5x cheaper on a CPU. Float32 accumulation errors grow like eps·√rows: about 1e-5 of
        the largest covariance entry, and about 1e-8 of the standard deviation on the mean, for
        batches of about 3e4 rows. The state, merges and results stay float64 either way.
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
        x = self._prepare(x)
        if x.shape[0] == 0:
            return
        shift = x.sum(0) / x.shape[0]
        # a NaN or inf makes its column's mean non-finite (so can a float32 sum that overflows)
        if not (bool(torch.isfinite(shift).all()) and self._fold_shifted(x - shift, shift)):
            self._fold_masked(x.to(torch.float64))

    def update_shifted(self, xs: torch.Tensor, shift: torch.Tensor) -> None:
        """Fold in the rows ``xs + shift``, given already reduced by a finite ``(units,)`` vector.

        The same result as ``update(xs + shift)``, for a caller that copies its data anyway and
        can subtract a shift in that copy, which spares the centring pass of :meth:`update`. The
        products are those of ``xs``, so the shift must be near the mean: the relative error grows
        like eps · (1 + ‖mean − shift‖² / variance), in float64 as in float32 (with the mean as
        the shift, this is what :meth:`update` does).
        """
        xs = self._prepare(xs)
        if xs.shape[0] == 0:
            return
        if tuple(shift.shape) != (xs.shape[1],):
            raise ValueError(f"update_shifted: the shift must have shape ({xs.shape[1]},), got "
                             f"{tuple(shift.shape)}")
        if not bool(torch.isfinite(shift).all()):
            raise ValueError("update_shifted: the shift must be finite")
        if not self._fold_shifted(xs, shift):
            self._fold_masked(xs.to(torch.float64) + shift.to(torch.float64))

    def product_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The precision a batch of ``dtype`` is summed and multiplied in.

        float32 for float32, float16 and bfloat16 batches (autocast outputs) with
        ``products="float32"``; float64 otherwise.
        """
        cheap = self.products == "float32" and dtype in (torch.float32, torch.float16, torch.bfloat16)
        return torch.float32 if cheap else torch.float64

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a matrix in the precision of the products; checks (or sets) the unit count."""
        x = as_matrix(x)
        x = x.to(self.product_dtype(x.dtype))
        if not self.initialized:
            self._init_states(x.shape[1], x.device)
        units = self._states["mean"].shape[0]
        if x.shape[1] != units:
            raise ValueError(f"Covariance: expected {units} units, got {x.shape[1]}")
        return x

    def _fold_shifted(self, xs: torch.Tensor, shift: torch.Tensor) -> bool:
        """Fold rows ``xs + shift`` if they are all finite (False, folding nothing, otherwise).

        With ``s = sum(xs)`` the exact mean is ``shift + s / n`` and
        ``sum (x - m)(x - m)^T = xs^T xs - s s^T / n``; sums and products are taken in the
        precision of ``xs``, the correction and the fold in float64.
        """
        with _full_precision(xs):
            colsum = xs.sum(0)
            if not bool(torch.isfinite(colsum).all()):
                return False
            n_b = torch.tensor(float(xs.shape[0]), dtype=torch.float64, device=xs.device)
            s_b = colsum.to(torch.float64)
            mean_b = shift.to(device=xs.device, dtype=torch.float64) + s_b / n_b
            comoment_b = (xs.T @ xs).to(torch.float64) - torch.outer(s_b, s_b) / n_b
            if not bool(torch.isfinite(comoment_b).all()):  # a float32 product overflowed
                return False
            self._fold(n_b, mean_b, comoment_b)
        return True

    def _fold_masked(self, x: torch.Tensor) -> None:
        """Fold the finite rows of a float64 ``x`` and count the others."""
        good = torch.isfinite(x).all(1, keepdim=True)  # (N, 1)
        n_b = good.sum(dtype=torch.float64)
        mean_b = torch.where(good, x, 0.0).sum(0) / n_b.clamp(min=1)
        xc = torch.where(good, x - mean_b, 0.0)
        self._fold(n_b, mean_b, xc.T @ xc)  # float64: autocast leaves it alone
        self._states["nonfinite_rows"] = self._states["nonfinite_rows"] + (~good).sum()

    def _fold(self, n_b: torch.Tensor, mean_b: torch.Tensor, comoment_b: torch.Tensor) -> None:
        """The Chan et al. combination of the state with a batch's count, mean and comoment."""
        s = self._states
        s["count"], s["mean"], s["comoment"] = chan_combine(
            s["count"], s["mean"], s["comoment"], n_b, mean_b, comoment_b, outer=True)

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
        self._fold(theirs["count"], theirs["mean"], theirs["comoment"])

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


def _full_precision(x: torch.Tensor) -> Any:
    """Autocast off: an update may run inside a forward hook under the caller's ``torch.autocast``,
    which would otherwise take the cross-products in bfloat16 or float16."""
    return torch.autocast(x.device.type, enabled=False)
