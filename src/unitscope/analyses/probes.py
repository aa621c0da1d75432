"""Linear probes: how linearly separable the classes are in each layer's features.

:func:`probes` extracts each layer's features on the train and test splits (eval mode, no
augmentation, see :mod:`unitscope.features`), fits a multinomial logistic regression on the
training features of each layer with scikit-learn's ``LogisticRegression(C=C)`` objective
(:mod:`unitscope.stats.logreg`, no feature standardisation, as in phd-lab; every layer and
position in one joint L-BFGS run, :func:`~unitscope.stats.logreg.fit_logreg_many`) and reports its
accuracy on both splits, relative to the model's own test accuracy. Train and test features
are paired by layer name. Fitted probes are cached under ``OUT/probes/`` (safetensors + JSON),
keyed by the features' fingerprint and the fit options, and reused on the next call.

Example:
    >>> import tempfile, unitscope
    >>> from unitscope.analyses.probes import probes
    >>> m = unitscope.load_model("digits-cnn")
    >>> table = probes(m, unitscope.load_dataset("digits", "train"),
    ...                unitscope.load_dataset("digits", "test"), ["relu3", "fc"], downsample=1,
    ...                out=tempfile.mkdtemp())
    >>> list(table.layer), bool(table.converged.all())
    (['relu3', 'fc'], True)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from ..capture import LayerError, LayerSpec
from ..features import FeatureStore, downsample_name, extract_features
from ..stats.logreg import LogRegResult, accuracy, check_fit_options, fit_logreg_many

log = logging.getLogger(__name__)

__all__ = ["COLUMNS", "check_options", "fit_probes", "probes"]

#: the columns of the table :func:`probes` returns
COLUMNS = ["layer", "position", "train_acc", "test_acc", "relative_test_acc", "objective", "converged",
           "stop", "grad_max", "n_iter", "features", "cached"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: use torch.float32 or torch.float64")
    return name


def check_options(C: float, dtype: torch.dtype | str, max_iter: int, tol: float) -> tuple[float, int, float]:
    """``(C, max_iter, tol)`` as plain numbers, or ``ValueError`` naming a bad option and its fix.

    :func:`probes` calls it before extracting any feature, so a bad option costs no pass.
    """
    _dtype_name(dtype)
    return check_fit_options(C, max_iter, tol)


def _check_labelled(data: Dataset, split: str) -> None:
    """Refuse a dataset whose items carry no label, judged by its first item, before any pass."""
    if len(data) == 0:
        raise ValueError(f"the {split} dataset is empty; check its root or split")
    item = data[0]
    unlabelled = (isinstance(item, torch.Tensor)
                  or (isinstance(item, (tuple, list)) and len(item) < 2)
                  or (isinstance(item, dict) and item.get("y") is None))
    if unlabelled:
        raise ValueError(f"probes need labelled data, but the {split} dataset's items carry no labels; "
                         "use a dataset of (x, y) items")


def probes(model: nn.Module, train_data: Dataset, test_data: Dataset, layers: LayerSpec,
           downsample: int | str | None = 4, *, out: str | Path, C: float = 1.0,
           dtype: torch.dtype | str = torch.float32, max_iter: int = 1000, tol: float = 1e-6,
           batch_size: int = 256, device: str | torch.device = "auto", overwrite: bool = False,
           model_acc: float | None = None) -> pd.DataFrame:
    """Fit one linear probe per layer (per layer and position for ``"pixelwise"``) and score it.

    Args:
        model: the network; features are its layers' outputs in eval mode.
        train_data: the split the probes are fitted on (``(x, y)`` items).
        test_data: the split they are scored on.
        layers: the layer selection (names, globs, module types).
        downsample: ``d`` (adaptive average pool to ``d×d``, the phd-lab default 4), ``None`` (the
            full flattened output) or ``"pixelwise"`` (one probe per spatial position, ``C`` features).
        out: the directory for features (``out/train``, ``out/test``) and fitted probes (``out/probes``).
        C: inverse L2 strength, as sklearn's ``C``.
        dtype: the fitting precision, ``torch.float32`` or ``torch.float64``.
        max_iter: L-BFGS iterations at most per probe.
        tol: gradient tolerance: the largest absolute entry of the gradient in the fitting
            (centred, scaled) coordinates; the table's ``stop`` says whether a fit ended on it.
        batch_size: items per forward during extraction.
        device: where extraction and fits run.
        overwrite: recompute stale feature stores (see :func:`unitscope.features.extract_features`).
        model_acc: the model's own test accuracy; computed with :func:`unitscope.train.evaluate` if
            not given.

    Returns:
        One row per probe with columns :data:`COLUMNS`; ``relative_test_acc = test_acc / model_acc``.
        ``position`` is ``"(i,j)"`` for pixelwise probes of 4-D outputs, else ``None``.

    Raises:
        ValueError: a bad fit option or downsampling, unlabelled data (both checked before any
            extraction), or non-finite features (see :func:`fit_probes`).
    """
    C, max_iter, tol = check_options(C, dtype, max_iter, tol)
    downsample_name(downsample)
    _check_labelled(train_data, "train")
    _check_labelled(test_data, "test")
    train = extract_features(model, train_data, layers, downsample, out=out, batch_size=batch_size,
                             device=device, split="train", overwrite=overwrite)
    test = extract_features(model, test_data, layers, downsample, out=out, batch_size=batch_size,
                            device=device, split="test", overwrite=overwrite)
    if model_acc is None:
        from ..train import evaluate

        model_acc = float(evaluate(model, test_data, batch_size=max(batch_size, 1), device=device)["acc"])
    return fit_probes(train, test, C=C, dtype=dtype, max_iter=max_iter, tol=tol, device=device,
                      cache=Path(out) / "probes", model_acc=model_acc)


def fit_probes(train: FeatureStore, test: FeatureStore, layers: list[str] | None = None, *, C: float = 1.0,
               dtype: torch.dtype | str = torch.float32, max_iter: int = 1000, tol: float = 1e-6,
               device: str | torch.device = "auto", cache: str | Path | None = None,
               model_acc: float | None = None) -> pd.DataFrame:
    """Fit and score probes on two existing feature stores, pairing layers by name.

    Args:
        train: the training features (from :func:`unitscope.features.extract_features`).
        test: the test features; must hold the same layers and downsampling.
        layers: the stored layers to probe (default: every layer of ``train``).
        C, dtype, max_iter, tol, device: as in :func:`probes`.
        cache: a directory for fitted probes; ``None`` disables caching.
        model_acc: the model's own test accuracy (``relative_test_acc`` is NaN without it).

    Raises:
        LayerError: a layer is missing from one of the stores.
        ValueError: a bad fit option, the stores differ in downsampling, labels are missing, or a
            layer's features hold NaN or infinite values (the message names the layer and the
            number of rows).
    """
    from ..engine import resolve_device  # lazy: the engine imports this package

    C, max_iter, tol = check_options(C, dtype, max_iter, tol)
    dname = _dtype_name(dtype)
    if train.downsample != test.downsample:
        raise ValueError(f"the train store uses downsample={train.downsample!r} but the test store "
                         f"{test.downsample!r}; extract both with the same option")
    for field in ("model", "calls"):
        mine, theirs = train.meta.get(field, "error"), test.meta.get(field, "error")
        if mine != theirs:
            what = "a different model (weights)" if field == "model" else f"calls={theirs!r} against {mine!r}"
            raise ValueError(f"the train store {train.root} and the test store {test.root} were extracted "
                             f"with {what}; extract both from the same model with the same options")
    for store in (train, test):
        if not store.complete:
            raise ValueError(f"the feature store {store.root} is incomplete; rerun extract_features "
                             "to finish it")
    layers = list(train.layers) if layers is None else list(layers)
    for layer in layers:
        for store, what in ((train, "train"), (test, "test")):
            if layer not in store.layers:
                raise LayerError(f"layer {layer!r} is missing from the {what} feature store {store.root} "
                                 f"(it holds {', '.join(store.layers)}); extract it first, e.g. "
                                 f"probes(..., layers=[{layer!r}, ...]) with a fresh out directory")
    y_train, y_test = train.labels(), test.labels()
    if bool((y_train < 0).any()) or bool((y_test < 0).any()):
        raise ValueError("probes need labelled data, but the dataset items carry no labels; use a dataset "
                         "of (x, y) items")
    k = int(max(int(y_train.max()), int(y_test.max()))) + 1
    dev = resolve_device(device)
    about = {"C": C, "dtype": dname, "downsample": train.downsample, "features": train.fingerprint}
    probes_: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    held = 0  # feature values of the pending probes

    def finish() -> None:
        """Fit the pending probes, score them and let their features go (memory stays bounded)."""
        _fit_together([p for p in pending if p["result"] is None], y_train, k, C, _DTYPES[dname], max_iter,
                      tol, dev, cache, about)
        for p in pending:
            p["row"] = _row(p, y_train, y_test, model_acc, tol, dev)
            p["train"] = p["test"] = None
        pending.clear()

    for layer in layers:
        x_train = train.features(layer, as_tensor=True)
        x_test = test.features(layer, as_tensor=True)
        if x_train.shape[1:] != x_test.shape[1:]:
            raise ValueError(f"layer {layer!r}: train features {tuple(x_train.shape[1:])} and test features "
                             f"{tuple(x_test.shape[1:])} differ in shape; re-extract both with the same "
                             "model")
        for x, store, what in ((x_train, train, "training"), (x_test, test, "test")):
            _check_finite(x, layer, what, store.root)
        for pos, xtr, xte in _positions(x_train, x_test, train.downsample):
            key = _cache_key(train.fingerprint, layer, pos, C, dname, train.downsample, max_iter, tol, k)
            res, cached = _load(cache, key) if cache is not None else (None, False)
            probe = {"layer": layer, "position": pos, "train": xtr, "test": xte, "key": key, "result": res,
                     "cached": cached}
            probes_.append(probe)
            pending.append(probe)
            held += xtr.numel() + xte.numel()
            if held >= JOINT_LIMIT:
                finish()
                held = 0
        del x_train, x_test
    finish()
    rows = [p["row"] for p in probes_]
    return pd.DataFrame(rows, columns=COLUMNS)


def _row(probe: dict[str, Any], y_train: torch.Tensor, y_test: torch.Tensor, model_acc: float | None,
         tol: float, dev: torch.device) -> dict[str, Any]:
    """One fitted probe's table row (its accuracies on its own features); warns if it did not converge."""
    res, layer, pos = probe["result"], probe["layer"], probe["position"]
    if not res.converged:
        log.warning("the probe of layer %s%s did not converge in %d L-BFGS iterations (largest "
                    "gradient %.2e > tol %.1e); raise max_iter or use dtype=torch.float64",
                    layer, f" at {pos}" if pos else "", res.n_iter, res.grad_max, tol)
    w, b = res.weight.to(dev), res.bias.to(dev)
    test_acc = accuracy(probe["test"].to(dev), y_test, w, b)
    train_acc = accuracy(probe["train"].to(dev), y_train, w, b)
    return {"layer": layer, "position": pos, "train_acc": train_acc, "test_acc": test_acc,
            "relative_test_acc": test_acc / model_acc if model_acc else float("nan"),
            "objective": res.objective, "converged": res.converged, "stop": res.stop,
            "grad_max": res.grad_max, "n_iter": res.n_iter, "features": int(probe["train"].shape[1]),
            "cached": probe["cached"]}


