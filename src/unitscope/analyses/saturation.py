"""Saturation and intrinsic dimension per layer, during training, and PCA-projected inference.

The covariance of each layer's output is accumulated in float64 over the *whole* pass (a conv
output contributes every spatial position as a sample of its C channels, ``conv="channelwise"``,
or its spatial mean, ``conv="mean"``); its eigenvalues give the intrinsic dimension k (the
number of directions that explain ``delta`` of the variance) and the saturation k / width
(Shenk et al. 2021, arXiv 2006.08679). :class:`SaturationTracker` does the same for every
training epoch over all of that epoch's batches (and the test set), and :func:`projected_accuracy`
projects chosen layers onto their δ-eigenspace to measure what the remaining directions carry.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from ..capture import Capture, LayerSpec, resolve_layers
from ..stats.base import Accumulator
from ..stats.covariance import Covariance
from ..stats.saturation import (
    RULES,
    check_delta,
    eigenvalues,
    intrinsic_dimension,
    projection,
    saturation,
)
from ..train import Callback
from ..units import UnitLayout
from .base import Analysis

log = logging.getLogger(__name__)

CONV_METHODS = {"channelwise": "channelwise", "mean": "mean"}
#: the columns of the ``saturation`` table
COLUMNS = ["layer", "width", "intrinsic_dim", "saturation", "samples", "dead", "rank_deficient"]
DEFAULT_LAYERS = (nn.Conv2d, nn.Linear)


class Saturation(Analysis):
    """Intrinsic dimension and saturation of every selected layer.

    Args:
        layers: layers to measure (default: those given to ``analyze``; the seed measured every
            Conv2d and Linear output).
        delta: share of the variance the kept directions must explain, in (0, 1].
        conv: ``"channelwise"`` (every spatial position is a sample of a C-vector, the seed's
            default) or ``"mean"`` (spatial mean first, one sample per input).
        rule: ``"textbook"`` (k = min{k : c_k ≥ δ}) or ``"delve"`` (the peer library's rule, which
            can keep one direction fewer and explain less than δ; see
            :func:`unitscope.stats.saturation.intrinsic_dimension`).
        products: ``"float64"`` (default) or ``"float32"``: the precision of each batch's
            cross-product matrix (the covariance state is float64 either way; see
            :class:`unitscope.stats.Covariance`). ``"float32"`` is about 5x cheaper on a CPU.

    The table ``saturation`` has one row per layer: ``layer, width, intrinsic_dim, saturation,
    samples, dead, rank_deficient`` (fewer samples than width: the estimate is kept but flagged);
    the eigenvalues are in ``run.arrays["saturation"]``.

    Example:
        >>> import unitscope
        >>> run = unitscope.analyze(unitscope.load_model("digits-cnn"),
        ...                         unitscope.load_dataset("digits", "test"), layers="conv*",
        ...                         analyses=[unitscope.Saturation()], progress=False)
        >>> list(run.table("saturation").columns)[:5]
        ['layer', 'width', 'intrinsic_dim', 'saturation', 'samples']
    """

    name = "saturation"

    def __init__(self, layers: LayerSpec | None = None, delta: float = 0.99, conv: str = "channelwise",
                 rule: str = "textbook", products: str = "float64") -> None:
        super().__init__(layers)
        Covariance(products)  # checks the name
        if conv not in CONV_METHODS:
            raise ValueError(f"conv={conv!r}: use one of {', '.join(CONV_METHODS)}")
        if rule not in RULES:
            raise ValueError(f"rule={rule!r}: use one of {', '.join(RULES)}")
        self.delta, self.conv, self.rule = check_delta(delta), conv, rule
        self.products = products
        self.reduce = CONV_METHODS[conv]

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {**super().config(), "delta": self.delta, "conv": self.conv, "rule": self.rule,
                "products": self.products}

    def new_accumulator(self, key: str) -> Accumulator:
        """A float64 streaming covariance per layer."""
        return Covariance(self.products)

    def results(self) -> dict[str, Any]:
        """:class:`unitscope.stats.saturation.SaturationResult` per layer."""
        out = {}
        for key, acc in self.accumulators.items():
            if acc.initialized:
                r = acc.compute(ddof=0)
                if int(r.count) == 0:
                    raise ValueError(f"layer {key!r}: none of its output rows was finite (all NaN or inf), "
                                     "so it has no covariance; check the model and the data for NaN, or "
                                     "leave the layer out")
                out[key] = saturation(r.cov, int(r.count), self.delta, self.rule)
        return out

    def tables(self) -> dict[str, pd.DataFrame]:
        """``saturation``: one row per layer."""
        return {self.name: pd.DataFrame(self.rows(), columns=COLUMNS)}

    def rows(self) -> list[dict[str, Any]]:
        """The ``saturation`` table's rows as dicts (what :class:`SaturationTracker` records)."""
        rows = []
        for key, r in self.results().items():
            # a covariance centred on the sample mean has rank at most samples - 1
            deficient = r.samples <= r.width
            if deficient:
                log.warning("layer %s: %d samples for width %d, so its covariance (rank at most %d) is "
                            "rank-deficient and the saturation is a lower bound", key, r.samples, r.width,
                            r.samples - 1)
            rows.append({"layer": key, "width": r.width, "intrinsic_dim": r.intrinsic_dim,
                         "saturation": r.saturation, "samples": r.samples, "dead": r.dead,
                         "rank_deficient": deficient})
        return rows

    def arrays(self) -> dict[str, torch.Tensor]:
        """The eigenvalues of every layer (descending), by layer name."""
        return {key: r.eigenvalues for key, r in self.results().items()}


