"""Centred Kernel Alignment (CKA) and the HSIC estimators behind it, closed form and streamed.

CKA compares two representations of the same ``n`` inputs (Kornblith et al. 2019, "Similarity of
Neural Network Representations Revisited"). With Gram matrices ``K`` and ``L`` of the two
representations and ``H = I - 11ᵀ/n``:

* biased HSIC: ``HSIC₀(K, L) = tr(KHLH) / (n-1)²``;
* unbiased HSIC (Song et al. 2012; Nguyen, Raghu and Kornblith 2021, Eq. 3), ``n >= 4``: the
  inner product of the U-centred Grams (Székely and Rizzo) divided by ``n(n-3)``;
* ``CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``.

Two streamed forms, both mergeable accumulators:

* :class:`LinearCKA`: exact biased linear CKA over a whole dataset. It is the covariance of the
  concatenated features of every layer (Chan updates in float64), so its memory is
  ``(Σ d)²`` and independent of ``n``; the cross blocks give ``‖Y_cᵀX_c‖_F²`` for every pair of
  layers at once. Wide conv layers must be reduced first (spatial mean or ``pool:D``).
* :class:`MinibatchCKA`: the minibatch estimator of Nguyen et al. (2021), the one torch-cka
  uses. Each batch of ``m`` inputs gives an ``m × m`` Gram per layer (any width: flattened maps
  are fine), the HSIC of every pair of layers is one matmul of the flattened centred Grams
  (the google-research design), and the per-batch values are summed. With the unbiased
  estimator it converges to the population CKA as batches are added; with one batch holding all
  inputs it is the closed form.

Example:
    >>> import torch
    >>> from unitscope.stats.cka import linear_cka
    >>> x = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
    >>> y = torch.tensor([[1.0], [2.0], [3.0], [5.0]], dtype=torch.float64)
    >>> round(float(linear_cka(x, y)), 6)  # Pearson r² = 169/175 for single features
    0.965714
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .base import Accumulator, MergeError, as_matrix

log = logging.getLogger(__name__)

ESTIMATORS = ("biased", "unbiased")
KERNELS = ("linear", "rbf")
#: the fewest samples per batch the unbiased estimator accepts (it divides by n(n-3))
MIN_UNBIASED = 4


def _check_estimator(estimator: str) -> bool:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: use 'biased' or 'unbiased'")
    return estimator == "unbiased"


def _check_unbiased_size(n: int) -> None:
    if n < MIN_UNBIASED:
        raise ValueError(
            f"the unbiased HSIC estimator needs at least {MIN_UNBIASED} samples per batch (it divides "
            f"by n(n-3)), got {n}; use a larger batch, drop the short last batch, or "
            "estimator='biased'")


# ------------------------------------------------------------------------------- Gram matrices
def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """Linear-kernel Gram ``X Xᵀ`` of ``(n, *features)`` (flattened), returned in float64.

    The product is taken in the features' precision. For CKA, prefer :func:`centred_linear_gram`:
    a float32 product of features with a large common offset loses the small centred part.
    """
    x = as_matrix(x)
    return (x @ x.T).to(torch.float64)


def gram_rbf(x: torch.Tensor, sigma: float | None = None, median_fraction: float = 1.0) -> torch.Tensor:
    """RBF-kernel Gram ``exp(-‖x_i - x_j‖² / (2σ²))`` of ``(n, *features)``, in float64.

    Args:
        x: the representation, one row per input.
        sigma: the bandwidth. ``None`` takes the median heuristic of Kornblith et al.:
            ``σ = median_fraction · sqrt(median(D))`` where ``D`` is the full ``n × n`` matrix of
            squared distances, zero diagonal included.
        median_fraction: the fraction of the median distance (their ``threshold``; 0.5 in their demo).
    """
    return rbf_from_linear(centred_linear_gram(as_matrix(x)), sigma, median_fraction)


def rbf_from_linear(g: torch.Tensor, sigma: float | None = None,
                    median_fraction: float = 1.0) -> torch.Tensor:
    """The RBF Gram (see :func:`gram_rbf`) from the linear Gram ``X Xᵀ`` of the same inputs (float64).

    Distances come from ``‖x_i - x_j‖² = K_ii + K_jj - 2 K_ij``, so a Gram of column-centred
    features gives the same result.
    """
    g = g.to(torch.float64)
    sq = torch.diagonal(g)
    dist = (sq[:, None] + sq[None, :] - 2 * g).clamp(min=0)
    if sigma is None:
        sigma2 = median_fraction ** 2 * torch.quantile(dist.flatten(), 0.5)
    else:
        sigma2 = torch.as_tensor(float(sigma) ** 2, dtype=torch.float64)
    if not float(sigma2) > 0:
        raise ValueError("RBF bandwidth is 0 (all inputs identical, or sigma=0); pass a positive sigma")
    return torch.exp(-dist / (2 * sigma2))


def centred_linear_gram(x: torch.Tensor) -> torch.Tensor:
    """``X_c X_cᵀ`` of the column-centred features of ``(m, *features)``, in the features' precision.

    Centring the columns changes neither the centred nor the U-centred Gram (nor distances), and
    removes the common offset (ReLU features are all positive) that would make a float32 Gram
    lose the small centred part to rounding. The result is what :meth:`MinibatchCKA.update_grams`
    takes; at ``m × m`` it is far smaller than the features.
    """
    f = x.reshape(x.shape[0], -1)
    f = f - f.mean(0)
    return f @ f.T


def centre_gram(k: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Centre Gram matrices ``(..., n, n)``: ``HKH`` (biased) or the U-centring (unbiased).

    The U-centred form (Székely and Rizzo 2014) zeroes the diagonal, subtracts row and column sums
    over ``n - 2``, adds the total over ``(n-1)(n-2)`` and zeroes the diagonal again; its inner
    product with another U-centred Gram, over ``n(n-3)``, is the unbiased HSIC.
    """
    k = k.to(torch.float64)
    n = k.shape[-1]
    if not unbiased:
        k = k - k.mean(-1, keepdim=True)
        return k - k.mean(-2, keepdim=True)
    _check_unbiased_size(n)
    eye = torch.eye(n, dtype=torch.bool, device=k.device)
    k = k.masked_fill(eye, 0.0)
    rows = k.sum(-1, keepdim=True) / (n - 2)
    cols = k.sum(-2, keepdim=True) / (n - 2)
    total = k.sum((-2, -1), keepdim=True) / ((n - 1) * (n - 2))
    return (k - rows - cols + total).masked_fill(eye, 0.0)


