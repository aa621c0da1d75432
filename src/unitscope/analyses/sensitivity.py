"""Sensitivity of every unit to parametrised augmentations: Sobol' indices, streamed (Kharyuk et al.).

The inputs of the analysis are the augmentation variables of :mod:`unitscope.augment` plus the
image itself: one design column ``image`` picks the dataset image (``floor(u · len(data))``), so
the rows ``A`` and ``AB_j`` of a base sample (``j`` not the image) see the *same* image and differ
only in augmentation parameters (the seed drew a new image per row, which leaks image variance into
every index; spec A.13, D1). Each base sample is evaluated on its ``D + 2`` design rows (``2D + 2``
with second order) in one forward, and every unit's outputs go straight into a
:class:`unitscope.stats.sobol.SobolAccumulator`: nothing is written to disk, memory does not grow
with ``n``.

A unit's output is its channel's spatial mean (``reduce="mean"``) or max (``"max"``), or every
element of the map (``"map"``), in which case the table reports each channel's aggregated index
over its map (Gamboa et al. 2013) and the per-element maps go to the run's arrays.

Tables: ``sensitivity`` (layer, unit, variable, S1, ST, S1_conf, ST_conf, constant), the per-layer
("checkpoint-wise") summary ``sensitivity_layers``, the Spearman correlation of the variables'
sensitivity profiles across units ``sensitivity_correlation`` and, with second order,
``sensitivity_s2``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from ..augment import Augmenter, VariableSpec
from ..capture import Capture, LayerSpec, StopForward, resolve_layers
from ..models.modes import preserved, restores_model, tf32_allowed
from ..stats.base import Accumulator
from ..stats.sobol import SobolAccumulator, saltelli_sample
from .base import Analysis, Batch

log = logging.getLogger(__name__)

REDUCTIONS = {"mean": "mean", "max": "max", "map": "none"}


class Sensitivity(Analysis):
    """Sobol' indices of every unit of the selected layers to augmentation variables and the image.

    Run it with :func:`sensitivity` (it needs its own design pass, not the engine's pass over the
    data).

    Args:
        variables: augmentation variables (names, or ``(name, range)``; see
            :class:`unitscope.augment.Augmenter`).
        n: base samples of the Saltelli design (a power of two; others are rounded up).
        layers: the layers to analyse (default: those given to :func:`sensitivity`).
        reduce: a unit's output: ``"mean"`` or ``"max"`` over its map, or ``"map"`` (every element).
        second_order: also estimate second-order indices (``2D + 2`` rows per base sample).
        bootstrap: Poisson bootstrap replicates for the ``*_conf`` half-widths (0: none).
        seed: seeds the design and the bootstrap.
        conf_level: confidence level of the half-widths.
    """

    name = "sensitivity"

    def __init__(self, variables: Sequence[VariableSpec] | Mapping[str, Any], n: int = 256,
                 layers: LayerSpec | None = None, reduce: str = "mean", second_order: bool = False,
                 bootstrap: int = 100, seed: int = 0, conf_level: float = 0.95) -> None:
        super().__init__(layers)
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce={reduce!r}: use 'mean', 'max' or 'map'")
        self.augmenter = Augmenter(variables)
        self.n, self.second_order, self.bootstrap = int(n), bool(second_order), int(bootstrap)
        self.seed, self.conf_level = int(seed), float(conf_level)
        self.unit_reduce = reduce
        self.reduce = REDUCTIONS[reduce]
        #: design column groups: one per augmentation variable, then the image column (last)
        self.groups = [list(g) for g in self.augmenter.groups] + [[self.augmenter.d]]
        self.variables = [*self.augmenter.names, "image"]
        self.columns = self.augmenter.d + 1

    def config(self) -> dict[str, Any]:
        """Constructor arguments (variable ranges resolved, JSON-able)."""
        variables = []
        for var in self.augmenter.variables:
            variables.append([var.name, {p.name: [p.low, p.high] for p in var.params}])
        return {**super().config(), "variables": variables, "n": self.n, "reduce": self.unit_reduce,
                "second_order": self.second_order, "bootstrap": self.bootstrap, "seed": self.seed,
                "conf_level": self.conf_level}

    def new_accumulator(self, key: str) -> Accumulator:
        """One :class:`SobolAccumulator` per layer over the variables (and the image)."""
        return SobolAccumulator(len(self.groups), self.second_order, self.bootstrap, self.seed,
                                self.conf_level)

    def update(self, acts: Mapping[str, torch.Tensor], batch: Batch) -> None:
        """Not fed by the engine: the analysis evaluates its own design."""
        raise TypeError("Sensitivity runs its own design of augmented inputs; call "
                        "unitscope.analyses.sensitivity.sensitivity(model, data, ...) instead of "
                        "passing it to analyze()")

    # ------------------------------------------------------------------ results
    def results(self, key: str) -> tuple[Any, Any]:
        """``(per-unit result, per-layer aggregated result)`` of layer ``key``.

        Per unit means per channel: with ``reduce="map"`` each channel's index is aggregated over
        its map; otherwise it is the index of the channel's reduced output.
        """
        acc = self.accumulators[key]
        ndim = len(acc.output_shape)
        per_unit = acc.compute(aggregate=max(ndim - 1, 0)) if self.unit_reduce == "map" else acc.compute()
        return per_unit, acc.compute(aggregate=ndim)

    def tables(self) -> dict[str, pd.DataFrame]:
        """``sensitivity``, ``sensitivity_layers``, ``sensitivity_correlation`` (and ``sensitivity_s2``)."""
        units, layers, s2 = [], [], []
        for key, acc in self.accumulators.items():
            if not acc.initialized:
                continue
            per_unit, whole = self.results(key)
            units.append(_unit_frame(key, per_unit, self.variables))
            layers.append(_layer_frame(key, whole, per_unit, self.variables))
            if self.second_order and per_unit.S2 is not None:
                s2.append(_s2_frame(key, per_unit, self.variables))
        table = pd.concat(units, ignore_index=True) if units else pd.DataFrame(columns=UNIT_COLUMNS)
        out = {"sensitivity": table,
               "sensitivity_layers": pd.concat(layers, ignore_index=True) if layers else pd.DataFrame(),
               "sensitivity_correlation": variable_correlation(table)}
        if s2:
            out["sensitivity_s2"] = pd.concat(s2, ignore_index=True)
        return out

    def arrays(self) -> dict[str, torch.Tensor]:
        """With ``reduce="map"``: ``"<layer>/S1"`` and ``"<layer>/ST"`` maps ``(D, C, H, W)``."""
        if self.unit_reduce != "map":
            return {}
        out = {}
        for key, acc in self.accumulators.items():
            if acc.initialized:
                r = acc.compute()
                out[f"{key}/S1"], out[f"{key}/ST"] = r.S1.float(), r.ST.float()
        return out


UNIT_COLUMNS = ["layer", "unit", "variable", "S1", "ST", "S1_conf", "ST_conf", "constant"]


def _unit_frame(key: str, r: Any, variables: list[str]) -> pd.DataFrame:
    d = len(variables)
    s1 = r.S1.reshape(d, -1).cpu().numpy()
    units = s1.shape[1]

    def col(t: torch.Tensor) -> np.ndarray:
        return t.reshape(d, -1).cpu().numpy().T.reshape(-1)
    return pd.DataFrame({
        "layer": key, "unit": np.repeat(np.arange(units), d), "variable": np.tile(variables, units),
        "S1": col(r.S1), "ST": col(r.ST), "S1_conf": col(r.S1_conf), "ST_conf": col(r.ST_conf),
        "constant": np.repeat(r.constant.reshape(-1).cpu().numpy(), d)})


def _layer_frame(key: str, whole: Any, per_unit: Any, variables: list[str]) -> pd.DataFrame:
    """Checkpoint-wise summary: the aggregated index of the layer and statistics of its units."""
    d = len(variables)
    st = per_unit.ST.reshape(d, -1).cpu().numpy()
    s1 = per_unit.S1.reshape(d, -1).cpu().numpy()
    live = ~per_unit.constant.reshape(-1).cpu().numpy()
    dominant = np.full(d, math.nan)
    if live.any():
        top = np.nanargmax(np.where(np.isnan(st[:, live]), -np.inf, st[:, live]), axis=0)
        dominant = np.bincount(top, minlength=d) / live.sum()
    with warnings.catch_warnings():  # a layer without live units gives NaN summaries, not warnings
        warnings.simplefilter("ignore", RuntimeWarning)
        s1_mean, st_mean = np.nanmean(s1[:, live], 1), np.nanmean(st[:, live], 1)
        st_median = np.nanmedian(st[:, live], 1)
    return pd.DataFrame({
        "layer": key, "variable": variables, "S1_agg": whole.S1.cpu().numpy(),
        "ST_agg": whole.ST.cpu().numpy(), "S1_agg_conf": whole.S1_conf.cpu().numpy(),
        "ST_agg_conf": whole.ST_conf.cpu().numpy(), "S1_mean": s1_mean, "ST_mean": st_mean,
        "ST_median": st_median, "dominant_fraction": dominant, "units": int(live.sum())})


def _s2_frame(key: str, r: Any, variables: list[str]) -> pd.DataFrame:
    d = len(variables)
    j, k = np.triu_indices(d, 1)
    s2 = r.S2.reshape(d, d, -1).cpu().numpy()[j, k]  # (pairs, units)
    conf = r.S2_conf.reshape(d, d, -1).cpu().numpy()[j, k]
    units = s2.shape[1]
    names = np.array(variables)
    return pd.DataFrame({"layer": key, "unit": np.repeat(np.arange(units), len(j)),
                         "variable_a": np.tile(names[j], units), "variable_b": np.tile(names[k], units),
                         "S2": s2.T.reshape(-1), "S2_conf": conf.T.reshape(-1)})


def variable_correlation(table: pd.DataFrame, index: str = "ST") -> pd.DataFrame:
    """Spearman correlation between the variables' sensitivity profiles across the units of a layer.

    For each layer, every variable's ``index`` over the layer's (non-constant) units is one profile;
    two variables correlate when the same units are sensitive to both (spec A.8). NaN where a
    profile is constant.
    """
    from scipy.stats import spearmanr

    frames = []
    for layer, frame in table[~table["constant"].astype(bool)].groupby("layer", sort=False):
        wide = frame.pivot(index="unit", columns="variable", values=index)
        names = list(dict.fromkeys(frame["variable"]))
        wide = wide[names]
        if len(wide) < 3:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rho = np.atleast_2d(spearmanr(wide.to_numpy()).statistic)
        if rho.shape != (len(names), len(names)):
            rho = np.full((len(names), len(names)), math.nan)
        frames.append(pd.DataFrame({"layer": layer, "variable_a": np.repeat(names, len(names)),
                                    "variable_b": np.tile(names, len(names)), "spearman": rho.reshape(-1)}))
    columns = ["layer", "variable_a", "variable_b", "spearman"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def lda_signature(maps: torch.Tensor, n_splits: int = 5, n_repeats: int = 10,
                  seed: int = 0) -> tuple[float, np.ndarray]:
    """How well a unit's sensitivity *map* tells which variable it belongs to (spec A.8, LDA).

    Each sample is one (variable, channel) pair: its features are the channel's H·W map of
    indices to that variable, its label the variable. Linear discriminant analysis (scikit-learn,
    SVD solver) is scored by repeated stratified k-fold cross-validation.

    Args:
        maps: ``(D, C, H, W)`` (or ``(D, C, P)``) sensitivity maps, e.g. ``run.arrays`` of a
            ``reduce="map"`` run.
        n_splits, n_repeats: the cross-validation scheme.
        seed: seeds the folds.

    Returns:
        ``(mean validation accuracy, confusion matrix normalised per true variable (D, D))``;
        chance level is ``1 / D``.
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.metrics import confusion_matrix
    from sklearn.model_selection import RepeatedStratifiedKFold

    d, c = maps.shape[:2]
    x = torch.nan_to_num(maps.reshape(d * c, -1).double()).numpy()
    y = np.repeat(np.arange(d), c)
    if c < n_splits:
        raise ValueError(f"LDA needs at least n_splits={n_splits} channels per variable, got {c}")
    folds = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=seed)
    conf = np.zeros((d, d))
    scores = []
    for tr, te in folds.split(x, y):
        model = LinearDiscriminantAnalysis(solver="svd").fit(x[tr], y[tr])
        pred = model.predict(x[te])
        scores.append(float((pred == y[te]).mean()))
        conf += confusion_matrix(y[te], pred, labels=np.arange(d))
    return float(np.mean(scores)), conf / conf.sum(1, keepdims=True)