class _RowBuffer:
    """One layer's training outputs as rows, written in place by a forward hook, folded in blocks.

    The hook copies each forward's output straight into a preallocated ``(rows, C)`` block (for
    ``"channelwise"``, as ``(N, H, W, C)``), subtracting a shift in the same pass, so a batch
    costs one copy and no other arithmetic; a full block is folded into the covariance with
    :meth:`Covariance.update_shifted`, which then needs no centring pass. The shift is the first
    batch's mean, then the covariance's running mean, so the float32 products stay centred while
    the network trains. :meth:`commit` keeps the latest forward's rows: a forward in inference
    mode is not written at all, and any other forward not followed by a commit is overwritten by
    the next one. A block holds at most ``rows`` rows and about 2**22 values, or one batch when a
    batch is larger.
    """

    max_values = 1 << 22

    def __init__(self, conv: str, rows: int, acc: Covariance) -> None:
        self.conv, self.rows, self.acc = conv, rows, acc
        self.block: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None
        self.used = self.pending = 0

    def write(self, t: torch.Tensor) -> None:
        """The capture reduction: copy ``t``'s rows after the committed ones (nothing is returned).

        A forward in inference mode (``unitscope.train.evaluate``, ``analyze``, an evaluation
        inside a callback) is not a training batch: it is skipped, so it costs no copy and leaves
        the pending rows of the training forward as they are. (Forwards under ``no_grad`` are
        written, since a frozen part of a trained network may run under it.)
        """
        if torch.is_inference_mode_enabled():
            return
        if t.dim() < 2:
            t = t[:, None]
        if t.dim() > 2:
            src = t.movedim(1, -1) if self.conv == "channelwise" else t.mean(dim=tuple(range(2, t.dim())))
        else:
            src = t
        width = t.shape[1]
        n = src.numel() // width
        if n == 0:
            self.pending = 0
            return
        dtype = self.acc.product_dtype(t.dtype)
        block = self.block
        if block is None or block.shape[1] != width or block.dtype != dtype or block.device != t.device:
            self.flush()
            block = self.block = None
            self.shift = torch.nan_to_num(src.reshape(-1, width).to(dtype).mean(0), nan=0.0, posinf=0.0,
                                          neginf=0.0)
        elif self.used + n > block.shape[0]:
            self.flush()
        if block is None or n > block.shape[0]:
            rows = max(n, min(self.rows, self.max_values // width))
            block = self.block = torch.empty(rows, width, dtype=dtype, device=t.device)
        torch.sub(src, self.shift, out=block[self.used:self.used + n].view(src.shape))
        self.pending = n

    def commit(self) -> None:
        """Keep the rows of the latest forward."""
        self.used += self.pending
        self.pending = 0

    def flush(self) -> None:
        """Fold the committed rows into the covariance, empty the block, re-centre the shift."""
        if self.used:
            self.acc.update_shifted(self.block[:self.used], self.shift)
            mean = self.acc.compute(ddof=0).mean
            if bool(torch.isfinite(mean).all()):
                self.shift = mean.to(self.shift.dtype)
        self.used = self.pending = 0


class SaturationTracker(Callback):
    """A training callback: saturation per layer for every epoch, over all of its batches.

    Each epoch starts a fresh covariance per layer, fed by every training batch of that epoch (in
    train mode, as the seed did); at the end of the epoch the test set, if given, is measured in
    eval mode with the epoch's final weights. ``table`` holds one row per (epoch, split, layer).

    The forward hooks copy each training batch's outputs into a block per layer, which is folded
    into the covariance once it holds ``buffer_rows`` rows (and at the end of the epoch): one
    update per block instead of one per batch, with the same result. ``products="float32"`` (the
    default here, unlike :class:`Saturation`) takes each block's sums and cross-products in
    float32 before folding them into the float64 state: about 5x cheaper, with errors of about
    1e-5 of the largest covariance entry that leave the intrinsic dimensions unchanged (tested);
    forwards in inference mode (evaluations) are not tracked; pass ``"float64"`` for
    float64 products.

    Example:
        >>> import unitscope
        >>> from unitscope.train import train
        >>> model = unitscope.load_model("digits-cnn")
        >>> tracker = SaturationTracker(model, "conv*", test_data=unitscope.load_dataset("digits", "test"))
        >>> _ = train(model, unitscope.load_dataset("digits", "train"), epochs=1, callbacks=[tracker])
        >>> sorted(tracker.table["split"].unique()), int(tracker.table["samples"].iloc[0])
        (['test', 'train'], 91968)
    """

    def __init__(self, model: nn.Module, layers: LayerSpec | None = DEFAULT_LAYERS, delta: float = 0.99,
                 conv: str = "channelwise", rule: str = "textbook", test_data: Dataset | None = None,
                 batch_size: int = 256, buffer_rows: int = 1 << 15, products: str = "float32") -> None:
        if buffer_rows < 1:
            raise ValueError(f"buffer_rows={buffer_rows}: use a positive number of rows")
        self.model = model
        self.layers = resolve_layers(model, layers)
        self.analysis = Saturation(self.layers, delta=delta, conv=conv, rule=rule, products=products)
        self.test_data, self.batch_size = test_data, batch_size
        self.buffer_rows = buffer_rows
        self._capture: Capture | None = None
        self._blocks: dict[str, _RowBuffer] = {}
        self._rows: list[dict[str, Any]] = []

    @property
    def table(self) -> pd.DataFrame:
        """``epoch, split, layer, width, intrinsic_dim, saturation, samples, ...`` rows so far."""
        return pd.DataFrame(self._rows)

    def on_epoch_start(self, state: Any) -> None:
        """Fresh accumulators, and hooks on the tracked layers for this epoch's training forwards."""
        self.analysis.accumulators = {}
        self.analysis.start(self.layers)
        accs = self.analysis.accumulators
        self._blocks = {key: _RowBuffer(self.analysis.conv, self.buffer_rows, accs[key])
                        for key in self.layers}
        if self._capture is not None:  # an epoch that ended in an exception left its hooks
            self._capture.remove()
        self._capture = Capture(self.model, self.layers, {key: b.write for key, b in self._blocks.items()},
                                targets={key: {key} for key in self.layers})
        self._capture.__enter__()

    def close(self) -> None:
        """Remove the hooks of an epoch that an exception cut short (nothing after a full epoch)."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def on_batch_end(self, state: Any) -> None:
        """Keep this batch's rows (folded into the covariances whenever a block is full)."""
        if self._capture is not None:
            for block in self._blocks.values():
                block.commit()

    def on_epoch_end(self, state: Any, metrics: dict[str, Any]) -> None:
        """Record the epoch's training saturation, then measure the test set."""
        from ..engine import analyze

        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        for block in self._blocks.values():
            block.flush()
        self._blocks = {}
        self._record(state.epoch, "train", self.analysis.rows())
        if self.test_data is not None:
            test = Saturation(self.layers, delta=self.analysis.delta, conv=self.analysis.conv,
                              rule=self.analysis.rule, products=self.analysis.products)
            run = analyze(self.model, self.test_data, analyses=[test], batch_size=self.batch_size,
                          device=next(self.model.parameters()).device, progress=False)
            self._record(state.epoch, "test", run.table("saturation").to_dict("records"))

    def _record(self, epoch: int, split: str, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._rows.append({"epoch": epoch, "split": split, **row})

    def state_dict(self) -> dict[str, Any]:
        """The rows recorded so far (plain Python values), saved in every training checkpoint."""
        return {"rows": [{k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()}
                         for row in self._rows]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back the rows of the epochs before a resumed training's checkpoint."""
        self._rows = [dict(row) for row in state.get("rows", [])]


def projected_accuracy(model: nn.Module, train_data: Dataset, test_data: Dataset, layers: LayerSpec,
                       deltas: Sequence[float] = (0.9, 0.95, 0.99, 0.995, 0.999),
                       conv: str = "channelwise", batch_size: int = 256,
                       device: str | torch.device = "auto", rule: str = "textbook") -> pd.DataFrame:
    """Test accuracy when chosen layers are projected onto their δ-eigenspace, for several δ.

    The covariance of each layer comes from one pass over ``train_data`` (eval mode); for each δ
    every chosen layer's output is replaced by ``μ + (x − μ) P`` with ``P`` the projection onto
    the k leading eigen-directions (``rule`` picks k as in :class:`Saturation`; conv layers: per
    spatial position over channels, so ``conv`` must be ``"channelwise"``: a basis of the
    spatially averaged outputs is not one of the positions it would project), and the test set is
    evaluated. δ = 1 keeps every direction with non-zero variance. Unlike the seed, the
    projection is centred on the layer's mean. Every δ is checked before the pass.

    Returns:
        One row per δ: ``delta, test_acc, test_loss, sum_k, sum_width, mean_saturation``, plus a
        row ``delta = NaN`` for the unprojected model (``baseline`` True).
    """
    from ..engine import analyze
    from ..train import evaluate

    deltas = [check_delta(d) for d in deltas]
    if conv != "channelwise":
        raise ValueError(f"projected_accuracy(conv={conv!r}): the projection acts on every spatial position, "
                         "so its basis must come from them; use conv='channelwise'")
    sat = Saturation(layers, conv=conv, rule=rule)
    run = analyze(model, train_data, analyses=[sat], batch_size=batch_size, device=device, progress=False)
    stats = {k: acc.compute(ddof=0) for k, acc in run.analysis("saturation").accumulators.items()}
    dev = next(model.parameters()).device
    base = evaluate(model, test_data, batch_size=batch_size, device=dev)
    rows = [{"delta": float("nan"), "test_acc": base["acc"], "test_loss": base["loss"], "baseline": True,
             "sum_k": sum(int(s.cov.shape[0]) for s in stats.values()),
             "sum_width": sum(int(s.cov.shape[0]) for s in stats.values()), "mean_saturation": 1.0}]
    modules = dict(model.named_modules())
    units = UnitLayout(model)
    spectra = {key: eigenvalues(s.cov) for key, s in stats.items()}
    for delta in deltas:
        handles, ks, widths = [], [], []
        try:
            for key, s in stats.items():
                k = intrinsic_dimension(spectra[key], delta, rule)
                p = projection(s.cov, k)
                ks.append(k)
                widths.append(int(s.cov.shape[0]))
                handles.append(modules[key].register_forward_hook(_projector(s.mean, p, units, key)))
            handles.append(units.watch(list(stats)))
            m = evaluate(model, test_data, batch_size=batch_size, device=dev)
        finally:
            for h in handles:
                h.remove()
        rows.append({"delta": float(delta), "test_acc": m["acc"], "test_loss": m["loss"], "baseline": False,
                     "sum_k": sum(ks), "sum_width": sum(widths),
                     "mean_saturation": sum(k / w for k, w in zip(ks, widths)) / len(ks)})
    return pd.DataFrame(rows)


def _projector(mean: torch.Tensor, proj: torch.Tensor, units: UnitLayout, key: str):
    cast: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        where = (output.device, output.dtype)
        if where not in cast:  # once, not a host-to-device copy per batch
            cast[where] = (mean.to(*where), proj.to(*where))
        mu, p = cast[where]
        axis = units.axis(key, output)  # the units' axis, 1 or the last
        x = output.movedim(axis, -1)
        return (mu + (x - mu) @ p).movedim(-1, axis).contiguous()
    return hook


def plot_saturation(table: pd.DataFrame, ax: Any = None) -> Any:
    """Saturation per layer as bars (one ``saturation`` table); returns the figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 3), layout="constrained")
    ax.bar(table["layer"], table["saturation"], color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_ylabel("saturation k/d")
    ax.tick_params(axis="x", rotation=45)
    return fig


def plot_saturation_epochs(table: pd.DataFrame, split: str = "train", ax: Any = None) -> Any:
    """Layer × epoch heatmap of saturation from a :class:`SaturationTracker` table."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    grid = table[table["split"] == split].pivot(index="layer", columns="epoch", values="saturation")
    grid = grid.loc[list(dict.fromkeys(table["layer"]))]
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(
        figsize=(1.2 + 0.5 * grid.shape[1], 0.8 + 0.35 * grid.shape[0]), layout="constrained")
    im = ax.imshow(grid.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), grid.columns)
    ax.set_yticks(range(grid.shape[0]), grid.index)
    ax.set_xlabel("epoch")
    ax.set_title(f"saturation ({split})")
    for (i, j), value in np.ndenumerate(grid.to_numpy()):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                color="white" if value < 0.6 else "black")
    fig.colorbar(im, ax=ax)
    return fig


def plot_saturation_per_epoch(table: pd.DataFrame) -> Any:
    """One panel per epoch: saturation of every layer, train and test side by side."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = sorted(table["epoch"].unique())
    layers = list(dict.fromkeys(table["layer"]))
    cols = min(len(epochs), 4)
    rows = -(-len(epochs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False,
                             sharey=True, layout="constrained")
    for ax, epoch in zip(axes.flat, epochs):
        for offset, split in ((-0.2, "train"), (0.2, "test")):
            rows_ = table[(table["epoch"] == epoch) & (table["split"] == split)].set_index("layer")
            if not rows_.empty:
                ax.bar(np.arange(len(layers)) + offset, rows_.reindex(layers)["saturation"], width=0.4,
                       label=split)
        ax.set_title(f"epoch {epoch}")
        ax.set_xticks(range(len(layers)), layers, rotation=45, fontsize=7)
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(epochs):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("saturation k/d")
    axes[0, 0].legend(fontsize=7)
    return fig


def plot_projected_accuracy(table: pd.DataFrame, ax: Any = None) -> Any:
    """Test accuracy against δ for :func:`projected_accuracy`, with the unprojected model as a line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3), layout="constrained")
    rows = table[~table["baseline"]]
    ax.plot(rows["delta"], rows["test_acc"], "o-", label="projected")
    ax.axhline(float(table[table["baseline"]]["test_acc"].iloc[0]), color="grey", ls="--", label="model")
    ax.set_xlabel("δ")
    ax.set_ylabel("test accuracy")
    ax.legend()
    return fig
