"""Per-unit streaming moments: count, mean, variance, min, max, and how many values were not finite.

Updates use the pairwise formula of Chan, Golub and LeVeque (1979) in float64: each batch's
count, mean and centred sum of squares are computed exactly, then combined with the running
state, so no ``E[x^2] - E[x]^2`` cancellation occurs. Non-finite values (NaN, +-inf) are counted
per unit and left out of every statistic, never averaged in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from .base import Accumulator, as_matrix


@dataclass(frozen=True)
class MomentsResult:
    """Per-unit results, each a float64 tensor of shape ``(units,)``.

    ``var`` and ``std`` are unbiased (divide by ``count - 1``); NaN where ``count < 2``.
    """

    count: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    std: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    nonfinite: torch.Tensor


def chan_combine(n_a: torch.Tensor, mean_a: torch.Tensor, m2_a: torch.Tensor,
                 n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor,
                 outer: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine (count, mean, centred second moment) of two disjoint samples.

    With ``outer=True`` the second moments are comoment matrices and the correction term is the
    outer product of the mean difference (covariance case); counts are then scalars.
    """
    n = n_a + n_b
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / safe_n)
    w = n_a * n_b / safe_n
    m2 = m2_a + m2_b + (w * torch.outer(delta, delta) if outer else w * delta * delta)
    return n, mean, m2


class Moments(Accumulator):
    """Count, mean, variance, min and max of every unit, streamed and mergeable.

    Example:
        >>> import torch
        >>> from unitscope.stats import Moments
        >>> m = Moments()
        >>> m.update(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
        >>> m.compute().mean.tolist()
        [2.0, 20.0]
    """

    rules: ClassVar[dict[str, str]] = {
        "count": "custom", "mean": "custom", "m2": "custom",
        "min": "min", "max": "max", "nonfinite": "sum",
    }

    def _init_states(self, units: int, device: torch.device) -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self._states = {
            "count": torch.zeros(units, **f64),
            "mean": torch.zeros(units, **f64),
            "m2": torch.zeros(units, **f64),
            "min": torch.full((units,), torch.inf, **f64),
            "max": torch.full((units,), -torch.inf, **f64),
            "nonfinite": torch.zeros(units, dtype=torch.int64, device=device),
        }

    def update(self, x: torch.Tensor) -> None:
        """Fold in a batch of shape ``(N, *unit_shape)`` (flattened to ``(N, units)``)."""
        x = as_matrix(x).to(torch.float64)
        if not self.initialized:
            self._init_states(x.shape[1], x.device)
        s = self._states
        if x.shape[1] != s["mean"].shape[0]:
            raise ValueError(f"Moments: expected {s['mean'].shape[0]} units, got {x.shape[1]}")
        if x.shape[0] == 0:
            return
        finite = torch.isfinite(x)
        n_b = finite.sum(0, dtype=torch.float64)
        xz = torch.where(finite, x, 0.0)
        mean_b = xz.sum(0) / n_b.clamp(min=1)
        m2_b = torch.where(finite, x - mean_b, 0.0).square().sum(0)
        s["count"], s["mean"], s["m2"] = chan_combine(
            s["count"], s["mean"], s["m2"], n_b, mean_b, m2_b)
        s["min"] = torch.minimum(s["min"], torch.where(finite, x, torch.inf).amin(0))
        s["max"] = torch.maximum(s["max"], torch.where(finite, x, -torch.inf).amax(0))
        s["nonfinite"] += (~finite).sum(0)

    def _merge_states(self, theirs: dict[str, torch.Tensor]) -> None:
        s = self._states
        s["count"], s["mean"], s["m2"] = chan_combine(
            s["count"], s["mean"], s["m2"], theirs["count"], theirs["mean"], theirs["m2"])

    def _sync_states(self, group: Any) -> bool:
        # Sum-reducible form of the Chan merge: agree on the global mean, then re-centre each
        # rank's second moment on it before summing. Three all_reduces, no gather.
        s = self._states
        n_local, mean_local = s["count"].clone(), s["mean"].clone()
        total = (n_local * mean_local)
        dist.all_reduce(s["count"], group=group)
        dist.all_reduce(total, group=group)
        mean = total / s["count"].clamp(min=1)
        s["m2"] = s["m2"] + n_local * (mean_local - mean).square()
        dist.all_reduce(s["m2"], group=group)
        s["mean"] = torch.where(s["count"] > 0, mean, 0.0)
        self._all_reduce_elementwise(group)
        return True

    def compute(self) -> MomentsResult:
        """Per-unit count, mean, unbiased variance and std, min, max and non-finite count."""
        self._require_initialized()
        s = self._states
        n = s["count"]
        var = torch.where(n > 1, s["m2"] / (n - 1).clamp(min=1), torch.nan)
        mean = torch.where(n > 0, s["mean"], torch.nan)
        return MomentsResult(count=n.clone(), mean=mean, var=var, std=var.sqrt(),
                             min=torch.where(n > 0, s["min"], torch.nan),
                             max=torch.where(n > 0, s["max"], torch.nan),
                             nonfinite=s["nonfinite"].clone())
