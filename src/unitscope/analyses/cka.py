"""CKA between the layers of one model, or between two models fed the same batches in one pass.

The engine captures the main model; when ``other`` is given, the analysis runs the other model
on the same batch (``batch.x``) with its own capture, so both see the same inputs in the same
order by construction. Two routes, chosen by kernel and estimator:

* ``kernel="linear", estimator="biased"``: exact linear CKA over the whole dataset
  (:class:`unitscope.stats.cka.LinearCKA`, the float64 covariance of all layers' features).
  Its memory is ``(Σ d)²``, so conv maps are reduced first: ``reduce="mean"`` (channels, the
  default) or ``"pool:D"``. Flattened maps of wide layers are refused with the memory they need.
* ``estimator="unbiased"`` or ``kernel="rbf"``: the minibatch estimator of Nguyen et al. (2021)
  (:class:`unitscope.stats.cka.MinibatchCKA`) on flattened maps by default: per-batch Grams, whose
  memory is ``batch²`` per layer whatever the width. It is torch-cka's estimator.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..capture import Capture, LayerSpec, Reduction, make_reduction, resolve_layers
from ..models.info import probe_dtype_device
from ..models.modes import preserved
from ..stats.base import Accumulator
from ..stats.cka import MIN_UNBIASED, LinearCKA, MinibatchCKA, centred_linear_gram, linear_cka, rbf_cka
from .base import Analysis, Batch

log = logging.getLogger(__name__)

KEY = "cka"


class CKA(Analysis):
    """The layer × layer CKA matrix of one model, or of two models on the same inputs.

    Args:
        other: a second model, run in eval mode on every batch of the pass (``None``: compare the
            layers of the analysed model with each other). It is moved to the pass's device for
            the pass and back after it; its train/eval mode is restored after every batch.
        kernel: ``"linear"`` or ``"rbf"`` (RBF bandwidth per batch, see ``sigma``).
        estimator: ``"biased"`` (with the linear kernel: exact over the whole dataset) or
            ``"unbiased"`` (the minibatch HSIC₁ estimator, batches of at least 4).
        layers: layers of the analysed model (default: those given to ``unitscope.analyze``).
        other_layers: layers of ``other`` (default: the same names as ``layers``).
        reduce: how a layer's output becomes features: default ``"mean"`` (per channel) for the
            exact route, ``"flatten"`` for the minibatch route; ``"pool:D"`` keeps D×D positions.
        sigma, median_fraction: RBF bandwidth: fixed, or ``median_fraction`` × the median distance.
        short_batches: what to do with a batch too small for the unbiased estimator (a short last
            batch): ``"skip"`` (logged, and counted in the table's ``skipped`` column) or ``"error"``.
        resolved: the resolved layer names, filled in by the pass (used to rebuild saved runs).

    Example:
        >>> import unitscope
        >>> from unitscope.analyses.cka import CKA
        >>> model = unitscope.load_model("digits-cnn")
        >>> run = unitscope.analyze(model, unitscope.load_dataset("digits", "test"), layers="conv*",
        ...                         analyses=[CKA()], progress=False)
        >>> run.table("cka").shape
        (9, 6)
        >>> run.arrays["cka"]["matrix"].diagonal().tolist()
        [1.0, 1.0, 1.0]
    """

    name = "cka"

    def __init__(self, other: nn.Module | None = None, kernel: str = "linear", estimator: str = "biased",
                 layers: LayerSpec | None = None, other_layers: LayerSpec | None = None,
                 reduce: Reduction | None = None, sigma: float | None = None, median_fraction: float = 1.0,
                 short_batches: str = "skip", resolved: Mapping[str, list[str]] | None = None) -> None:
        super().__init__(layers)
        if other is not None and not isinstance(other, nn.Module):
            raise TypeError(f"CKA(other=...) takes a torch.nn.Module, got {type(other).__name__}")
        if short_batches not in ("skip", "error"):
            raise ValueError(f"short_batches={short_batches!r}: use 'skip' or 'error'")
        self.other = other
        self.kernel, self.estimator = kernel, estimator
        self.exact = kernel == "linear" and estimator == "biased"
        self.features = reduce if reduce is not None else ("mean" if self.exact else "flatten")
        if callable(self.features):
            raise ValueError("CKA(reduce=...) takes a name ('mean', 'max', 'flatten', 'pool:D'), so the run "
                             "can be saved and resumed")
        # the minibatch route needs only each batch's Gram: the capture hook computes it, so the
        # (flattened) maps are never copied or kept
        self.reduce = self.features if self.exact else GramOf(self.features)
        self.other_layers = other_layers
        self.sigma, self.median_fraction, self.short_batches = sigma, median_fraction, short_batches
        self.resolved = {k: list(v) for k, v in (resolved or {}).items()}
        self._warned_short = False
        self.paired = other is not None or bool(self.resolved.get("y"))
        self._new_accumulator()  # validates kernel and estimator now, not at the first batch

    def config(self) -> dict[str, Any]:
        """Constructor arguments (the other model is not recorded; its layer names are)."""
        other_layers = self.other_layers
        if isinstance(other_layers, type):
            other_layers = other_layers.__name__
        return {**super().config(), "kernel": self.kernel, "estimator": self.estimator,
                "other_layers": other_layers, "reduce": self.features, "sigma": self.sigma,
                "median_fraction": self.median_fraction, "short_batches": self.short_batches,
                "resolved": self.resolved}

    def _new_accumulator(self) -> Accumulator:
        if self.exact:
            return LinearCKA(paired=self.paired)
        return MinibatchCKA(kernel=self.kernel, estimator=self.estimator, sigma=self.sigma,
                            median_fraction=self.median_fraction, paired=self.paired,
                            short_batches=self.short_batches)

    def start(self, keys: list[str]) -> None:
        """Resolve the other model's layers and create the single accumulator (unless resuming)."""
        self.resolved["x"] = list(keys)
        self._warned_short = False
        if self.other is not None:
            spec = self.other_layers if self.other_layers is not None else list(keys)
            self.resolved["y"] = resolve_layers(self.other, spec)
        self.accumulators.setdefault(KEY, self._new_accumulator())

    def new_accumulator(self, key: str) -> Accumulator:
        """The one accumulator of the analysis (all layer pairs at once)."""
        return self._new_accumulator()

    def update(self, acts: Mapping[str, torch.Tensor], batch: Batch) -> None:
        """Fold one batch: the analysed model's captured layers and, if paired, the other model's."""
        m = int(batch.x.shape[0])
        if not self.exact and self.estimator == "unbiased" and m < MIN_UNBIASED:
            if self.short_batches == "error":
                raise ValueError(f"a batch of {m} inputs is too small for the unbiased CKA estimator (it "
                                 f"needs at least {MIN_UNBIASED}); change batch_size so no short last batch "
                                 "remains, or pass short_batches='skip'")
            if not self._warned_short:  # once per pass: the table's 'skipped' counts them all
                log.warning("CKA: skipping batches of fewer than %d inputs (the unbiased estimator needs "
                            "at least %d; first: a batch of %d); the table's 'skipped' counts their inputs",
                            MIN_UNBIASED, MIN_UNBIASED, m)
                self._warned_short = True
            xs = [acts[k] for k in self.resolved["x"]]
            ys = [xs[0]] * len(self.resolved["y"]) if self.paired else None  # only the count is kept
            self.accumulators[KEY].update_grams(xs, ys)
            return
        xs = [acts[k] for k in self.resolved["x"]]
        ys = self._other_features(batch.x) if self.paired else None
        if self.exact:
            self.accumulators[KEY].update(xs, ys)
        else:
            self.accumulators[KEY].update_grams(xs, ys)

    def models(self) -> list[nn.Module]:
        """The other model, which the pass moves to its device."""
        return [self.other] if self.other is not None else []

    def _other_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        other = self.other
        if other is None:
            raise ValueError("this CKA analysis was rebuilt from saved states without its other model; "
                             "create it with CKA(other=model) to run a pass")
        expected = getattr(other, "input_shape", None)
        if expected is not None and tuple(x.shape[1:]) != tuple(expected):
            raise ValueError(f"the two models see different input sizes: the batch has shape "
                             f"{tuple(x.shape[1:])} but the other model ({type(other).__name__}) expects "
                             f"{tuple(expected)}; compare models that take the same inputs")
        param = next(other.parameters(), None)
        if param is not None and param.device != x.device:
            other.to(x.device)
        dtype, _ = probe_dtype_device(other)
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)  # the batch comes in the analysed model's dtype, not necessarily the other's
        cap = Capture(other, self.resolved["y"], {"r": self.reduce}, stop=True)
        # flags only: the other model stays on the batch's device for the next batches
        with preserved(other, device=False):
            other.eval()
            try:
                with cap:
                    other(x)
            except RuntimeError as exc:
                raise ValueError(f"the other model ({type(other).__name__}) failed on the batch of shape "
                                 f"{tuple(x.shape)}: {exc}. Both models must take the same inputs.") from exc
        out = cap.outputs["r"]
        missing = [k for k in self.resolved["y"] if k not in out]
        if missing:
            raise ValueError(f"layers {missing} of the other model did not run in its forward; pick layers "
                             "that are called")
        return [out[k] for k in self.resolved["y"]]

    # ------------------------------------------------------------------ results
    def matrix(self) -> torch.Tensor:
        """The CKA matrix, rows ``resolved['x']``, columns ``resolved['y']`` (or ``['x']``)."""
        return self.accumulators[KEY].compute()

    def tables(self) -> dict[str, pd.DataFrame]:
        """``cka``: one row per (layer_x, layer_y) with ``cka``, ``n`` inputs and ``skipped`` inputs."""
        acc = self.accumulators.get(KEY)
        columns = ["layer_x", "layer_y", "cka", "n", "skipped", "estimator"]
        if acc is None or not acc.initialized:
            return {self.name: pd.DataFrame(columns=columns)}
        names_x = self.resolved["x"]
        names_y = self.resolved.get("y") if self.paired else names_x
        values = self.matrix().cpu()
        rows_x = [a for a in names_x for _ in names_y]
        rows_y = [b for _ in names_x for b in names_y]
        label = "exact" if self.exact else f"minibatch-{self.estimator}"
        return {self.name: pd.DataFrame({
            "layer_x": rows_x, "layer_y": rows_y, "cka": values.flatten().numpy(),
            "n": acc.count, "skipped": getattr(acc, "skipped", 0), "estimator": f"{self.kernel}-{label}"})}

    def arrays(self) -> dict[str, torch.Tensor]:
        """``matrix``: the CKA matrix (float64)."""
        acc = self.accumulators.get(KEY)
        return {"matrix": self.matrix()} if acc is not None and acc.initialized else {}


