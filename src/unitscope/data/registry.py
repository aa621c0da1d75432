"""The dataset registry: ``load_dataset(name, split)``."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from ..registry import Registry

DATASETS: Registry = Registry("dataset")

SPLITS = ("train", "test")


def load_dataset(name: str, split: str = "test", **kwargs: Any) -> Dataset:
    """Build a registered dataset by name.

    Args:
        name: a registered name (``unitscope.data.DATASETS.names()`` lists them), e.g. ``"digits"``.
        split: ``"train"`` or ``"test"``.
        **kwargs: options of that dataset.

    Example:
        >>> import unitscope
        >>> len(unitscope.load_dataset("digits", split="test"))
        360
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return DATASETS[name](split=split, **kwargs)


@DATASETS.register("digits")
def digits(split: str = "test") -> Dataset:
    """scikit-learn's bundled 8×8 digits (1,797 images, 10 classes), scaled to [0, 1].

    The split is fixed: a stratified 80/20 cut with ``random_state=0`` (1,437 train, 360 test).
    """
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from .arrays import ArrayDataset

    bunch = load_digits()
    idx = list(range(len(bunch.target)))
    train_idx, test_idx = train_test_split(idx, test_size=0.2, random_state=0, stratify=bunch.target)
    chosen = sorted(train_idx if split == "train" else test_idx)
    x = torch.tensor(bunch.images[chosen], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target[chosen], dtype=torch.int64)
    return ArrayDataset(x, y, name=f"digits/{split}", classes=[str(c) for c in range(10)])
