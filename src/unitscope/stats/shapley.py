"""Shapley effects of independent inputs by the random-permutation estimator (Song, Nelson, Staum 2016).

For a permutation ``σ`` of the ``d`` inputs and a position ``i``, the cost
``c_i = E[Var(Y | X_σ(i+1..d))]`` is estimated by ``n_outer`` draws of the inputs after position
``i``, each with ``n_inner`` draws of the inputs up to ``i``: the mean over outer draws of the
inner variance (ddof 1). ``c_d`` (nothing fixed) is the total variance, ``c_0 = 0``, and input
``σ(i)`` gets ``c_i - c_(i-1)``. Averaged over permutations and divided by the total variance
these are the Shapley effects; they sum to 1 (spec A.6). With ``d! <= n_perm`` every permutation
is used once (no permutation noise).

Inputs are uniform on [0, 1)^d (map them onto ranges in ``f``); every output element of ``f`` is
estimated at once, and evaluations are streamed permutation by permutation (memory O(d × outputs)).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShapleyResult:
    """Shapley effects ``(d, ...)`` (normalised by the variance), the raw values and the variance."""

    effects: torch.Tensor
    values: torch.Tensor
    variance: torch.Tensor
    evaluations: int


def permutations(d: int, n_perm: int, generator: torch.Generator) -> torch.Tensor:
    """``(P, d)`` orderings: all ``d!`` if there are at most ``n_perm``, else ``n_perm`` random ones."""
    if math.factorial(d) <= n_perm:
        return torch.tensor(list(itertools.permutations(range(d))), dtype=torch.long)
    return torch.stack([torch.randperm(d, generator=generator) for _ in range(n_perm)])


def shapley_effects(f: Callable[[torch.Tensor], torch.Tensor], d: int, n_perm: int = 64,
                    n_outer: int = 16, n_inner: int = 4, seed: int = 0,
                    groups: list[list[int]] | None = None) -> ShapleyResult:
    """Shapley effects of every output of ``f`` with respect to its ``d`` independent U(0, 1) inputs.

    Args:
        f: maps points ``(rows, d)`` in [0, 1) to outputs ``(rows, ...)``; called once per
            permutation with ``d · n_outer · n_inner`` rows.
        d: number of inputs.
        n_perm: permutations (all of them when ``d! <= n_perm``).
        n_outer, n_inner: outer and inner draws per position (``n_inner >= 2``).
        seed: seeds the permutations and the draws.
        groups: the columns of each player (default: one per column); a group's columns are
            fixed or varied together, so its effect is the group's own Shapley effect (not the
            sum of its members' effects).

    Returns:
        A :class:`ShapleyResult`; ``effects`` ``(players, ...)`` sum to 1 (NaN for constant outputs).

    Example:
        >>> r = shapley_effects(lambda x: x[:, 0] + 2 * x[:, 1], d=2, n_outer=4096, n_inner=4)
        >>> [round(v, 1) for v in r.effects.tolist()]
        [0.2, 0.8]
    """
    if d < 1 or n_perm < 1 or n_outer < 1:
        raise ValueError("d, n_perm and n_outer must be >= 1")
    if n_inner < 2:
        raise ValueError(f"n_inner={n_inner}: an inner variance needs at least 2 draws")
    groups = [[j] for j in range(d)] if groups is None else groups
    owner = torch.full((d,), -1, dtype=torch.long)
    for g, cols in enumerate(groups):
        owner[cols] = g
    if (owner < 0).any() or sum(len(c) for c in groups) != d:
        raise ValueError(f"groups must split the columns 0..{d - 1} into disjoint lists, got {groups}")
    p = len(groups)
    gen = torch.Generator().manual_seed(seed)
    perms = permutations(p, n_perm, gen)
    values: torch.Tensor | float = 0.0
    total: torch.Tensor | float = 0.0
    pos = torch.arange(p)
    for perm in perms:
        # rank[g] = position of player g in this ordering; at step i the players with rank <= i vary
        rank = torch.empty(p, dtype=torch.long)
        rank[perm] = pos
        outer = torch.rand(p, n_outer, 1, d, generator=gen, dtype=torch.float64)
        inner = torch.rand(p, n_outer, n_inner, d, generator=gen, dtype=torch.float64)
        varies = rank[owner][None, None, None, :] <= pos[:, None, None, None]
        x = torch.where(varies, inner, outer.expand_as(inner))
        y = f(x.reshape(-1, d)).double()
        y = y.reshape(p, n_outer, n_inner, *y.shape[1:])
        cost = y.var(dim=2, correction=1).mean(dim=1)  # (positions, ...)
        gain = cost - torch.cat([torch.zeros_like(cost[:1]), cost[:-1]])
        contrib = torch.zeros_like(gain)
        contrib[perm] = gain
        values = values + contrib
        total = total + cost[-1]
    values, total = torch.as_tensor(values) / len(perms), torch.as_tensor(total) / len(perms)
    safe = torch.where(total > 0, total, math.nan)
    evaluations = len(perms) * p * n_outer * n_inner
    return ShapleyResult(values / safe, values, total, evaluations)