# --------------------------------------------------------------------------- the design pass
def design_images(u_image: torch.Tensor, n_images: int) -> torch.Tensor:
    """Dataset index of each design row from its image column ``u`` in [0, 1): ``floor(u · n)``."""
    return torch.clamp((u_image * n_images).floor().long(), 0, n_images - 1)


def _item(data: Any, i: int) -> torch.Tensor:
    item = data[i]
    x = item if isinstance(item, torch.Tensor) else item["x"] if isinstance(item, dict) else item[0]
    return x


def sensitivity(model: nn.Module, data: Any,
                variables: Sequence[VariableSpec] | Mapping[str, Any] | None = None, n: int = 256,
                layers: LayerSpec | None = None, *, analysis: Sensitivity | None = None,
                reduce: str = "mean", second_order: bool = False, bootstrap: int = 100, seed: int = 0,
                batch_size: int = 256, device: str | torch.device = "auto",
                progress: bool = False, shard: tuple[int, int] | None = None,
                config: dict[str, Any] | None = None, checkpoint: str | Path | None = None,
                tf32: bool = False) -> Any:
    """Sobol' indices of every unit of ``layers`` to augmentation ``variables`` and the image.

    Streams the Saltelli design in chunks of base samples: for each chunk, the images of its A and
    B rows are loaded once, every design row is augmented with its own parameters, the model runs
    once on all rows (``batch_size`` rows at most) with hooks on the layers, and the units'
    outputs are folded into one :class:`~unitscope.stats.sobol.SobolAccumulator` per layer.

    Args:
        model: the network (its input must be images in [0, 1]; put normalisation in the model).
        data: a map-style dataset of images ``(C, H, W)`` in [0, 1] (items may be tuples).
        variables: augmentation variables (or give ``analysis``).
        n: base samples (a power of two).
        layers: the layers to analyse.
        analysis: a ready :class:`Sensitivity` (then ``variables``, ``n``, ``reduce``, ... come from it).
        reduce, second_order, bootstrap, seed: see :class:`Sensitivity`.
        batch_size: design rows per forward (at least one base sample's rows).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        progress: show a progress bar.
        shard: ``(i, k)``: evaluate only the i-th of k contiguous ranges of base samples; merge the
            shards' analyses (``a.merge(b)``, or ``unitscope.merge_runs`` on saved runs) to get the
            one-pass result. Under ``torchrun`` (an initialised process group) each rank takes its
            own range and the accumulators are synced, so every rank holds the full result.
        config: recorded in the manifest.
        checkpoint: a file to keep the accumulators in, every 30 seconds, when Ctrl-C stops the
            pass between chunks, and at its end. A call with the same model, data, design, layers,
            chunking and range resumes from it (another configuration starts over, with a warning).
        tf32: let a GPU convolve in TF32 (see :func:`unitscope.analyze`; off by default).

    Returns:
        A :class:`unitscope.Run` with the tables of :meth:`Sensitivity.tables`.

    Example:
        >>> import torch, unitscope
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = unitscope.load_model("digits-cnn")
        >>> data = unitscope.load_dataset("digits", "test")
        >>> run = sensitivity(model, data, ["brightness", "hflip"], n=16, layers="conv3", bootstrap=0)
        >>> sorted(run.table("sensitivity").variable.unique())
        ['brightness', 'hflip', 'image']
    """
    from ..data.arrays import dataset_fingerprint
    from ..engine import _check_same_everywhere, _checkpoint, _resume, _run_key, resolve_device, shard_range
    from ..models.info import probe_dtype_device
    from ..models.registry import model_fingerprint
    from ..results import Run

    if analysis is None:
        if variables is None:
            raise ValueError("name the augmentation variables, e.g. variables=['brightness', 'hue']")
        analysis = Sensitivity(variables, n=n, layers=layers, reduce=reduce, second_order=second_order,
                               bootstrap=bootstrap, seed=seed)
    a = analysis
    if getattr(a, "_passed", False):  # its accumulators hold that design's evaluations
        raise ValueError("this Sensitivity analysis already went through a sensitivity() call; pass a new "
                         "one (or none: one is built from the arguments) for every run")
    if len(data) == 0:
        raise ValueError("the dataset is empty: sensitivity needs images to augment")
    names = resolve_layers(model, a.layers if a.layers is not None else layers)
    design = saltelli_sample(a.columns, a.n, a.seed, a.second_order)
    total = design.A.shape[0]
    world = 1
    if shard is None and dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()  # under torchrun each rank evaluates its own range, then sync
        start, stop = shard_range(total, dist.get_rank(), world)
        _check_same_everywhere({"model": model_fingerprint(model), "data": dataset_fingerprint(data)}, world)
    else:
        start, stop = shard_range(total, *(shard or (0, 1)))
    d = len(a.groups)
    per_base = (2 * d if a.second_order else d) + 2
    chunk = max(1, batch_size // per_base)
    first = _item(data, 0)
    a.augmenter.check_channels(first.shape[0])
    dev = resolve_device(device)
    a.start(names)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and world > 1:  # one file per rank, as the engine's checkpoints
        ckpt = ckpt.with_name(f"{ckpt.stem}-rank{dist.get_rank()}-of{world}{ckpt.suffix}")
    done, run_key = 0, ""
    if ckpt is not None:
        fingerprints = {"model": model_fingerprint(model), "data": dataset_fingerprint(data)}
        run_key = _run_key(fingerprints, [a], {0: names}, chunk, start, stop, a.seed)
        done, _ = _resume([a], ckpt, run_key)  # base samples already folded in
    a._passed = done > 0
    a.to(dev)
    with preserved(model), tf32_allowed(tf32, dev):  # flags, device and TF32 switches come back
        model.eval()
        model.to(dev)
        dtype, _ = probe_dtype_device(model)  # augmented float32 images into a float64 or half model
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=stop - start, initial=done, desc="sensitivity", unit="base sample")
        t0 = time.perf_counter()
        saved, last, consistent = done, time.monotonic(), True
        try:
            with Capture(model, names, {"r": a.reduce}, stop=True) as cap, torch.inference_mode():
                for lo in range(start + done, stop, chunk):
                    hi = min(lo + chunk, stop)
                    x = _augmented(a.augmenter, data, design.rows(a.groups, lo, hi), dev)
                    with contextlib.suppress(StopForward):  # raised only with calls='first'
                        model(x.to(dtype) if dtype is not None else x)
                    c = hi - lo
                    consistent = False
                    a._passed = True
                    for key in names:
                        y = cap.outputs["r"][key]
                        y = y.reshape(c, per_base, *y.shape[1:])
                        y_ba = y[:, 1 + d:1 + 2 * d].movedim(1, 0) if a.second_order else None
                        a.accumulators[key].update(y[:, 0], y[:, -1], y[:, 1:1 + d].movedim(1, 0), y_ba,
                                                   index=torch.arange(lo, hi))
                    done, consistent = hi - start, True
                    if bar is not None:
                        bar.update(c)
                    if ckpt is not None and (time.monotonic() - last > 30.0 or hi == stop):
                        _checkpoint([a], ckpt, run_key, done, {})
                        saved, last = done, time.monotonic()
        except KeyboardInterrupt:
            if ckpt is not None and consistent and done > saved:  # never a half-folded chunk
                _checkpoint([a], ckpt, run_key, done, {})
                log.warning("interrupted after %d base samples; saved in %s, rerun to resume", done, ckpt)
            raise
        finally:
            if bar is not None:
                bar.close()
    a._passed = True  # also after an empty shard: the Run holds this object
    if world > 1:
        a.sync()
        start, stop = 0, total
    manifest = _manifest(model, data, a, names, dev, (start, stop), total, time.perf_counter() - t0,
                         shard, config, world)
    manifest["tf32"] = tf32
    return Run([a], manifest)