def _hsic_scale(n: int, unbiased: bool) -> float:
    return 1.0 / (n * (n - 3)) if unbiased else 1.0 / (n - 1) ** 2


def hsic(k: torch.Tensor, l: torch.Tensor, estimator: str = "biased") -> torch.Tensor:  # noqa: E741
    """HSIC of two ``n × n`` Gram matrices: ``"biased"`` (HSIC₀) or ``"unbiased"`` (HSIC₁, n ≥ 4).

    Example:
        >>> import torch
        >>> from unitscope.stats.cka import gram_linear, hsic
        >>> x = torch.arange(6.0).reshape(6, 1)
        >>> float(hsic(gram_linear(x), gram_linear(x))) == float(x.var() ** 2)
        True
    """
    unbiased = _check_estimator(estimator)
    if k.shape != l.shape or k.shape[-1] != k.shape[-2]:
        raise ValueError(f"Gram matrices must both be n × n with the same n, got {tuple(k.shape)} and "
                         f"{tuple(l.shape)}; feed both representations the same inputs")
    n = k.shape[-1]
    return (centre_gram(k, unbiased) * centre_gram(l, unbiased)).sum((-2, -1)) * _hsic_scale(n, unbiased)


def cka_from_grams(k: torch.Tensor, l: torch.Tensor, estimator: str = "biased") -> torch.Tensor:  # noqa: E741
    """CKA of two Gram matrices of the same inputs (NaN when a representation is constant)."""
    kk, ll, kl = hsic(k, k, estimator), hsic(l, l, estimator), hsic(k, l, estimator)
    return kl / torch.sqrt(kk * ll)