class GramOf:
    """A capture reduction: the Gram of a layer's column-centred features, computed inside the hook.

    ``spec`` names how the output becomes features first (``"flatten"``, ``"mean"``, ``"pool:D"``,
    ...). The Gram is formed before any later in-place operation can change the output, so the
    flattened map is neither copied nor kept.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.base = None if spec == "flatten" else make_reduction(spec)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """``(N, *shape)`` -> ``(N, N)``."""
        return centred_linear_gram(t.detach() if self.base is None else self.base(t))

    def __repr__(self) -> str:
        return f"GramOf({self.spec!r})"


# ------------------------------------------------------------------------------- celebalucid usage
@dataclass(frozen=True)
class CKABetween:
    """CKA of one layer between two models, averaged over random draws ("epochs").

    Attributes:
        mean: the mean over epochs (celebalucid's number).
        std: the standard deviation over epochs (0 for one epoch).
        values: the CKA of every epoch.
        n: inputs per epoch.
    """

    mean: float
    std: float
    values: list[float]
    n: int


def cka_between(model_a: nn.Module, model_b: nn.Module, data: Any, layer: str, n_iters: int = 64,
                batch_size: int = 32, epochs: int = 10, seed: int = 0, *, other_layer: str | None = None,
                kernel: str = "linear", estimator: str = "biased", reduce: Reduction = "flatten",
                device: str | torch.device = "cpu") -> CKABetween:
    """CKA of ``layer`` between two models, averaged over ``epochs`` random draws of the data.

    This is celebalucid's procedure: each epoch ``e`` draws ``n_iters × batch_size`` distinct
    inputs at random (generator seeded with ``seed + e``), runs both models on them in the same
    order, flattens the layer (``reduce``) and takes the CKA of the whole draw; the result is the
    mean over epochs. celebalucid used the biased estimator, which is inflated when features
    outnumber inputs; pass ``estimator="unbiased"`` for a debiased value. Memory is the draw's
    features (``n × d`` per model).

    Args:
        model_a, model_b: the two networks (put in eval mode for the draws, then restored).
        data: a map-style dataset of tensors or ``(input, label)`` pairs.
        layer: the layer of ``model_a`` (and of ``model_b`` unless ``other_layer`` is given).
        n_iters, batch_size: the draw is ``n_iters × batch_size`` inputs, run in batches of ``batch_size``.
        epochs: how many independent draws to average.
        seed: the draws' base seed.
        kernel, estimator: see :func:`unitscope.stats.cka.linear_cka` and ``rbf_cka``.
        reduce: how the layer's output becomes features (``"flatten"`` as in celebalucid).
        device: where the models run.
    """
    from ..engine import _unpack, resolve_device

    if kernel not in ("linear", "rbf"):
        raise ValueError(f"kernel={kernel!r}: use 'linear' or 'rbf'")
    n = n_iters * batch_size
    if len(data) < n:
        log.warning("cka_between: the dataset has %d inputs, fewer than n_iters × batch_size = %d; each "
                    "epoch uses all of them", len(data), n)
        n = len(data)
    if epochs < 1 or n < 2:
        raise ValueError("cka_between needs epochs >= 1 and at least 2 inputs per epoch")
    dev = resolve_device(device)
    layer_b = other_layer or layer
    values = []
    with preserved(model_a), preserved(model_b):  # every module's mode and the devices
        for m in (model_a, model_b):
            m.eval().to(dev)
        for e in range(epochs):
            g = torch.Generator().manual_seed(seed + e)
            order = torch.randperm(len(data), generator=g)[:n].tolist()
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, order), batch_size=batch_size)
            feats_a, feats_b = [], []
            with torch.inference_mode():
                for item in loader:
                    x = _unpack(item)[0].to(dev)
                    feats_a.append(_layer_features(model_a, layer, x, reduce))
                    feats_b.append(_layer_features(model_b, layer_b, x, reduce))
            xa, xb = torch.cat(feats_a), torch.cat(feats_b)
            if kernel == "linear":
                value = linear_cka(xa, xb, estimator)
            else:
                value = rbf_cka(xa, xb, estimator=estimator)
            values.append(float(value))
    t = torch.tensor(values, dtype=torch.float64)
    return CKABetween(mean=float(t.mean()), std=float(t.std()) if len(values) > 1 else 0.0,
                      values=values, n=n)


def _layer_features(model: nn.Module, layer: str, x: torch.Tensor, reduce: Reduction) -> torch.Tensor:
    cap = Capture(model, [layer], {"r": reduce}, stop=True)
    with cap:
        model(x)
    return cap.outputs["r"][layer].flatten(1).cpu()


# ------------------------------------------------------------------------------- figure
def plot_cka(table: pd.DataFrame, ax: Any = None, title: str | None = None) -> Any:
    """Heatmap of a ``cka`` table (rows layer_x, columns layer_y, in table order); returns the figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(table["layer_x"]))
    cols = list(dict.fromkeys(table["layer_y"]))
    grid = table.pivot(index="layer_x", columns="layer_y", values="cka").loc[rows, cols].to_numpy(float)
    if ax is None:
        size = (1.2 + 0.55 * len(cols), 1.0 + 0.5 * len(rows))
        fig, ax = plt.subplots(figsize=(max(size[0], 4.0), max(size[1], 3.0)), layout="constrained")
    else:
        fig = ax.figure
    image = ax.imshow(grid, cmap="magma", vmin=0.0, vmax=1.0, origin="lower")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    if len(rows) * len(cols) <= 100:
        for i in range(len(rows)):
            for j in range(len(cols)):
                v = grid[i, j]
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else "white")
    fig.colorbar(image, ax=ax, label="CKA")
    ax.set_title(title or "CKA")
    return fig
