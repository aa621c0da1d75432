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


def dataset_fingerprint(data: Any, probe: int = 8) -> str:
    """A fingerprint of any map-style dataset: its own ``fingerprint()`` or a hash of a few items."""
    if hasattr(data, "fingerprint"):
        return str(data.fingerprint())
    h = hashlib.sha256(f"{type(data).__name__}:{len(data)}".encode())
    n = len(data)
    for i in sorted({*range(min(probe, n)), *range(max(0, n - probe), n)}):
        item = data[i]
        for t in item if isinstance(item, (tuple, list)) else (item,):
            if isinstance(t, torch.Tensor):
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            else:
                h.update(repr(t).encode())
    return h.hexdigest()