def _augmented(aug: Augmenter, data: Any, rows: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Images of every design row ``(c, R, d + 1)``, augmented: ``(c·R, C, H, W)`` on ``dev``."""
    flat = rows.reshape(-1, rows.shape[-1])
    idx = design_images(flat[:, -1], len(data))
    uniq, inverse = torch.unique(idx, return_inverse=True)
    images = torch.stack([_item(data, int(i)) for i in uniq]).to(dev)
    return aug(images[inverse.to(dev)], flat[:, :-1])  # the Augmenter checks dtype and range


def _manifest(model: nn.Module, data: Any, a: Sensitivity, layers: list[str], dev: torch.device,
              span: tuple[int, int], total: int, seconds: float, shard: tuple[int, int] | None,
              config: dict[str, Any] | None, world: int = 1) -> dict[str, Any]:
    import platform

    from .. import __version__
    from ..data.arrays import dataset_fingerprint
    from ..models.registry import model_fingerprint

    return {
        "status": "complete", "kind": "sensitivity", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"unitscope": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "device": str(dev), "seed": a.seed, "world_size": world,
        "shard": {"index": shard[0], "count": shard[1]} if shard else None,
        "model": {"class": type(model).__name__, "fingerprint": model_fingerprint(model),
                  "parameters": sum(p.numel() for p in model.parameters())},
        # the items streamed are the design's base samples: size and range count them, so shard runs
        # merge with unitscope.merge_runs / `unitscope merge` like any other
        "data": {"name": getattr(data, "name", type(data).__name__), "size": total, "images": len(data),
                 "fingerprint": dataset_fingerprint(data), "range": list(span)},
        "design": {"n": total, "range": list(span), "variables": a.variables,
                   "columns": [*a.augmenter.columns, "image.u"]},
        "layers": layers, "analyses": [{"name": a.name, "config": a.config()}], "nonfinite": {},
        "timings": {"pass_s": seconds, "samples": span[1] - span[0]},
        "config": config or {},
    }


# --------------------------------------------------------------------------- one augmentation at a time
def _outputs(model: nn.Module, names: list[str], reduce: str, x: torch.Tensor,
             batch_size: int) -> dict[str, torch.Tensor]:
    """Every layer's unit outputs ``(rows, units)`` (float64, on the CPU) for the images ``x``."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    with Capture(model, names, {"r": REDUCTIONS[reduce]}, stop=True) as cap, torch.inference_mode():
        for lo in range(0, len(x), batch_size):
            with contextlib.suppress(StopForward):
                model(x[lo:lo + batch_size])
            for k in names:
                parts[k].append(cap.outputs["r"][k].reshape(min(batch_size, len(x) - lo), -1).double().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def _subset(data: Any, images: int, seed: int) -> torch.Tensor:
    n = min(images, len(data))
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return torch.stack([_item(data, int(i)) for i in idx])


@restores_model
def contrast(model: nn.Module, data: Any, variables: Sequence[VariableSpec] | Mapping[str, Any],
             layers: LayerSpec, images: int = 64, draws: int = 4, reduce: str = "mean", seed: int = 0,
             batch_size: int = 256, device: str | torch.device = "cpu") -> pd.DataFrame:
    """Each augmentation applied alone against the original: a Wilcoxon test per unit (spec A.7).

    Every one of ``images`` images (a seeded subset) is augmented ``draws`` times with random
    parameters of one variable (on/off augmentations once, switched on), and each unit's paired
    differences ``augmented - original`` are tested with :func:`unitscope.stats.wilcoxon.signed_rank`.
    The p-values of every unit, layer and variable are corrected together with Benjamini–Hochberg.

    Returns:
        Table ``layer, unit, variable, statistic, p_value, q_value, rank_biserial, pairs``.
    """
    from ..engine import resolve_device
    from ..stats.wilcoxon import fdr_bh, signed_rank

    dev = resolve_device(device)
    names = resolve_layers(model, layers)
    model.eval().to(dev)
    x0 = _subset(data, images, seed).to(dev)
    base = _outputs(model, names, reduce, x0, batch_size)
    gen = torch.Generator().manual_seed(seed + 1)
    frames = []
    for spec in Augmenter(variables, channels=x0.shape[1]).variables:
        aug = Augmenter([(spec.name, {p.name: (p.low, p.high) for p in spec.params})])
        k = 1 if spec.switch else draws
        u = torch.zeros(len(x0) * k, aug.d) if spec.switch else torch.rand(len(x0) * k, aug.d, generator=gen)
        out = _outputs(model, names, reduce, aug(x0.repeat_interleave(k, 0), u), batch_size)
        for key in names:
            r = signed_rank(out[key] - base[key].repeat_interleave(k, 0))
            frames.append(pd.DataFrame({
                "layer": key, "unit": np.arange(r.p_value.numel()), "variable": spec.name,
                "statistic": r.statistic.numpy(), "p_value": r.p_value.numpy(),
                "rank_biserial": r.rank_biserial.numpy(), "pairs": r.n}))
    table = pd.concat(frames, ignore_index=True)
    table.insert(5, "q_value", fdr_bh(torch.from_numpy(table["p_value"].to_numpy(copy=True))).numpy())
    return table


@restores_model
def shapley(model: nn.Module, data: Any, variables: Sequence[VariableSpec] | Mapping[str, Any],
            layers: LayerSpec, n_perm: int = 64, n_outer: int = 16, n_inner: int = 4, reduce: str = "mean",
            seed: int = 0, batch_size: int = 256, device: str | torch.device = "cpu") -> pd.DataFrame:
    """Shapley effects of every unit to each augmentation variable and the image (spec A.6).

    The players are the variables (a variable's parameters move together) and the image column;
    :func:`unitscope.stats.shapley.shapley_effects` draws the design, and each permutation's
    ``players · n_outer · n_inner`` rows are augmented and run through the model in batches.

    Returns:
        Table ``layer, unit, variable, shapley`` (effects sum to 1 per unit; NaN for constant units).
    """
    from ..engine import resolve_device
    from ..stats.shapley import shapley_effects

    dev = resolve_device(device)
    names = resolve_layers(model, layers)
    model.eval().to(dev)
    aug = Augmenter(variables, channels=_item(data, 0).shape[0])

    def f(u: torch.Tensor) -> torch.Tensor:
        idx = design_images(u[:, -1], len(data))
        uniq, inverse = torch.unique(idx, return_inverse=True)
        imgs = torch.stack([_item(data, int(i)) for i in uniq]).to(dev)[inverse.to(dev)]
        out = _outputs(model, names, reduce, aug(imgs, u[:, :-1]), batch_size)
        return torch.cat([out[k] for k in names], 1)

    groups = [list(g) for g in aug.groups] + [[aug.d]]
    r = shapley_effects(f, aug.d + 1, n_perm=n_perm, n_outer=n_outer, n_inner=n_inner, seed=seed,
                        groups=groups)
    sizes = [v.shape[1] for v in _outputs(model, names, reduce, _subset(data, 1, seed).to(dev), 1).values()]
    frames, start = [], 0
    players = [*aug.names, "image"]
    for key, size in zip(names, sizes):
        eff = r.effects[:, start:start + size].numpy()
        start += size
        frames.append(pd.DataFrame({"layer": key, "unit": np.repeat(np.arange(size), len(players)),
                                    "variable": np.tile(players, size), "shapley": eff.T.reshape(-1)}))
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- HSV single-channel segments
PLANES = ("hue", "saturation", "value")


class PlaneSegment(nn.Module):
    """A segment of a network fed one HSV plane of an RGB image, replicated to its input channels.

    The seed's "separated and multiplexed segments" (spec A.10): the modules ``names`` of
    ``model`` run on their own, in order, on the ``plane`` (0 hue, 1 saturation, 2 value) of the
    augmented image in [0, 1] (the seed took HSV of the normalised tensor, defect D6), repeated
    ``in_channels`` times. The modules are shared with ``model``, not copied.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], plane: int, in_channels: int) -> None:
        super().__init__()
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"segment modules {missing} are not in the model; see "
                             "unitscope.layer_names(model)")
        self.plane, self.in_channels = plane, in_channels
        self.segment = nn.Sequential(*(modules[n] for n in names))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..augment import rgb_to_hsv

        hsv = rgb_to_hsv(x)[:, self.plane:self.plane + 1]
        return self.segment(hsv.expand(-1, self.in_channels, -1, -1).contiguous())


@restores_model
def hsv_segments(model: nn.Module, data: Any, variables: Sequence[VariableSpec] | Mapping[str, Any],
                 segment: Sequence[str], n: int = 256, bootstrap: int = 0, reduce: str = "mean",
                 seed: int = 0, batch_size: int = 256, device: str | torch.device = "cpu"
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sensitivity of a standalone segment's units fed single H, S or V planes, against the intact network.

    For each plane the segment (module names of ``model``, run in order; its first module must
    have ``in_channels``) is analysed with :func:`sensitivity` on the same design; the same units
    inside the intact network (the segment's last module) are analysed too. The comparison, per
    unit and plane, is the Spearman correlation of the ``ST`` profiles over the variables and their
    mean absolute difference (spec A.8, single-unit correlation).

    Returns:
        ``(indices, comparison)``: ``plane, unit, variable, S1, ST, S1_conf, ST_conf, constant``
        (``plane = "intact"`` for the network) and ``plane, unit, spearman, mean_abs_diff``.
    """
    first = dict(model.named_modules())[segment[0]]
    in_channels = getattr(first, "in_channels", None)
    if in_channels is None:
        raise ValueError(f"the segment's first module {segment[0]!r} has no in_channels (start it at a conv)")
    frames = []
    kw = dict(n=n, bootstrap=bootstrap, reduce=reduce, seed=seed, batch_size=batch_size, device=device)
    intact = sensitivity(model, data, variables, layers=segment[-1], **kw).table("sensitivity")
    frames.append(intact.drop(columns="layer").assign(plane="intact"))
    for p, plane in enumerate(PLANES):
        wrapped = PlaneSegment(model, segment, p, in_channels)
        last = f"segment.{len(segment) - 1}"
        t = sensitivity(wrapped, data, variables, layers=last, **kw).table("sensitivity")
        frames.append(t.drop(columns="layer").assign(plane=plane))
    table = pd.concat(frames, ignore_index=True)[["plane", *UNIT_COLUMNS[1:]]]
    names = list(dict.fromkeys(table["variable"]))
    wide = table.pivot_table(index=["plane", "unit"], columns="variable", values="ST", dropna=False)[names]
    ref = wide.loc["intact"].to_numpy()
    frames = []
    for plane in PLANES:
        cur = wide.loc[plane].reindex(wide.loc["intact"].index).to_numpy()
        frames.append(pd.DataFrame({"plane": plane, "unit": wide.loc["intact"].index.to_numpy(),
                                    "spearman": _row_spearman(ref, cur),
                                    "mean_abs_diff": np.abs(ref - cur).mean(1)}))
    return table, pd.concat(frames, ignore_index=True)


def _row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of every row of ``a`` with the same row of ``b`` (NaN if a row has NaN
    or is constant)."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(1) / np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    return np.where(np.isfinite(a).all(1) & np.isfinite(b).all(1), rho, np.nan)

