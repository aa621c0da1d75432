"""Datasets read from local files: class subfolders of images, and torchvision's datasets from a root.

Nothing here touches the network: torchvision datasets are opened with ``download=False``, and a
missing root or missing files raise a :class:`~unitscope.data.registry.DatasetError` that says where
unitscope looked and how to fetch the data on a machine with network.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from .registry import SPLITS, DatasetError, DatasetNotFoundError

#: Per-channel mean and std of ImageNet, for ``normalize="imagenet"``.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZE = ("imagenet", None)


def load_image(path: str) -> Any:
    """An image as RGB: a PIL image for 8-bit modes, a float ``(3, H, W)`` tensor in [0, 1] otherwise.

    PIL's RGB conversion clips 16-bit and 32-bit grey images to 255 (a 16-bit scan becomes almost
    white), so those are scaled by their type's range here: ``I;16`` by 65535; ``I`` (32-bit
    integers) by the bit depth a TIFF records when it is 8 or 16, and otherwise by 255 when its
    values fit 8 bits (as PIL read them) and by 65535 when they fit 16, a guess from the image's
    own maximum; ``F`` (float) as it is when it lies in [0, 1] (NaN aside). Other ranges are an
    error that names the file.
    """
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if not (img.mode.startswith("I") or img.mode == "F"):
            return img.convert("RGB")
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        mode = img.mode
        bits = getattr(img, "tag_v2", {}).get(258)  # a TIFF's BitsPerSample: the file says its range
    bits = bits[0] if isinstance(bits, tuple) else bits
    if mode.startswith("I;16"):
        a = a / 65535.0
    elif mode == "I" and bits in (8, 16) and a.size and a.min() >= 0 and a.max() < 2 ** bits:
        a = a / (2.0 ** bits - 1)
    elif mode == "I" and bits not in (8, 16) and a.size and a.min() >= 0 and a.max() <= 65535:
        a = a / (255.0 if a.max() <= 255 else 65535.0)  # no 8/16-bit depth stored: guess, as PIL read it
    elif not (mode == "F" and a.size and 0.0 <= np.nanmin(a) and np.nanmax(a) <= 1.0):
        low, high = (float(np.nanmin(a)), float(np.nanmax(a))) if a.size else (math.nan, math.nan)
        raise DatasetError(f"image-folder: {path} is a {mode} image with values in [{low:g}, {high:g}], "
                           "which has no standard [0, 1] scale; save it as 8- or 16-bit, or as float in "
                           "[0, 1]")
    grey = torch.from_numpy(a.astype(np.float32))
    return grey.expand(3, *grey.shape).clone()


def _is_image(path: str) -> bool:
    """An image file by extension (case-insensitive), not a hidden file such as macOS's ``._x.jpg``."""
    return not os.path.basename(path).startswith(".") and has_file_allowed_extension(path, IMG_EXTENSIONS)


def _layout_hint(root: Path) -> str:
    return (f"expected {root}/<class>/<image> (one subfolder per class), or {root}/train/<class>/<image> "
            f"and {root}/test/<class>/<image>")


def _choose_folder(root: Path, split: str) -> Path:
    """``root/<split>`` when it exists, else ``root`` itself (unless ``root`` holds the other split only)."""
    if not root.exists():
        raise DatasetNotFoundError(f"image-folder: root {root} does not exist; {_layout_hint(root)}")
    if not root.is_dir():
        raise DatasetError(f"image-folder: root {root} is a file, not a folder; {_layout_hint(root)}")
    if (root / split).is_dir():
        return root / split
    others = [s for s in SPLITS if s != split and (root / s).is_dir()]
    if others:
        raise DatasetError(f"image-folder: {root} has {others[0]}/ but no {split}/ folder; add "
                           f"{root / split}/<class>/<image>, or ask for split={others[0]!r}")
    return root


