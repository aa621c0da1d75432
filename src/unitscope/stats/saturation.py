"""Intrinsic dimension and saturation of a layer from its covariance (Shenk et al., arXiv 2006.08679).

With eigenvalues λ₁ ≥ … ≥ λ_d of a layer's output covariance and cumulative explained variance
c_k = (λ₁ + … + λ_k) / Σλ, the intrinsic dimension is k*(δ) = min{k : c_k ≥ δ} and the
saturation is k*/d. ``rule="delve"`` reproduces the peer library delve (0.1.x): with
m = #{k : c_k < δ}, k = 1 if m = 0, else m + 1 if δ − c_m > 0.02, else m; it can return one
direction fewer than the textbook rule and explain less than δ (e.g. [0.98, 0.02] at δ = 0.99
gives 1, and 34 or more equal eigenvalues give one fewer than their count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RULES = ("textbook", "delve")
_TOL = 1e-12


def check_delta(delta: float) -> float:
    """Return ``delta`` if it lies in (0, 1], else raise a ValueError that says so."""
    if not 0.0 < float(delta) <= 1.0:
        raise ValueError(f"delta={delta}: the explained-variance threshold must lie in (0, 1], "
                         "e.g. 0.99")
    return float(delta)


def eigenvalues(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric matrix, descending, negative round-off clipped to 0 (float64)."""
    vals = torch.linalg.eigvalsh(cov.to(torch.float64))
    return vals.flip(-1).clamp(min=0.0)


def intrinsic_dimension(eigvals: torch.Tensor, delta: float = 0.99, rule: str = "textbook") -> int:
    """Number of leading eigen-directions needed to explain ``delta`` of the variance.

    Args:
        eigvals: eigenvalues in descending order (see :func:`eigenvalues`).
        delta: threshold in (0, 1].
        rule: ``"textbook"`` (smallest k with c_k ≥ δ, compared against δ − 1e-12) or ``"delve"``.
            With δ = 1 both give the numerical rank (eigenvalues above 1e-12 of the largest): delve's
            own rule would drop one of d equal directions even there.

    Returns:
        k; 0 for a dead layer (all eigenvalues zero).

    Example:
        >>> import torch
        >>> intrinsic_dimension(torch.tensor([0.98, 0.02]), 0.99)
        2
        >>> intrinsic_dimension(torch.tensor([0.98, 0.02]), 0.99, rule="delve")
        1
    """
    delta = check_delta(delta)
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}: use one of {', '.join(RULES)}")
    total = eigvals.sum()
    if total <= 0:
        return 0
    if delta >= 1:  # spec 1.4, for either rule: the numerical rank, every direction with variance
        return int((eigvals > _TOL * eigvals[0]).sum())
    cum = eigvals.cumsum(0) / total
    if rule == "textbook":
        return int((cum < delta - _TOL).sum()) + 1
    m = int((cum < delta).sum())
    if m == 0:
        return 1
    return m + 1 if delta - float(cum[m - 1]) > 0.02 else m


@dataclass(frozen=True)
class SaturationResult:
    """Saturation of one layer: width d, intrinsic dimension k, k/d, and what it was computed from."""

    width: int
    intrinsic_dim: int
    saturation: float
    samples: int
    dead: bool
    eigenvalues: torch.Tensor


def saturation(cov: torch.Tensor, samples: int, delta: float = 0.99,
               rule: str = "textbook") -> SaturationResult:
    """Saturation k/d of a layer with covariance ``cov`` (d × d) estimated from ``samples`` rows.

    Example:
        >>> import torch
        >>> saturation(torch.diag(torch.tensor([0.5, 0.3, 0.15, 0.05])), samples=100).intrinsic_dim
        4
    """
    vals = eigenvalues(cov)
    k = intrinsic_dimension(vals, delta, rule)
    d = int(cov.shape[0])
    return SaturationResult(width=d, intrinsic_dim=k, saturation=k / d, samples=int(samples),
                            dead=k == 0, eigenvalues=vals)


def projection(cov: torch.Tensor, k: int) -> torch.Tensor:
    """The d × d orthogonal projection onto the ``k`` leading eigen-directions of ``cov``."""
    vals, vecs = torch.linalg.eigh(cov.to(torch.float64))
    top = vecs[:, vals.argsort(descending=True)[:k]]
    return top @ top.T