def _paired(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = as_matrix(x), as_matrix(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"the two representations have {x.shape[0]} and {y.shape[0]} rows; CKA compares "
                         "representations of the same inputs, one row per input, in the same order")
    if x.shape[0] < 2:
        raise ValueError(f"CKA needs at least 2 inputs (the biased HSIC divides by (n-1)²), got {x.shape[0]}")
    return x, y


def linear_cka(x: torch.Tensor, y: torch.Tensor, estimator: str = "biased") -> torch.Tensor:
    """Linear CKA of two representations ``(n, p)`` and ``(n, q)`` of the same inputs (float64).

    Uses the feature-space form ``‖Y_cᵀX_c‖_F² / (‖X_cᵀX_c‖_F ‖Y_cᵀY_c‖_F)`` (and its debiased
    counterpart from Kornblith et al.'s demo) when ``p·q`` is smaller than ``n²``, the Gram form
    otherwise; both give the same number.
    """
    unbiased = _check_estimator(estimator)
    x, y = _paired(x, y)
    n = x.shape[0]
    if unbiased:
        _check_unbiased_size(n)
    if x.shape[1] * y.shape[1] >= n * n:  # centred before the product: an offset must not swamp the rest
        return cka_from_grams(centred_linear_gram(x), centred_linear_gram(y), estimator)
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    x = x - x.mean(0)
    y = y - y.mean(0)

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        value = (b.T @ a).square().sum()
        if unbiased:
            ra, rb = a.square().sum(1), b.square().sum(1)
            value = value - n / (n - 2) * (ra @ rb) + ra.sum() * rb.sum() / ((n - 1) * (n - 2))
        return value

    return dot(x, y) / torch.sqrt(dot(x, x) * dot(y, y))


def rbf_cka(x: torch.Tensor, y: torch.Tensor, sigma: float | None = None, median_fraction: float = 1.0,
            estimator: str = "biased") -> torch.Tensor:
    """RBF-kernel CKA of two representations of the same ``n`` inputs (``n × n`` Grams, float64).

    Args:
        x, y: ``(n, *features)`` each.
        sigma: a fixed bandwidth for both; ``None`` uses each representation's median heuristic
            (see :func:`gram_rbf`).
        median_fraction: the fraction of the median distance when ``sigma`` is None.
        estimator: ``"biased"`` or ``"unbiased"``.
    """
    x, y = _paired(x, y)
    return cka_from_grams(gram_rbf(x, sigma, median_fraction), gram_rbf(y, sigma, median_fraction),
                          estimator)


# ------------------------------------------------------------------------------- exact, streamed
def _block_sums(values: torch.Tensor, dims_a: torch.Tensor, dims_b: torch.Tensor) -> torch.Tensor:
    """Sum a ``(Σ dims_a, Σ dims_b)`` matrix over its blocks: ``(len(dims_a), len(dims_b))``."""
    def indicator(dims: torch.Tensor) -> torch.Tensor:
        owner = torch.repeat_interleave(torch.arange(len(dims), device=values.device), dims.to(values.device))
        return torch.nn.functional.one_hot(owner, len(dims)).to(values.dtype)

    return indicator(dims_a).T @ values @ indicator(dims_b)


def _ratio(num: torch.Tensor, self_a: torch.Tensor, self_b: torch.Tensor) -> torch.Tensor:
    denom = torch.outer(self_a, self_b)
    bad = ~(denom > 0)
    if bool(bad.any()):
        log.warning("CKA is undefined (NaN) for %d layer pair(s): a representation has no variance "
                    "(constant or dead units) or its unbiased self-HSIC is not positive", int(bad.sum()))
    return torch.where(bad, torch.nan, num / torch.sqrt(denom.clamp(min=0)))


class LinearCKA(Accumulator):
    """Exact biased linear CKA between layers, over every input seen, with memory independent of n.

    The state holds float64 second moments of the features about a shift ``k`` (the first
    batch's mean, so the centring at the end does not cancel): ``n``, ``Σ(z-k)`` and

    * one model (not ``paired``): ``Σ(x-k)(x-k)ᵀ`` over the concatenated features of all layers;
    * two models (``paired``): the cross moment ``Σ(x-k)(y-k)ᵀ`` between the concatenated features
      of the two models, plus each layer's own block ``Σ(x_i-k)(x_i-k)ᵀ`` (the blocks between two
      layers of the same model are never needed, so they are not kept).

    A batch costs one float64 matrix product added in place (plus one per layer when paired);
    merging re-expresses the other state about this shift. The centred block of layers ``i`` and
    ``j`` is ``X_{i,c}ᵀ Y_{j,c}``, whose squared Frobenius norm is the CKA numerator. Memory is
    ``(Σd)²`` float64 values for one model and ``Σd_x·Σd_y + Σd²`` for two (see
    :func:`memory_bytes`): reduce conv maps to channels (spatial mean) or a few positions
    (``pool:2``) first, or use :class:`MinibatchCKA` for flattened maps. A row with a non-finite
    value is left out (counted in ``nonfinite_rows``).

    Args:
        paired: ``update`` takes two lists (two models, layers × other_layers); otherwise one list
            (layers × layers of one model).

    Example:
        >>> import torch
        >>> from unitscope.stats.cka import LinearCKA
        >>> acc = LinearCKA()
        >>> x = torch.randn(50, 3, dtype=torch.float64)
        >>> acc.update([x, 2 * x + 1])
        >>> acc.compute().round(decimals=6).tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """

    rules: ClassVar[dict[str, str]] = {"count": "custom", "shift": "custom", "sum": "custom",
                                       "cross": "custom", "blocks": "custom", "nonfinite_rows": "sum",
                                       "dims_x": "equal", "dims_y": "equal"}

    def __init__(self, paired: bool = False) -> None:
        super().__init__()
        self.paired = bool(paired)

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"paired": self.paired}

    def update(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor] | None = None) -> None:
        """Fold in one batch: a list of ``(n, *features)`` tensors per model, same ``n`` everywhere."""
        xs, ys = _check_lists(xs, ys, self.paired)
        feats = [as_matrix(t) for t in (*xs, *(ys or ()))]
        dims_x = torch.tensor([f.shape[1] for f in feats[:len(xs)]], dtype=torch.int64)
        dims_y = torch.tensor([f.shape[1] for f in feats[len(xs):]], dtype=torch.int64)
        z = torch.cat([f.to(torch.float64) for f in feats], 1)
        good = torch.isfinite(z).all(1)
        bad = int((~good).sum())
        if bad:
            log.warning("LinearCKA: %d of %d inputs have NaN or infinite features and are left out "
                        "(counted in skipped)", bad, z.shape[0])
            z = z[good]
        if not self.initialized:
            need = memory_bytes(dims_x.tolist(), dims_y.tolist() if self.paired else None)
            _check_memory(need, int(dims_x.sum() + dims_y.sum()))
            if z.shape[0] == 0:
                return
            self._init_states(z, dims_x, dims_y)
        s = self._states
        if not (torch.equal(s["dims_x"].cpu(), dims_x) and torch.equal(s["dims_y"].cpu(), dims_y)):
            raise ValueError(f"LinearCKA: feature widths changed from {s['dims_x'].tolist()} / "
                             f"{s['dims_y'].tolist()} to {dims_x.tolist()} / {dims_y.tolist()}; feed the "
                             "same layers with the same reduction every batch")
        zc = z - s["shift"]
        dx = int(dims_x.sum())
        if self.paired:
            s["cross"].addmm_(zc[:, :dx].T, zc[:, dx:])
            for (start, stop), (at, d) in zip(self._spans(), self._block_offsets()):
                blk = zc[:, start:stop]
                s["blocks"][at:at + d * d].view(d, d).addmm_(blk.T, blk)
        else:
            s["cross"].addmm_(zc.T, zc)
        s["sum"] += zc.sum(0)
        s["count"] += zc.shape[0]
        s["nonfinite_rows"] += bad

    def _init_states(self, z: torch.Tensor, dims_x: torch.Tensor, dims_y: torch.Tensor) -> None:
        dev = z.device
        f64 = {"dtype": torch.float64, "device": dev}
        dx, dy = int(dims_x.sum()), int(dims_y.sum())
        blocks = int((dims_x ** 2).sum() + (dims_y ** 2).sum()) if self.paired else 0
        self._states = {"count": torch.zeros((), **f64), "shift": z.mean(0),
                        "sum": torch.zeros(z.shape[1], **f64),
                        "cross": torch.zeros(dx, dy if self.paired else dx, **f64),
                        "blocks": torch.zeros(blocks, **f64),
                        "nonfinite_rows": torch.zeros((), dtype=torch.int64, device=dev),
                        "dims_x": dims_x.to(dev), "dims_y": dims_y.to(dev)}

    def _spans(self) -> list[tuple[int, int]]:
        """Column ranges of every layer (x layers, then y layers) in the concatenated features."""
        dims = torch.cat([self._states["dims_x"], self._states["dims_y"]]).tolist()
        ends = torch.tensor(dims).cumsum(0).tolist()
        return [(e - d, e) for d, e in zip(dims, ends)]

    def _block_offsets(self) -> list[tuple[int, int]]:
        """(offset, width) of every layer's own block in the packed ``blocks`` state."""
        dims = torch.cat([self._states["dims_x"], self._states["dims_y"]]).tolist()
        out, at = [], 0
        for d in dims:
            out.append((at, d))
            at += d * d
        return out

    def merge(self, other: Accumulator) -> Accumulator:
        """Fold ``other`` (same layers, same widths) into ``self``."""
        if (isinstance(other, LinearCKA) and self.initialized and other.initialized
                and not (torch.equal(self._states["dims_x"].cpu(), other._states["dims_x"].cpu())
                         and torch.equal(self._states["dims_y"].cpu(), other._states["dims_y"].cpu()))):
            raise MergeError("LinearCKA: the two states hold layers of different widths")
        return super().merge(other)

    def _merge_states(self, theirs: dict[str, torch.Tensor]) -> None:
        # (z - k_mine) = (z - k_theirs) + delta, so a moment Σ(a-k)(b-k)ᵀ of theirs gains
        # delta_a s_bᵀ + s_a delta_bᵀ + n delta_a delta_bᵀ
        s = self._states
        delta = theirs["shift"] - s["shift"]
        n_b, sum_b = theirs["count"], theirs["sum"]

        def moved(moment: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
            return (moment + torch.outer(delta[rows], sum_b[cols]) + torch.outer(sum_b[rows], delta[cols])
                    + n_b * torch.outer(delta[rows], delta[cols]))

        dx = int(s["dims_x"].sum())
        if self.paired:
            s["cross"] = s["cross"] + moved(theirs["cross"], slice(0, dx), slice(dx, None))
            blocks = s["blocks"].clone()
            for (start, stop), (at, d) in zip(self._spans(), self._block_offsets()):
                span = slice(start, stop)
                theirs_block = theirs["blocks"][at:at + d * d].view(d, d)
                blocks[at:at + d * d] += moved(theirs_block, span, span).flatten()
            s["blocks"] = blocks
        else:
            s["cross"] = s["cross"] + moved(theirs["cross"], slice(0, dx), slice(0, dx))
        s["sum"] = s["sum"] + sum_b + n_b * delta
        s["count"] = s["count"] + n_b

    @property
    def count(self) -> int:
        """How many inputs were folded in (rows with non-finite values are left out)."""
        return int(self._states["count"]) if self.initialized else 0

    @property
    def skipped(self) -> int:
        """How many inputs were left out for NaN or infinite features."""
        return int(self._states["nonfinite_rows"]) if self.initialized else 0

    def compute(self) -> torch.Tensor:
        """The ``(layers_x, layers_y)`` CKA matrix (``(layers, layers)`` when not paired), float64."""
        self._require_initialized()
        s = self._states
        n = float(s["count"].clamp(min=1))
        dx = int(s["dims_x"].sum())
        sx, sy = s["sum"][:dx], s["sum"][dx:] if self.paired else s["sum"]
        cross = torch.addr(s["cross"], sx, sy, alpha=-1.0 / n).square_()  # centred, squared
        sums = _block_sums(cross, s["dims_x"], s["dims_y"] if self.paired else s["dims_x"])
        if not self.paired:
            self_sim = torch.diagonal(sums)
            return _ratio(sums, self_sim, self_sim)
        self_sim = []
        for (start, stop), (at, d) in zip(self._spans(), self._block_offsets()):
            part = s["sum"][start:stop]
            block = torch.addr(s["blocks"][at:at + d * d].view(d, d), part, part, alpha=-1.0 / n)
            self_sim.append(block.square().sum())
        self_sim = torch.stack(self_sim)
        lx = len(s["dims_x"])
        return _ratio(sums, self_sim[:lx], self_sim[lx:])


def _check_memory(need: int, features: int, limit_bytes: float = 4 * 2 ** 30) -> None:
    if need > limit_bytes:
        raise MemoryError(
            f"exact linear CKA over {features} features needs a {need / 2 ** 30:.1f} GiB float64 state; "
            "reduce conv maps first (reduce='mean' or 'pool:2'), or use the minibatch estimator "
            "(estimator='unbiased'), whose memory is batch² per layer")


def _check_lists(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor] | None,
                 paired: bool) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    if isinstance(xs, torch.Tensor):
        xs = [xs]
    if isinstance(ys, torch.Tensor):
        ys = [ys]
    xs = list(xs)
    if not xs:
        raise ValueError("CKA needs at least one layer's features")
    if paired and not ys:
        raise ValueError("this accumulator is paired (two models): pass the second model's features as ys")
    if not paired and ys is not None:
        raise ValueError("this accumulator is not paired: pass one list of features, or create it with "
                         "paired=True to compare two models")
    ys = list(ys) if ys is not None else None
    sizes = {int(t.shape[0]) for t in (*xs, *(ys or ()))}
    if len(sizes) > 1:
        raise ValueError(f"the layers hold different numbers of samples {sorted(sizes)}; both models must "
                         "see the same batch of inputs (same size, same order)")
    return xs, ys


