"""An in-memory dataset of input and label tensors, and dataset fingerprints for the manifest."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """Inputs ``x`` (N, ...) and integer labels ``y`` (N,) held in memory; items are ``(x[i], y[i])``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, name: str = "arrays",
                 classes: list[str] | None = None) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} items but y has {len(y)}")
        self.x, self.y, self.name = x, y, name
        if classes is None:
            classes = [str(c) for c in range(int(y.max()) + 1)] if len(y) else []
        self.classes = classes

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension."""
        return tuple(self.x.shape[1:])

    def fingerprint(self) -> str:
        """sha256 of the inputs and labels (the manifest records it)."""
        h = hashlib.sha256()
        for t in (self.x, self.y):
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def dataset_fingerprint(data: Any, probe: int = 8, spread: int = 64) -> str:
    """A fingerprint of any map-style dataset, to tell a changed dataset from the one a store holds.

    Exact where the dataset allows it: its own ``fingerprint()`` (``ArrayDataset``, the bundled
    datasets), every tensor of a ``TensorDataset``, or a ``Subset``'s indices and the fingerprint of
    the dataset under it. Any other dataset is identified by its type, its length and a sample of
    items: the first and last ``probe`` and ``spread`` more spaced evenly between them, so a change
    elsewhere can go unseen; give such a dataset a ``fingerprint()`` method to be sure.
    """
    if hasattr(data, "fingerprint"):
        return str(data.fingerprint())
    h = hashlib.sha256(f"{type(data).__name__}:{len(data)}".encode())
    if isinstance(data, torch.utils.data.TensorDataset):
        for t in data.tensors:
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
    if isinstance(data, torch.utils.data.Subset):
        h.update(dataset_fingerprint(data.dataset, probe, spread).encode())
        h.update(torch.as_tensor(list(data.indices), dtype=torch.int64).numpy().tobytes())
        return h.hexdigest()
    n = len(data)
    spaced = {round(i * (n - 1) / (spread - 1)) for i in range(spread)} if n > 1 and spread > 1 else set()
    for i in sorted({*range(min(probe, n)), *range(max(0, n - probe), n), *spaced}):
        item = data[i]
        for t in item if isinstance(item, (tuple, list)) else (item,):
            if isinstance(t, torch.Tensor):
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            else:
                h.update(repr(t).encode())
    return h.hexdigest()
