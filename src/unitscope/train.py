"""Training small models in seconds, so the demo and tests analyse trained networks.

This is the minimal loop the demo needs: a chosen optimiser, learning rate, batch size and
number of epochs, seeded, with per-epoch loss and accuracy. Checkpoints, resume and callbacks
come with the training issue.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .engine import resolve_device

log = logging.getLogger(__name__)

OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def evaluate(model: nn.Module, data: Dataset, batch_size: int = 512,
             device: str | torch.device = "auto") -> float:
    """Top-1 accuracy of ``model`` on ``(input, label)`` items of ``data``."""
    dev = resolve_device(device)
    was_training = model.training
    model.eval().to(dev)
    correct = total = 0
    with torch.inference_mode():
        for x, y in DataLoader(data, batch_size=batch_size):
            pred = model(x.to(dev)).argmax(1)
            correct += int((pred == y.to(dev)).sum())
            total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def train(model: nn.Module, train_data: Dataset, test_data: Dataset | None = None, *,
          epochs: int = 5, lr: float = 1e-3, batch_size: int = 64, optimizer: str = "adam",
          seed: int = 0, device: str | torch.device = "auto") -> list[dict[str, Any]]:
    """Train ``model`` in place with cross-entropy; return one metrics dict per epoch.

    Example:
        >>> import unitscope
        >>> from unitscope.train import train
        >>> model = unitscope.load_model("digits-cnn")
        >>> history = train(model, unitscope.load_dataset("digits", "train"), epochs=1)
        >>> sorted(history[0])
        ['epoch', 'loss', 'test_acc', 'train_acc']
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if len(train_data) == 0:
        raise ValueError("the training set is empty")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(dev).train()
    opt = OPTIMIZERS[optimizer](model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    for epoch in range(1, epochs + 1):
        total_loss = correct = seen = 0.0
        for x, y in DataLoader(train_data, batch_size=batch_size, shuffle=True, generator=gen):
            x, y = x.to(dev), y.to(dev)
            opt.zero_grad()
            logits = model(x)
            loss = loss_fn(logits, y)
            loss.backward()
            opt.step()
            total_loss += float(loss.detach()) * len(y)
            correct += float((logits.argmax(1) == y).sum())
            seen += len(y)
        row = {"epoch": epoch, "loss": total_loss / seen, "train_acc": correct / seen,
               "test_acc": evaluate(model, test_data, device=dev) if test_data is not None else None}
        test = f"{row['test_acc']:.3f}" if row["test_acc"] is not None else "-"
        log.info("epoch %d: loss %.4f, train acc %.3f, test acc %s", epoch, row["loss"],
                 row["train_acc"], test)
        history.append(row)
    model.eval()
    return history