#: the most feature values (all probes' matrices together) held at once and fitted in one L-BFGS run
JOINT_LIMIT = 1 << 27


def _fit_together(todo: list[dict[str, Any]], y: torch.Tensor, k: int, C: float, dtype: torch.dtype,
                  max_iter: int, tol: float, device: torch.device, cache: str | Path | None,
                  about: dict[str, Any]) -> None:
    """Fit the probes of ``todo`` in joint L-BFGS runs of at most :data:`JOINT_LIMIT` values each."""
    chunks: list[list[dict[str, Any]]] = []
    size = 0
    for p in todo:
        if not chunks or size + p["train"].numel() > JOINT_LIMIT:
            chunks.append([])
            size = 0
        chunks[-1].append(p)
        size += p["train"].numel()
    for chunk in chunks:
        results = fit_logreg_many([p["train"].to(device) for p in chunk], y.to(device), C, num_classes=k,
                                  dtype=dtype, max_iter=max_iter, tol=tol)
        for p, res in zip(chunk, results):
            p["result"] = res
            if cache is not None:
                _save(cache, p["key"], res, {"layer": p["layer"], "position": p["position"], **about})


def _check_finite(x: torch.Tensor, layer: str, what: str, root: Path) -> None:
    """Raise ``ValueError`` naming the layer and the count of rows holding NaN or infinite values."""
    bad = int((~torch.isfinite(x.reshape(len(x), -1))).any(dim=1).sum())
    if bad:
        raise ValueError(f"layer {layer!r}: {bad} of {len(x)} {what} feature rows in {root} hold NaN or "
                         "infinite values, which no probe can be fitted on; clean the data (non-finite "
                         "inputs) or check the model (a layer that overflows or divides by zero)")