# ------------------------------------------------------------------------------- minibatch
class MinibatchCKA(Accumulator):
    """Minibatch CKA (Nguyen, Raghu and Kornblith 2021): per-batch HSIC summed over batches.

    For each batch of ``m`` inputs every layer's ``m × m`` Gram is centred once (U-centred for the
    unbiased estimator), flattened, and the HSIC of every pair of layers is one matrix product.
    The state is the sums over batches of ``HSIC(K_i, L_j)``, ``HSIC(K_i, K_i)`` and
    ``HSIC(L_j, L_j)``; ``compute`` takes the ratio, which equals torch-cka's average over
    batches. Features are column-centred in their own precision (which leaves both centrings of
    the Gram unchanged), their Gram is formed in that precision (:func:`centred_linear_gram`,
    which :meth:`update_grams` takes directly), then centred and summed in float64. torch-cka
    works on uncentred float32 Grams, where the U-statistic of wide ReLU features cancels (errors
    of 1e-2 on resnet18 blocks, and negative self-HSIC).

    Args:
        kernel: ``"linear"`` or ``"rbf"`` (bandwidth per batch: ``sigma``, or the median heuristic).
        estimator: ``"unbiased"`` (HSIC₁, batches of at least 4) or ``"biased"`` (HSIC₀).
        sigma, median_fraction: RBF bandwidth (see :func:`gram_rbf`).
        paired: compare two lists of layers (two models) instead of one list with itself.
        short_batches: a batch too short for the estimator (fewer than 4 inputs for the unbiased one,
            fewer than 2 otherwise) raises (``"error"``) or is counted in ``skipped`` (``"skip"``).

    Example:
        >>> import torch
        >>> from unitscope.stats.cka import MinibatchCKA
        >>> acc = MinibatchCKA()
        >>> x = torch.randn(32, 5)
        >>> acc.update([x, -3 * x])
        >>> acc.compute().round(decimals=5).tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """

    rules: ClassVar[dict[str, str]] = {"hsic_xy": "sum", "hsic_xx": "sum", "hsic_yy": "sum",
                                       "batches": "sum", "count": "sum", "skipped": "sum"}

    def __init__(self, kernel: str = "linear", estimator: str = "unbiased", sigma: float | None = None,
                 median_fraction: float = 1.0, paired: bool = False, short_batches: str = "error") -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r}: use 'linear' or 'rbf'")
        if short_batches not in ("error", "skip"):
            raise ValueError(f"short_batches={short_batches!r}: use 'error' or 'skip'")
        self.unbiased = _check_estimator(estimator)
        self.kernel, self.estimator, self.short_batches = kernel, estimator, short_batches
        self.sigma, self.median_fraction, self.paired = sigma, float(median_fraction), bool(paired)

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"kernel": self.kernel, "estimator": self.estimator, "sigma": self.sigma,
                "median_fraction": self.median_fraction, "paired": self.paired,
                "short_batches": self.short_batches}

    def _centred(self, grams: list[torch.Tensor]) -> torch.Tensor:
        k = torch.stack([g.to(torch.float64) for g in grams])
        if self.kernel == "rbf":
            k = torch.stack([rbf_from_linear(g, self.sigma, self.median_fraction) for g in k])
        return centre_gram(k, self.unbiased).reshape(len(grams), -1)

    def update(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor] | None = None) -> None:
        """Fold in one batch: a list of ``(m, *features)`` tensors per model, same ``m`` everywhere."""
        xs, ys = _check_lists(xs, ys, self.paired)
        gx = [centred_linear_gram(f) for f in xs]
        gy = [centred_linear_gram(f) for f in ys] if ys is not None else None
        self.update_grams(gx, gy)

    def update_grams(self, kx: Sequence[torch.Tensor], ky: Sequence[torch.Tensor] | None = None) -> None:
        """Fold in one batch given as linear Grams ``X Xᵀ`` (``m × m``, one per layer) instead of features.

        The Grams may be of column-centred features (:func:`centred_linear_gram`, which a capture
        hook can compute so the features are never kept); the RBF kernel is derived from them.
        """
        kx, ky = _check_lists(kx, ky, self.paired)
        m = int(kx[0].shape[0])
        dev = kx[0].device
        if any(k.dim() != 2 or k.shape[0] != k.shape[1] for k in (*kx, *(ky or ()))):
            raise ValueError("update_grams takes square m × m Gram matrices, one per layer")
        if m < (MIN_UNBIASED if self.unbiased else 2):
            if self.short_batches == "error":
                if self.unbiased:
                    _check_unbiased_size(m)
                raise ValueError(f"a CKA batch needs at least 2 samples, got {m}")
            shape = (len(kx), len(ky) if ky is not None else len(kx))
            part = {"hsic_xy": torch.zeros(shape, dtype=torch.float64, device=dev),
                    "hsic_xx": torch.zeros(shape[0], dtype=torch.float64, device=dev),
                    "hsic_yy": torch.zeros(shape[1], dtype=torch.float64, device=dev),
                    "batches": torch.zeros((), dtype=torch.float64, device=dev),
                    "count": torch.zeros((), dtype=torch.float64, device=dev),
                    "skipped": torch.tensor(float(m), dtype=torch.float64, device=dev)}
        else:
            gx = self._centred(kx)
            gy = self._centred(ky) if ky is not None else gx
            scale = _hsic_scale(m, self.unbiased)
            part = {"hsic_xy": (gx @ gy.T) * scale, "hsic_xx": gx.square().sum(1) * scale,
                    "hsic_yy": gy.square().sum(1) * scale,
                    "batches": torch.ones((), dtype=torch.float64, device=dev),
                    "count": torch.tensor(float(m), dtype=torch.float64, device=dev),
                    "skipped": torch.zeros((), dtype=torch.float64, device=dev)}
        if not self.initialized:
            self._states = part
            return
        if part["hsic_xy"].shape != self._states["hsic_xy"].shape:
            raise ValueError(f"MinibatchCKA: expected {tuple(self._states['hsic_xy'].shape)} layer pairs, "
                             f"got {tuple(part['hsic_xy'].shape)}; feed the same layers every batch")
        for k, v in part.items():
            self._states[k] = self._states[k] + v.to(self._states[k].device)

    @property
    def count(self) -> int:
        """How many inputs were folded in."""
        return int(self._states["count"]) if self.initialized else 0

    @property
    def skipped(self) -> int:
        """How many inputs were in batches too short for the estimator (``short_batches="skip"``)."""
        return int(self._states["skipped"]) if self.initialized else 0

    def compute(self) -> torch.Tensor:
        """The ``(layers_x, layers_y)`` CKA matrix, float64 (``(layers, layers)`` when not paired)."""
        self._require_initialized()
        s = self._states
        if self.count == 0 and self.skipped > 0:  # NaN everywhere, the diagonal included: say why
            # a warning, not an error: a shard of a few inputs is valid and its merge may not be
            least = MIN_UNBIASED if self.unbiased else 2
            log.warning("CKA: every batch was too short for the %s estimator (it needs at least %d inputs "
                        "per batch; %d inputs were in shorter batches), so every value is NaN; use a batch "
                        "size of at least %d", self.estimator, least, self.skipped, least)
        return _ratio(s["hsic_xy"], s["hsic_xx"], s["hsic_yy"])


def memory_bytes(dims_x: Sequence[int], dims_y: Sequence[int] | None = None) -> int:
    """Bytes of a :class:`LinearCKA` state over layers of these widths (to plan a reduction).

    ``dims_y`` None is one model (layers × layers), otherwise two models.
    """
    dx = sum(dims_x)
    if dims_y is None:
        return 8 * (dx * dx + 2 * dx)
    dy = sum(dims_y)
    return 8 * (dx * dy + sum(d * d for d in (*dims_x, *dims_y)) + 2 * (dx + dy))


__all__ = ["ESTIMATORS", "KERNELS", "LinearCKA", "MinibatchCKA", "centre_gram", "centred_linear_gram",
           "cka_from_grams", "gram_linear", "gram_rbf", "hsic", "linear_cka", "memory_bytes", "rbf_cka",
           "rbf_from_linear"]
