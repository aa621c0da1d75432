"""Streaming, resumable extraction of layer features to chunked zarr arrays.

:func:`extract_features` makes one pass of a model over a dataset (eval mode, no augmentation,
no shuffling, ``torch.inference_mode``) and appends each batch's features of every selected layer
to ``OUT/<split>/<layer>.zarr`` (float32, chunked along samples), with the labels in
``OUT/<split>/labels.zarr``. Memory stays bounded by one batch whatever the dataset size.

A small ``progress.json`` beside the arrays records how many items are written and the
model/data fingerprints and options. An interrupted extraction continues after the last complete
batch; a finished one with the same fingerprints is reused, not recomputed; one made from another
model, dataset or option set is refused (pass ``overwrite=True`` or another ``out``).

Example:
    >>> import tempfile, unitscope
    >>> from unitscope.features import extract_features
    >>> store = extract_features(unitscope.load_model("digits-cnn"),
    ...                          unitscope.load_dataset("digits", "test"), ["conv1", "fc"],
    ...                          downsample=2, out=tempfile.mkdtemp(), split="test")
    >>> store.layers, store.features("conv1").shape, tuple(store.labels().shape)
    (['conv1', 'fc'], (360, 64), (360,))
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .capture import Capture, CaptureError, LayerError, LayerSpec, StopForward, resolve_layers
from .data.arrays import dataset_fingerprint
from .models.modes import preserved
from .models.registry import model_fingerprint

log = logging.getLogger(__name__)

__all__ = ["FeatureStore", "StaleFeaturesError", "downsample_name", "extract_features"]

_PROGRESS = "progress.json"
_FORMAT = 1


class StaleFeaturesError(RuntimeError):
    """A feature store on disk was made from another model, dataset or option set."""


def downsample_name(downsample: int | str | None) -> str:
    """The canonical name of a downsampling option: ``"4"``, ``"pixelwise"`` or ``"none"``."""
    if downsample is None or downsample == "none":
        return "none"
    if downsample == "pixelwise":
        return "pixelwise"
    if isinstance(downsample, bool) or not isinstance(downsample, (int, str)):
        raise ValueError(f"downsample={downsample!r}: use a positive int (pooled size), 'pixelwise' or None")
    try:
        d = int(downsample)
    except ValueError:
        d = 0
    if d < 1:
        raise ValueError(f"downsample={downsample!r}: use a positive int (pooled size), 'pixelwise' or None")
    return str(d)


def _reduction(name: str) -> str:
    return {"none": "flatten", "pixelwise": "none"}.get(name, f"pool:{name}")


def _to_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """Per-sample feature rows: ``(N, F)``, or ``(N, C, H, W)`` kept as is for pixelwise."""
    if name == "pixelwise":
        return t if t.dim() >= 2 else t.reshape(len(t), 1)
    return t.reshape(len(t), -1)


def _safe(layer: str) -> str:
    if not layer or "/" in layer or layer.startswith("."):
        raise ValueError(f"layer name {layer!r} cannot be used as a file name")
    return layer


class FeatureStore:
    """The extracted features of one split: one zarr array per layer plus the labels.

    Attributes:
        root: the split's directory (``OUT/<split>``).
        layers: the stored layers, in model order.
        meta: the progress record (fingerprints, options, shapes, items written).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        path = self.root / _PROGRESS
        if not path.is_file():
            raise FileNotFoundError(f"no feature store at {self.root} ({_PROGRESS} is missing); run "
                                    "unitscope.features.extract_features first")
        self.meta: dict[str, Any] = json.loads(path.read_text())
        self.layers: list[str] = list(self.meta["layers"])

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.root)!r}, layers={self.layers}, n={len(self)}, "
                f"downsample={self.meta['downsample']!r}, complete={self.complete})")

    def __len__(self) -> int:
        return int(self.meta["written"])

    @property
    def complete(self) -> bool:
        """Whether every item of the dataset is written."""
        return bool(self.meta["complete"])

    @property
    def downsample(self) -> str:
        """The canonical downsampling name (see :func:`downsample_name`)."""
        return str(self.meta["downsample"])

    @property
    def fingerprint(self) -> str:
        """A hash of everything the stored values depend on (model, data, options)."""
        return str(self.meta["key"])

    def _array(self, name: str) -> Any:
        """A stored array, checked to hold every written row; a damaged store names the fix."""
        import zarr

        path = self.root / f"{name}.zarr"
        try:
            arr = zarr.open_array(str(path), mode="r")
        except Exception as exc:  # zarr raises its own errors for a missing or unreadable array
            raise StaleFeaturesError(f"the feature store {self.root} lacks a readable {path.name} ({exc}); "
                                     "extract again with overwrite=True") from exc
        if arr.shape[0] < len(self):
            raise StaleFeaturesError(f"{path} holds {arr.shape[0]} rows but the store records {len(self)}; "
                                     "it was damaged or cut short: extract again with overwrite=True")
        return arr

    def features(self, layer: str, as_tensor: bool = False) -> Any:
        """The features of ``layer``: a read-only zarr array, or a torch tensor with ``as_tensor``.

        Shape ``(N, F)`` (``F = C·d²`` for ``downsample=d``, channel-major), or ``(N, C, H, W)``
        for ``downsample="pixelwise"``.

        Raises:
            LayerError: ``layer`` is not in this store; the message lists the stored layers.
        """
        if layer not in self.layers:
            raise LayerError(f"layer {layer!r} is not in the feature store {self.root}; it holds "
                             f"{', '.join(self.layers)}. Extract it with extract_features(..., layers=[...]) "
                             "into another out directory (or overwrite=True)")
        arr = self._array(_safe(layer))
        return torch.from_numpy(np.asarray(arr[: len(self)])) if as_tensor else arr

    def labels(self) -> torch.Tensor:
        """The labels, int64, in dataset order (``-1`` where the dataset has none)."""
        return torch.from_numpy(np.asarray(self._array("labels")[: len(self)])).long()


