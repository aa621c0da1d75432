"""The dataset registry: ``load_dataset(name, split)``.

Registered names: ``digits`` (bundled), ``shapes`` (generated), ``image-folder`` (class subfolders of
images) and ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100`` (torchvision data from a local
``root``; unitscope never downloads). ``docs/data.md`` describes each one's options and items.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..registry import Registry

DATASETS: Registry = Registry("dataset")

SPLITS = ("train", "test")


class DatasetError(ValueError):
    """A dataset that cannot be built: bad options, or a root that is missing or laid out wrongly.

    The message names the path or option at fault and what to do instead.
    """


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset root, or files it must hold, that do not exist (also a ``FileNotFoundError``)."""


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
    build = DATASETS[name]
    known = [p for p in inspect.signature(build).parameters if p != "split"]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ValueError(f"dataset {name!r} has no option {unknown[0]!r}; its options: "
                         f"{', '.join(known) or 'none'}")
    return build(split=split, **kwargs)


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


@DATASETS.register("shapes")
def shapes(split: str = "test", n: int | None = None, size: int = 64, seed: int = 0,
           antialias: bool = True) -> Dataset:
    """Generated 3×``size``×``size`` images of one coloured shape each, with their generative factors.

    Items are ``(image, label, factors)``; see :func:`unitscope.data.shapes.shapes_dataset` for the
    options and :class:`unitscope.data.shapes.ShapesDataset` for the factors.

    Example:
        >>> data = load_dataset("shapes", "train", n=16)
        >>> data.name, data.classes, data.factors.shape
        ('shapes/train', ['circle', 'square', 'triangle', 'star'], torch.Size([16, 7]))
    """
    from .shapes import shapes_dataset

    return shapes_dataset(split, n=n, size=size, seed=seed, antialias=antialias)


@DATASETS.register("image-folder")
def image_folder(split: str = "test", root: str | Path | None = None, size: int = 224,
                 normalize: str | None = None) -> Dataset:
    """Images in class subfolders (``root/<class>/<image>``, or ``root/<split>/<class>/<image>``).

    Items are ``(image, label)``; see :class:`unitscope.data.folders.ImageFolderDataset`.

    Example:
        >>> load_dataset("image-folder", "test")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        unitscope.data.registry.DatasetError: image-folder: pass root=, ...
    """
    from .folders import ImageFolderDataset

    if root is None:
        raise DatasetError("image-folder: pass root=, a folder with one subfolder of images per class "
                           "(root/<class>/<image>, or root/train/<class>/... and root/test/<class>/...)")
    return ImageFolderDataset(root, split=split, size=size, normalize=normalize)


def _register_torchvision(name: str) -> None:
    def build(split: str = "test", root: str | Path | None = None) -> Dataset:
        from .folders import LocalTorchvisionDataset

        return LocalTorchvisionDataset(name, split=split, root=root)

    build.__name__ = build.__qualname__ = name.replace("-", "_")
    build.__doc__ = (f"torchvision's {name} read from a local ``root`` (never downloaded); items are "
                     f"``(image, label)``. See :class:`unitscope.data.folders.LocalTorchvisionDataset`.")
    DATASETS.register(name)(build)


for _name in ("mnist", "fashion-mnist", "cifar10", "cifar100"):
    _register_torchvision(_name)
