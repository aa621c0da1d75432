"""Classification metrics from a confusion matrix: accuracy and the multiclass Matthews coefficient.

The confusion matrix is a sum-reducible state, so these metrics stream and merge like every
other accumulator state.
"""

from __future__ import annotations

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts; rows are true classes, columns predictions.

    Example:
        >>> import torch
        >>> confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), 2).tolist()
        [[1, 1], [0, 1]]
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}")
    flat = target.long() * num_classes + pred.long()
    counts = torch.bincount(flat.flatten(), minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def accuracy(confusion: torch.Tensor) -> float:
    """Fraction of correct predictions (trace over total); NaN for an empty matrix."""
    total = confusion.sum()
    return float(confusion.trace() / total) if total else float("nan")


def matthews_corrcoef(confusion: torch.Tensor) -> float:
    """Multiclass Matthews correlation coefficient (Gorodkin 2004, the R_K statistic).

    ``(c·s − t·p) / sqrt((s² − p·p)(s² − t·t))`` with ``c`` correct predictions, ``s`` samples,
    ``t`` true counts and ``p`` predicted counts per class; 0 when a denominator vanishes (as
    scikit-learn does).
    """
    cm = confusion.to(torch.float64)
    s, c = cm.sum(), cm.trace()
    t, p = cm.sum(1), cm.sum(0)
    num = c * s - t @ p
    den = torch.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float(num / den) if den > 0 else 0.0