def _key(meta: dict[str, Any]) -> str:
    """What a store holds; ``calls`` counts only when it is not ``"error"`` (a store made with
    ``"error"`` saw no module called twice, so it also answers ``"first"``), which keeps the keys
    of stores made before the option existed."""
    what = {k: meta[k] for k in ("model", "data", "layers", "downsample", "n")}
    if meta.get("calls", "error") != "error":
        what["calls"] = meta["calls"]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def _write_progress(root: Path, meta: dict[str, Any]) -> None:
    tmp = root / f"{_PROGRESS}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, root / _PROGRESS)


def extract_features(model: nn.Module, data: Dataset, layers: LayerSpec, downsample: int | str | None = 4, *,
                     out: str | Path, batch_size: int = 256, device: str | torch.device = "auto",
                     split: str | None = None, overwrite: bool = False, calls: str = "error") -> FeatureStore:
    """Write the features of ``layers`` on ``data`` to ``out/<split or 'data'>/`` and return the store.

    Args:
        model: the network; run in eval mode (restored afterwards) under ``torch.inference_mode``.
        data: a map-style dataset of ``(x, y)`` or ``(x, y, factors)`` items (or bare inputs; the
            labels are then ``-1``), read in order without shuffling or augmentation.
        layers: the layer selection (names, globs, types; see :func:`unitscope.capture.resolve_layers`).
            Each layer's **output** is stored.
        downsample: ``d`` (int): adaptive average pooling of 4-D maps to ``d×d``, flattened to
            ``C·d²`` features, channel-major; ``None``: the full ``C·H·W`` flatten; ``"pixelwise"``:
            the full ``(C, H, W)`` map, for one probe per spatial position. 2-D outputs are stored as is.
        out: the output directory.
        batch_size: items per forward; also the zarr chunk length along samples.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        split: the sub-directory name (default ``"data"``).
        overwrite: recompute a store made from another model, dataset or option set instead of raising.
        calls: a selected module called more than once in one forward (a ReLU module shared by
            the two convs of a ResNet block): ``"error"`` (default) raises, ``"first"`` or
            ``"last"`` stores that call. With ``"first"`` the forward stops once every selected
            module has run; otherwise it runs to its end, since a later call may still come.

    Returns:
        The :class:`FeatureStore` (complete).

    Raises:
        StaleFeaturesError: ``out/<split>`` holds features of another model, dataset, layer set or
            downsampling; delete it, use another ``out``, or pass ``overwrite=True``.
    """
    from .engine import resolve_device  # lazy: engine imports the analyses package, which imports us

    ds_name = downsample_name(downsample)
    if calls not in ("error", "first", "last"):
        raise ValueError(f"calls={calls!r}: use 'error', 'first' or 'last' (one stored output per layer)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(data)
    if n == 0:
        raise ValueError("the dataset is empty: there is nothing to extract; check its root or split")
    names = resolve_layers(model, layers)
    for name in names:
        _safe(name)
    root = Path(out) / (split or "data")
    meta: dict[str, Any] = {"format": _FORMAT, "model": model_fingerprint(model),
                            "data": dataset_fingerprint(data), "layers": names, "downsample": ds_name,
                            "n": n, "batch_size": batch_size, "calls": calls}
    meta["key"] = _key(meta)
    written = _prepare(root, meta, overwrite)
    if written >= n:
        log.info("reusing the finished feature store %s", root)
        return FeatureStore(root)
    _extract(model, data, names, ds_name, root, meta, written, batch_size, resolve_device(device))
    return FeatureStore(root)


def _prepare(root: Path, meta: dict[str, Any], overwrite: bool) -> int:
    """Check an existing store against ``meta``; return the number of items already written."""
    path = root / _PROGRESS
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("key") == meta["key"] and old.get("format") == _FORMAT:
            if old.get("batch_size") != meta["batch_size"] and not old.get("complete"):
                log.warning("resuming %s with batch_size %s (it was started with %s)", root,
                            meta["batch_size"], old.get("batch_size"))
            return meta["n"] if old.get("complete") else int(old["written"])
        diff = [k for k in ("model", "data", "layers", "downsample", "n", "calls")
                if old.get(k, "error" if k == "calls" else None) != meta.get(k)]
        if not old.get("written"):  # a store whose first batch never landed holds nothing to keep
            log.info("replacing the empty feature store %s (its first batch was never written)", root)
            shutil.rmtree(root)
            return 0
        if not overwrite:
            raise StaleFeaturesError(
                f"the feature store {root} was extracted with a different {', '.join(diff) or 'format'} "
                "than requested; delete that directory, pass another out=, or pass overwrite=True to "
                "recompute it")
        log.warning("overwriting the stale feature store %s (different %s)", root, ", ".join(diff))
        shutil.rmtree(root)
    elif root.exists() and any(root.iterdir()):
        if not overwrite:
            raise StaleFeaturesError(f"{root} exists but holds no feature store ({_PROGRESS} is missing); "
                                     "delete it, pass another out=, or pass overwrite=True")
        shutil.rmtree(root)
    return 0


def _extract(model: nn.Module, data: Dataset, names: Sequence[str], ds_name: str, root: Path,
             meta: dict[str, Any], written: int, batch_size: int, dev: torch.device) -> None:
    import zarr

    from .engine import _unpack

    root.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {}
    shapes: dict[str, list[int]] = dict(meta.get("shapes", {}))
    if not written:  # claim the directory first: a store cut short in its first batch resumes
        _write_progress(root, {**meta, "written": 0, "complete": False, "shapes": shapes})
    if written:
        prog = json.loads((root / _PROGRESS).read_text())
        shapes = prog["shapes"]
        for name in [*names, "labels"]:
            arr = zarr.open_array(str(root / f"{name}.zarr"), mode="r+")
            if arr.shape[0] != written:  # a batch written after the last progress record
                arr.resize((written, *arr.shape[1:]))
            arrays[name] = arr
        log.info("resuming the extraction into %s after %d of %d items", root, written, meta["n"])
    loader = DataLoader(Subset(data, range(written, meta["n"])), batch_size=batch_size, shuffle=False)
    cap = Capture(model, list(names), {"f": _reduction(ds_name)}, calls=meta["calls"], stop=True)
    with preserved(model):
        model.eval().to(dev)
        with cap, torch.inference_mode():
            for item in loader:
                x, y = _unpack(item)
                try:
                    model(x.to(dev))
                except StopForward:
                    pass
                except CaptureError as exc:
                    if exc.module is None:
                        raise
                    raise CaptureError(f"module {exc.module!r} is called more than once in one forward; "
                                       "pass calls='first' or calls='last' to extract_features, or "
                                       "select a module that runs once per forward", exc.module) from None
                y = torch.full((len(x),), -1, dtype=torch.int64) if y is None else y.long().cpu()
                batch = {name: _to_rows(cap.outputs["f"][name], ds_name).float().cpu().numpy()
                         for name in names}
                batch["labels"] = y.numpy()
                if not arrays:
                    for name, v in batch.items():
                        shapes[name] = list(v.shape[1:])
                        arrays[name] = zarr.create_array(
                            str(root / f"{name}.zarr"), shape=(0, *v.shape[1:]),
                            chunks=(batch_size, *v.shape[1:]),
                            dtype="int64" if name == "labels" else "float32", overwrite=True)
                for name, v in batch.items():
                    arrays[name].append(v, axis=0)
                written += len(x)
                _write_progress(root, {**meta, "written": written, "complete": written >= meta["n"],
                                       "shapes": shapes})
