"""Paired Wilcoxon signed-rank tests of many units at once, rank-biserial effect sizes, FDR control.

For the "one augmentation at a time" contrast of Kharyuk et al. (spec A.7): every unit's paired
differences ``augmented - original`` are tested against a zero median with
``scipy.stats.wilcoxon(zero_method="zsplit", correction=True, method="approx")``, vectorised over
units. The effect size is the matched-pairs rank-biserial correlation (Kerby 2014),
``r = (R+ - R-) / (R+ + R-)`` with the ranks of zero differences split between both sums, so an
augmentation that never changes a unit gives ``r = 0`` and ``p = 1``. p-values are corrected with
Benjamini–Hochberg over every test of a study (the seed computed the correction and then stored the
uncorrected values, spec A.13 D4).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SignedRankResult:
    """Per-unit results, float64 tensors of the unit shape.

    Attributes:
        statistic: the Wilcoxon statistic (``min(R+, R-)`` as SciPy reports it).
        p_value: two-sided p-value (normal approximation with continuity correction).
        rank_biserial: ``(R+ - R-) / (R+ + R-)`` in [-1, 1]; positive when the augmentation raises
            the unit.
        n: number of pairs.
    """

    statistic: torch.Tensor
    p_value: torch.Tensor
    rank_biserial: torch.Tensor
    n: int


def signed_rank(diffs: torch.Tensor) -> SignedRankResult:
    """Wilcoxon signed-rank test of every unit's paired differences ``diffs (n, ...)``.

    Example:
        >>> d = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [5.0, 0.0]])
        >>> r = signed_rank(d)
        >>> r.rank_biserial.tolist(), r.p_value[1].item()
        ([1.0, 0.0], 1.0)
    """
    from scipy.stats import rankdata, wilcoxon

    if diffs.dim() < 1 or diffs.shape[0] < 2:
        raise ValueError(f"need at least 2 paired differences per unit, got shape {tuple(diffs.shape)}")
    shape = diffs.shape[1:]
    x = diffs.detach().reshape(diffs.shape[0], -1).double().cpu().numpy()
    if not np.isfinite(x).all():
        raise ValueError("paired differences contain NaN or inf; remove non-finite activations first")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = wilcoxon(x, axis=0, zero_method="zsplit", correction=True, method="approx")
    ranks = rankdata(np.abs(x), axis=0)
    plus = (ranks * (x > 0)).sum(0) + 0.5 * (ranks * (x == 0)).sum(0)
    minus = (ranks * (x < 0)).sum(0) + 0.5 * (ranks * (x == 0)).sum(0)
    r = (plus - minus) / (plus + minus)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float64)).reshape(shape)
    return SignedRankResult(t(res.statistic), t(res.pvalue), t(r), int(x.shape[0]))


def fdr_bh(p: torch.Tensor) -> torch.Tensor:
    """Benjamini–Hochberg adjusted p-values (q-values) of every entry of ``p``; NaN entries stay NaN
    and do not count as tests.

    Example:
        >>> [round(q, 6) for q in fdr_bh(torch.tensor([0.01, 0.04, 0.03, float("nan")])).tolist()[:3]]
        [0.03, 0.04, 0.04]
    """
    from scipy.stats import false_discovery_control

    flat = p.detach().reshape(-1).double().cpu().numpy()
    out = np.full_like(flat, np.nan)
    ok = np.isfinite(flat)
    if ok.any():
        if (flat[ok] < 0).any() or (flat[ok] > 1).any():
            raise ValueError("p-values must lie in [0, 1]")
        out[ok] = false_discovery_control(flat[ok], method="bh")
    return torch.from_numpy(out).reshape(p.shape)