def _positions(x_train: torch.Tensor, x_test: torch.Tensor, downsample: str) -> Any:
    """(position, train rows, test rows) per probe: one per spatial position for pixelwise maps."""
    if downsample != "pixelwise" or x_train.dim() == 2:
        yield None, x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
        return
    if x_train.dim() != 4:
        raise ValueError(f"pixelwise probes need (N, C, H, W) maps, got {tuple(x_train.shape)}")
    for i in range(x_train.shape[2]):
        for j in range(x_train.shape[3]):
            yield f"({i},{j})", x_train[:, :, i, j].contiguous(), x_test[:, :, i, j].contiguous()


def _cache_key(features: str, layer: str, pos: str | None, C: float, dtype: str, downsample: str,
               max_iter: int, tol: float, classes: int) -> str:
    """The cache name of a probe: everything its coefficients depend on, the class count included
    (it comes from the train and the test labels, so a test label of a new class changes it)."""
    blob = json.dumps([features, layer, pos, float(C), dtype, downsample, int(max_iter), float(tol),
                       int(classes)])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _load(cache: str | Path, key: str) -> tuple[LogRegResult | None, bool]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(cache) / f"{key}.safetensors"
    info = Path(cache) / f"{key}.json"
    if not (path.is_file() and info.is_file()):
        return None, False
    try:
        tensors = load_file(str(path))
        meta = json.loads(info.read_text())
        return LogRegResult(weight=tensors["weight"], bias=tensors["bias"],
                            objective=float(meta["objective"]), converged=bool(meta["converged"]),
                            n_iter=int(meta["n_iter"]), grad_max=float(meta["grad_max"]),
                            stop=str(meta.get("stop", ""))), True
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        log.warning("ignoring the unreadable cached probe %s (%s); refitting", path, exc)
        return None, False


def _save(cache: str | Path, key: str, res: LogRegResult, about: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    root = Path(cache)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{key}.tmp{os.getpid()}"
    save_file({"weight": res.weight.contiguous().cpu(), "bias": res.bias.contiguous().cpu()}, str(tmp))
    os.replace(tmp, root / f"{key}.safetensors")
    meta = {**about, "objective": res.objective, "converged": res.converged, "n_iter": res.n_iter,
            "grad_max": res.grad_max, "stop": res.stop}
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, root / f"{key}.json")
