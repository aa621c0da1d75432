"""Classifier evaluation: accuracy, per-class recall and precision, and the confusion matrix.

One streaming pass in ``torch.inference_mode()`` accumulates the confusion matrix (a sum-reducible
state, :func:`unitscope.stats.classification.confusion_matrix`), so any dataset size fits; every
metric is read from it. Works with any dataset whose items are ``(x, y, ...)``, image folders with
class subfolders included (``unitscope.load_dataset("image-folder", root=...)``).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..models.modes import preserved
from ..stats.classification import accuracy, confusion_matrix, matthews_corrcoef

COLUMNS = ["class", "name", "support", "predicted", "correct", "recall", "precision"]


def _labels(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[1], torch.Tensor):
        return item[0], item[1]
    if isinstance(item, dict) and all(isinstance(item.get(key), torch.Tensor) for key in ("x", "y")):
        return item["x"], item["y"]
    raise ValueError("evaluate_classifier needs labelled data: items must be (input, label, ...) or "
                     "{'x': input, 'y': label}; this dataset has no labels")


def evaluate_classifier(model: nn.Module, data: Dataset, batch_size: int = 256,
                        device: str | torch.device = "auto",
                        num_classes: int | None = None) -> tuple[pd.DataFrame, torch.Tensor]:
    """Accuracy and confusion matrix of ``model`` on ``data`` (prediction = argmax of the output).

    Args:
        model: a classifier returning ``(N, classes)`` scores; put in eval mode for the pass and
            restored afterwards.
        data: items ``(x, y, ...)`` with integer labels ``y``.
        batch_size: inputs per forward.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        num_classes: default the model's output width.

    Returns:
        ``(table, confusion)``. ``table`` has one row per class (``class, name, support,
        predicted, correct, recall, precision``) and a last row ``class = -1, name = "all"``
        whose micro-averaged ``recall`` and ``precision`` both equal the accuracy.
        ``confusion`` is ``(classes, classes)`` int64, rows true, columns predicted.

    Example:
        >>> import unitscope
        >>> table, cm = evaluate_classifier(unitscope.load_model("digits-cnn"),
        ...                                 unitscope.load_dataset("digits", "test"), device="cpu")
        >>> tuple(cm.shape), int(cm.sum()), table["name"].iloc[-1]
        ((10, 10), 360, 'all')
    """
    from ..engine import resolve_device

    if len(data) == 0:
        raise ValueError("the dataset is empty: there is nothing to evaluate; check its root or split")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    cm = None
    with preserved(model):
        model.eval().to(dev)
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
        with torch.inference_mode():
            for item in loader:
                x, y = _labels(item)
                out = model(x.to(dev))
                if not isinstance(out, torch.Tensor) or out.dim() != 2:
                    raise ValueError(f"{type(model).__name__} returned "
                                     f"{tuple(getattr(out, 'shape', ()))}, not (N, classes) scores")
                n = num_classes or out.shape[1]
                if n < out.shape[1]:
                    raise ValueError(f"num_classes={n} but the model has {out.shape[1]} outputs; "
                                     "leave num_classes out or pass at least the output width")
                y = y.to(dev).long().reshape(-1)
                if len(y) and (y.min() < 0 or y.max() >= n):
                    raise ValueError(f"label {int(y.max() if y.max() >= n else y.min())} is outside "
                                     f"0..{n - 1}: the model has {out.shape[1]} outputs; pass "
                                     "num_classes= or the matching model")
                part = confusion_matrix(out.argmax(1), y, n)
                cm = part if cm is None else cm + part
    cm = cm.cpu()
    names = list(getattr(data, "classes", None) or [])
    n = cm.shape[0]
    names = [str(names[i]) if i < len(names) else str(i) for i in range(n)]
    support, predicted, correct = cm.sum(1), cm.sum(0), cm.diagonal()
    total, hits, acc = int(cm.sum()), int(correct.sum()), accuracy(cm)
    table = pd.DataFrame({
        "class": [*range(n), -1], "name": [*names, "all"],
        "support": [*support.tolist(), total], "predicted": [*predicted.tolist(), total],
        "correct": [*correct.tolist(), hits],
        "recall": [*_ratio(correct, support), acc], "precision": [*_ratio(correct, predicted), acc],
    }, columns=COLUMNS)
    return table, cm


def _ratio(num: torch.Tensor, den: torch.Tensor) -> list[float]:
    return [float(a) / float(b) if b else float("nan") for a, b in zip(num.tolist(), den.tolist())]


def confusion_table(confusion: torch.Tensor) -> pd.DataFrame:
    """The confusion matrix as a tidy table ``true, predicted, count`` (for a run directory)."""
    n = confusion.shape[0]
    true = torch.arange(n).repeat_interleave(n)
    pred = torch.arange(n).repeat(n)
    return pd.DataFrame({"true": true.numpy(), "predicted": pred.numpy(),
                         "count": confusion.reshape(-1).numpy()})


def confusion_from_table(table: pd.DataFrame) -> torch.Tensor:
    """Inverse of :func:`confusion_table`."""
    n = int(max(table["true"].max(), table["predicted"].max())) + 1
    cm = torch.zeros(n, n, dtype=torch.int64)
    cm[torch.tensor(table["true"].to_numpy()), torch.tensor(table["predicted"].to_numpy())] = torch.tensor(
        table["count"].to_numpy(), dtype=torch.int64)
    return cm


def plot_confusion(confusion: torch.Tensor, names: list[str] | None = None, title: str = "",
                   ax: Any = None) -> Any:
    """Row-normalised confusion matrix (recall per true class) with counts; returns the figure."""
    from matplotlib.figure import Figure

    n = confusion.shape[0]
    if ax is None:
        side = min(9.0, 2.0 + 0.45 * n)
        fig = Figure(figsize=(side + 1, side), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    cm = confusion.to(torch.float64)
    rows = cm / cm.sum(1, keepdim=True).clamp(min=1)
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    labels = names if names is not None and len(names) == n else [str(i) for i in range(n)]
    ax.set_xticks(range(n), labels, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), labels)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"accuracy {accuracy(confusion):.3f}, "
                 f"Matthews {matthews_corrcoef(confusion):.3f}")
    return fig