class ImageFolderDataset(ImageFolder):
    """Images in class subfolders, resized and centre-cropped to ``size``; items are ``(image, label)``.

    ``image`` is float32 ``(3, size, size)`` in [0, 1] (or normalised), ``label`` an int64 index into
    ``classes`` (the subfolder names, sorted). The shorter side is resized to ``size`` (antialiased),
    then the centre ``size``×``size`` is cut. Images of any mode are converted to RGB in
    [0, 1] (16-bit and float grey images by their own range, see :func:`load_image`).

    The folder is ``root/<split>`` when it exists, else ``root`` itself for either split (so a plain
    ``root/<class>/<image>`` folder serves both splits; a root holding only ``train/`` is an error for
    ``split="test"``). Hidden folders and files (names starting with ``.``) are skipped; accepted
    extensions are those of torchvision (``IMG_EXTENSIONS``), in any letter case.

    Args:
        root: the dataset folder.
        split: ``"train"`` or ``"test"`` (see above).
        size: the side of the square output images.
        normalize: ``"imagenet"`` to subtract ImageNet's channel means and divide by its stds, or ``None``.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> for cls in ("cat", "dog"):
        ...     (root / cls).mkdir()
        ...     Image.new("RGB", (40, 30), "white").save(root / cls / "a.png")
        >>> data = ImageFolderDataset(root, size=16)
        >>> image, label = data[1]
        >>> data.classes, image.shape, int(label), data.name
        (['cat', 'dog'], torch.Size([3, 16, 16]), 1, 'image-folder/test')
    """

    def __init__(self, root: str | Path, split: str = "test", size: int = 224,
                 normalize: str | None = None) -> None:
        from torchvision.transforms import v2

        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise DatasetError(f"image-folder: size must be a positive integer (the output side), "
                               f"got {size!r}")
        if normalize not in NORMALIZE:
            raise DatasetError(f"image-folder: normalize must be 'imagenet' or None, got {normalize!r}")
        folder = _choose_folder(Path(root).expanduser(), split)
        exts = ", ".join(IMG_EXTENSIONS)
        if not any(d.is_dir() and not d.name.startswith(".") for d in folder.iterdir()):
            raise DatasetError(f"image-folder: {folder} contains no class subfolders with images "
                               f"(accepted extensions: {exts}); {_layout_hint(folder)}")
        steps: list[Any] = [v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size),
                            v2.ToDtype(torch.float32, scale=True)]
        if normalize == "imagenet":
            steps.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
        try:
            super().__init__(str(folder), transform=v2.Compose(steps), is_valid_file=_is_image,
                             loader=load_image)
        except FileNotFoundError as e:  # torchvision: some class folder has no image
            raise DatasetError(f"image-folder: {folder} has class subfolders without images ({e}); every "
                               f"class folder needs at least one image with an accepted extension: {exts}. "
                               f"Remove empty class folders or add images") from None
        self.split, self.size, self.normalize = split, size, normalize
        self.name = f"image-folder/{split}"

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        """The class subfolders of ``directory``, sorted, without hidden ones (``.ipynb_checkpoints``)."""
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        return classes, {c: i for i, c in enumerate(classes)}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, target = self.samples[index]
        try:
            image = self.transform(self.loader(path))
        except OSError as e:
            raise DatasetError(f"image-folder: cannot read image {path}: {e}; "
                               f"remove or replace the file") from e
        return image.as_subclass(torch.Tensor), torch.tensor(target, dtype=torch.int64)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension: ``(3, size, size)``."""
        return (3, self.size, self.size)

    def fingerprint(self) -> str:
        """sha256 of the options and, per file, its path relative to the folder, size, mtime and label.

        The image bytes are not read: a file rewritten in place with the same size and mtime keeps
        the fingerprint.
        """
        h = hashlib.sha256(f"image-folder:{self.size}:{self.normalize}:{self.classes}".encode())
        for path, target in self.samples:
            st = os.stat(path)
            rel = Path(os.path.relpath(path, self.root)).as_posix()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{target}\n".encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={self.root!r}, split={self.split!r}, n={len(self)}, "
                f"classes={len(self.classes)}, size={self.size})")


# name: (torchvision class, folder it reads under root, files it expects there)
TORCHVISION_DATASETS: dict[str, tuple[str, str, str]] = {
    "mnist": ("MNIST", "MNIST", "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST",
                      "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py",
                "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}"),
    "cifar100": ("CIFAR100", "cifar-100-python", "cifar-100-python/{train,test,meta}"),
}


class LocalTorchvisionDataset(Dataset):
    """A torchvision dataset read from a local ``root`` (never downloaded); items are ``(image, label)``.

    ``image`` is float32 in [0, 1]: ``(1, 28, 28)`` for ``mnist`` and ``fashion-mnist``, ``(3, 32, 32)``
    for ``cifar10`` and ``cifar100``; ``label`` is an int64 index into ``classes`` (torchvision's class
    names; CIFAR-100's fine labels). torchvision reads and checks the files (CIFAR's md5 sums too);
    the items are then cut from its uint8 arrays without going through PIL.

    ``root`` is the folder torchvision would download into: the one holding ``MNIST/``,
    ``FashionMNIST/``, ``cifar-10-batches-py/`` or ``cifar-100-python/``; that inner folder itself is
    accepted too.

    Args:
        name: ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"`` or ``"cifar100"``.
        split: ``"train"`` or ``"test"``.
        root: the local data folder (see above).

    Example:
        >>> LocalTorchvisionDataset("cifar10", "test", root="/nonexistent")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        unitscope.data.registry.DatasetNotFoundError: cifar10: root /nonexistent does not exist; ...
    """

    def __init__(self, name: str, split: str = "test", root: str | Path | None = None) -> None:
        import torchvision.datasets as tvd

        if name not in TORCHVISION_DATASETS:
            raise DatasetError(f"unknown torchvision dataset {name!r}; "
                               f"known: {', '.join(TORCHVISION_DATASETS)}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        cls_name, folder, files = TORCHVISION_DATASETS[name]
        fetch = (f"unitscope never downloads: download it yourself with "
                 f"torchvision.datasets.{cls_name}(root, download=True) on a machine with network, "
                 f"then pass root=")
        if root is None:
            raise DatasetError(f"{name}: pass root=, the folder holding {files}; {fetch}")
        root = Path(root).expanduser()
        if root.name == folder and root.parent != root:  # the inner folder was given
            root = root.parent
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "does not exist"
            raise DatasetNotFoundError(f"{name}: root {root} {what}; {fetch}")
        try:
            tv = getattr(tvd, cls_name)(str(root), train=split == "train", download=False)
        except RuntimeError:  # torchvision: "Dataset not found" / "not found or corrupted"
            check = "missing, or with a wrong md5 sum" if name.startswith("cifar") else "missing"
            raise DatasetNotFoundError(f"{name}: no complete {cls_name} data under root {root} (checked "
                                       f"{root}/{files}: files {check}); {fetch}") from None
        except Exception as e:
            raise DatasetError(f"{name}: could not read the {cls_name} files under root {root} "
                               f"({type(e).__name__}: {e}); they may be truncated or corrupt. {fetch}") from e
        data = tv.data if isinstance(tv.data, torch.Tensor) else torch.from_numpy(tv.data)
        # MNIST: (N, 28, 28); CIFAR: (N, 32, 32, 3). Both become uint8 (N, C, H, W) views.
        self.pixels = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
        self.y = torch.as_tensor(tv.targets, dtype=torch.int64)
        self.classes: list[str] = list(tv.classes)
        self.dataset, self.root, self.split = tv, root, split
        self.name = f"{name}/{split}"

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pixels[i].to(torch.float32, memory_format=torch.contiguous_format).div_(255.0), self.y[i]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension."""
        return tuple(self.pixels.shape[1:])

    def fingerprint(self, probe: int = 64) -> str:
        """sha256 of the name, the shape, all labels and ``probe`` evenly spaced images.

        The root is left out, so the same files in two places give the same fingerprint.
        """
        n = len(self)
        h = hashlib.sha256(f"{self.name}:{tuple(self.pixels.shape)}".encode())
        h.update(self.y.numpy().tobytes())
        idx = torch.linspace(0, max(n - 1, 0), min(probe, n)).round().long()
        h.update(self.pixels[idx].contiguous().numpy().tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (f"LocalTorchvisionDataset(name={getattr(self, 'name', None)!r}, "
                f"root={str(getattr(self, 'root', None))!r}, n={len(getattr(self, 'y', ()))})")
