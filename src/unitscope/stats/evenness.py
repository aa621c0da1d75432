"""Pielou evenness of predicted classes, and the Pearson correlation used to relate it to coverage.

Pielou's evenness J = H / ln S (Pielou 1966), where H = -Σ p_c ln p_c is the Shannon entropy of
the class frequencies and S the richness: the number of classes there are (``"total"``, the
brief's J = H / log k) or the number actually predicted (``"observed"``, as SEED's RQ4 code).
J is in [0, 1]; uniform predictions give 1. With S <= 1 the ratio is 0/0; SEED returns 0 and so
does this module.

Example (spec coverage.md §5.5):
    >>> import torch
    >>> pielou(torch.tensor([0, 0, 1, 1]), num_classes=4)
    0.5
    >>> pielou(torch.tensor([0, 0, 1, 1]), richness="observed")
    1.0
    >>> round(pielou(torch.tensor([0, 0, 0, 1]), num_classes=2), 6)
    0.811278
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch


def pielou(predictions: torch.Tensor | Sequence[int], num_classes: int | None = None,
           richness: str = "total") -> float:
    """Pielou's evenness J of a set of predicted class indices.

    Args:
        predictions: class index of every input (any integer tensor or sequence).
        num_classes: the number of classes k (needed for ``richness="total"``).
        richness: ``"total"`` (S = k, penalises classes never predicted) or ``"observed"``
            (S = classes predicted at least once, SEED).

    Raises:
        ValueError: an unknown richness, ``"total"`` without ``num_classes``, a class outside
            ``[0, num_classes)``, or no predictions.
    """
    p = torch.as_tensor(predictions).long().reshape(-1)
    if p.numel() == 0:
        raise ValueError("pielou() needs at least one prediction")
    if richness not in ("total", "observed"):
        raise ValueError(f"richness={richness!r}: use 'total' (all classes) or 'observed' "
                         "(the classes predicted)")
    if int(p.min()) < 0:
        raise ValueError("class indices must be >= 0")
    if richness == "total":
        if num_classes is None:
            raise ValueError("richness='total' needs num_classes (or use richness='observed')")
        if int(p.max()) >= num_classes:
            raise ValueError(f"a prediction is class {int(p.max())}, outside [0, {num_classes})")
    counts = torch.bincount(p).double()
    counts = counts[counts > 0]
    s = int(num_classes) if richness == "total" else len(counts)
    if s <= 1:
        return 0.0
    freq = counts / counts.sum()
    h = float(-(freq * freq.log()).sum())
    return h / math.log(s) + 0.0  # + 0.0: one class predicted gives 0.0, not -0.0


def pearson(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> float:
    """Pearson's r of two equally long vectors; NaN (with a warning) for < 3 points or a constant vector."""
    x = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"pearson(): lengths differ ({x.numel()} vs {y.numel()})")
    if x.numel() < 3:
        warnings.warn("pearson(): fewer than 3 points; r is undefined (NaN)", stacklevel=2)
        return math.nan
    if bool((x == x[0]).all()) or bool((y == y[0]).all()):  # exactly: the centred values may not be 0
        warnings.warn("pearson(): a constant vector; r is undefined (NaN)", stacklevel=2)
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum()) / float(dx.norm() * dy.norm())
