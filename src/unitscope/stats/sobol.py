"""Sobol' sensitivity indices of many outputs at once: Saltelli design, streaming estimators, bootstrap.

A model ``f`` of ``d`` independent inputs is evaluated on the Saltelli design: for every base
sample ``n`` the rows ``A[n]``, ``B[n]`` and ``AB_j[n]`` (``A[n]`` with the columns of group ``j``
taken from ``B[n]``), and with second order also ``BA_j[n]``. The estimators, for every output at
once, are

* first order, Saltelli et al. (2010): ``S1_j = mean(f_B · (f_AB_j - f_A)) / V``,
* total order, Jansen (1999): ``ST_j = mean((f_A - f_AB_j)²) / (2 V)``,
* second order, Saltelli (2002): ``S2_jk = mean(f_BA_j · f_AB_k - f_A · f_B) / V - S1_j - S1_k``,

with ``V`` the variance (ddof 0) of the ``2N`` values ``f_A ∪ f_B``. Like SALib's
``sobol.analyze``, outputs are centred on the mean of *every* design row before the products
are taken (the Saltelli 2010 numerator is not shift-invariant), so the numbers equal SALib's on
the same rows to float64 rounding.

:class:`SobolAccumulator` keeps only float64 sums per output (4 + 3D of them, plus D + D(D-1)/2
with second order), shifted by a per-output constant taken from the first batch to limit
cancellation; the centring on the grand mean is applied exactly at :meth:`~SobolAccumulator.compute`.
Memory is O(outputs × D) whatever the number of base samples; two accumulators merge by
addition (after re-expressing one in the other's shift), so shards merged equal one pass.

Confidence intervals use the Poisson bootstrap (Hanley and MacGibbon 2006; Chamandy et al. 2012):
replicate ``r`` weights base sample ``n`` by ``w ~ Poisson(1)``, drawn from a counter-based hash of
``(seed, global index n, r)``. The same base sample gets the same weights in every shard, so the
replicate sums merge too, and no sample is stored. Point estimates are float64 throughout. The
replicate sums of a batch are formed in float32 about a median of the batch (one batched matmul of
weights and per-sample terms, spec D.1) and re-expressed about the accumulator's shift in float64,
so nothing cancels; half-widths agree across batchings and shardings to about 1e-6 relative. A
replicate whose variance all but vanishes (below 1e-8 of the point estimate's) is left out of the
half-width. ``S*_conf`` is ``z · std`` of the
replicates (the half-width of a normal interval at ``conf_level``, as SALib reports it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .base import Accumulator, MergeError

#: Poisson(1) cumulative distribution at k = 0..19 (the tail beyond 19 is below 1e-18)
_POISSON1_CDF = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(20)])
#: a bootstrap replicate whose variance is below this fraction of the point estimate's is degenerate
_DEGENERATE = 1e-8
#: elements of the per-sample term tensor processed at once in update (bounds temporary memory)
_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- the design
@dataclass(frozen=True)
class SaltelliDesign:
    """The two base matrices of a Saltelli design; unpacks as ``A, B = design``.

    Attributes:
        A: ``(n, d)`` float64 in [0, 1), the first ``d`` columns of a scrambled Sobol' sequence.
        B: ``(n, d)`` float64 in [0, 1), its last ``d`` columns.
        second_order: whether the design includes the ``BA_j`` rows (see :meth:`rows`).
    """

    A: torch.Tensor
    B: torch.Tensor
    second_order: bool = False

    def __iter__(self) -> Any:
        return iter((self.A, self.B))

    def rows(self, groups: list[list[int]] | None = None, start: int = 0,
             stop: int | None = None) -> torch.Tensor:
        """Design rows of base samples ``start:stop``, shape ``(n, R, d)``.

        Row order per base sample is SALib's: ``A, AB_1..AB_D, [BA_1..BA_D,] B`` with
        ``R = D + 2`` (``2D + 2`` with second order). ``groups`` lists the columns of each of the
        ``D`` groups (default: one group per column); ``AB_j`` takes group ``j``'s columns from B.
        """
        a, b = self.A[start:stop], self.B[start:stop]
        groups = _check_groups(groups, a.shape[1])
        mask = torch.zeros(len(groups), a.shape[1], dtype=torch.bool)
        for j, cols in enumerate(groups):
            mask[j, cols] = True
        ab = torch.where(mask[None], b[:, None], a[:, None])
        parts = [a[:, None], ab]
        if self.second_order:
            parts.append(torch.where(mask[None], a[:, None], b[:, None]))
        parts.append(b[:, None])
        return torch.cat(parts, dim=1)

    def salib_matrix(self, groups: list[list[int]] | None = None) -> np.ndarray:
        """All design rows as one ``(n·R, d)`` array, laid out as ``SALib.sample.sobol.sample``."""
        rows = self.rows(groups)
        return rows.reshape(-1, rows.shape[-1]).numpy()


def _check_groups(groups: list[list[int]] | None, d: int) -> list[list[int]]:
    if groups is None:
        return [[j] for j in range(d)]
    cols = sorted(c for g in groups for c in g)
    if cols != list(range(d)) or any(not g for g in groups):
        raise ValueError(f"groups must split the columns 0..{d - 1} into non-empty disjoint lists, "
                         f"got {groups}")
    return [list(g) for g in groups]


def saltelli_sample(d: int, n: int, seed: int = 0, second_order: bool = False) -> SaltelliDesign:
    """Base matrices A and B of a Saltelli design of ``n`` base samples over ``d`` inputs in [0, 1).

    The ``2d`` columns of a scrambled Sobol' sequence (``scipy.stats.qmc.Sobol``, seeded with
    ``seed``, no points skipped) are split into A (first ``d``) and B (last ``d``). Sobol' points
    keep their balance properties only for ``n`` a power of two: another ``n`` is rounded up to the
    next power of two, with a warning, since fewer points than asked would lose precision the user
    asked for.

    Args:
        d: number of input columns.
        n: number of base samples (a power of two).
        seed: seeds the scrambling; the same seed gives the same matrices bitwise.
        second_order: recorded in the design so that :meth:`SaltelliDesign.rows` adds the
            ``BA_j`` rows that second-order indices need.

    Returns:
        A :class:`SaltelliDesign`; ``A, B = saltelli_sample(d, n)`` unpacks it.

    Example:
        >>> A, B = saltelli_sample(3, 8, seed=1)
        >>> tuple(A.shape), bool(((A >= 0) & (A < 1)).all())
        ((8, 3), True)
    """
    from scipy.stats import qmc

    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    if n < 1:
        raise ValueError(f"n must be >= 1 base samples, got {n}")
    if n & (n - 1):
        rounded = 1 << (n - 1).bit_length()
        warnings.warn(f"n={n} is not a power of two, so Sobol' points lose their balance properties; "
                      f"using n={rounded} (ask for a power of two, e.g. {rounded // 2} or {rounded})",
                      UserWarning, stacklevel=2)
        n = rounded
    base = qmc.Sobol(d=2 * d, scramble=True, rng=np.random.default_rng(seed)).random(n)
    t = torch.from_numpy(base)
    return SaltelliDesign(t[:, :d].clone(), t[:, d:].clone(), second_order)


# --------------------------------------------------------------------------- bootstrap weights
def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014) on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def poisson_weights(index: torch.Tensor, replicates: int, seed: int) -> torch.Tensor:
    """Poisson(1) bootstrap weights ``(len(index), replicates)``, a pure function of (seed, index, r).

    Because the weight of a base sample depends only on its global index, shards drawn
    separately get the weights one pass would give, and their replicate sums merge exactly.
    """
    idx = index.detach().cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) + _splitmix64(idx))
        z = _splitmix64(key[:, None] + np.arange(replicates, dtype=np.uint64)[None, :])
    u = (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return torch.from_numpy(np.searchsorted(_POISSON1_CDF, u, side="right").astype(np.float64))


# --------------------------------------------------------------------------- the accumulator
@dataclass(frozen=True)
class SobolResult:
    """Sobol' indices of every output, float64; ``...`` is the output shape given to ``update``.

    Attributes:
        S1: ``(d, ...)`` first order (Saltelli 2010).
        ST: ``(d, ...)`` total order (Jansen 1999).
        S1_conf, ST_conf: ``(d, ...)`` bootstrap half-widths (NaN without bootstrap).
        S2: ``(d, d, ...)`` second order (Saltelli 2002) for ``j < k``, NaN elsewhere; None
            without second order.
        S2_conf: like ``S2``, bootstrap half-widths; None without second order.
        V: ``(...)`` output variance over the A and B rows (ddof 0).
        V1, VT: ``(d, ...)`` the first-order and total partial variances (``S1·V``, ``ST·V``):
            sum them over outputs before dividing to get aggregated indices (Gamboa et al. 2013).
        constant: ``(...)`` bool, outputs whose A and B values were all equal: their indices are
            NaN (undefined), not 0.
        n: number of base samples seen.
    """

    S1: torch.Tensor
    ST: torch.Tensor
    S1_conf: torch.Tensor
    ST_conf: torch.Tensor
    S2: torch.Tensor | None
    S2_conf: torch.Tensor | None
    V: torch.Tensor
    V1: torch.Tensor
    VT: torch.Tensor
    constant: torch.Tensor
    n: int


class SobolAccumulator(Accumulator):
    """Streaming, mergeable Sobol' first-, total- (and second-) order indices of many outputs.

    ``update(y_a, y_b, y_ab[, y_ba], index=...)`` takes the outputs of a batch of base samples:
    ``y_a`` and ``y_b`` of shape ``(b, ...)``, ``y_ab`` (and ``y_ba``) of shape ``(d, b, ...)``
    where ``y_ab[j]`` was evaluated at A with group ``j`` taken from B. ``index`` are the global
    indices of the base samples (default: a running count, right for one sequential stream; pass
    them when sharding, so the bootstrap weights match).

    Args:
        d: number of input groups.
        second_order: also accumulate what second-order indices need (``y_ba`` required).
        bootstrap: number of Poisson bootstrap replicates for the confidence intervals (0: none).
            Memory grows by this factor.
        seed: seeds the bootstrap weights.
        conf_level: confidence level of the reported half-widths.

    Example:
        >>> import torch
        >>> A, B = saltelli_sample(2, 256, seed=0)
        >>> f = lambda x: 3 * x[..., 0] + 0 * x[..., 1]
        >>> ab = torch.stack([torch.where(torch.arange(2) == j, B, A) for j in range(2)])
        >>> acc = SobolAccumulator(d=2)
        >>> acc.update(f(A), f(B), f(ab))
        >>> [round(v, 6) for v in acc.compute().ST.tolist()]
        [1.0, 0.0]
    """

    rules: ClassVar[dict[str, str]] = {"shift": "custom", "count": "custom", "sums": "custom",
                                       "minimum": "min", "maximum": "max", "shape": "equal"}

    def __init__(self, d: int, second_order: bool = False, bootstrap: int = 0, seed: int = 0,
                 conf_level: float = 0.95) -> None:
        super().__init__()
        if d < 1:
            raise ValueError(f"d must be >= 1 input groups, got {d}")
        if bootstrap < 0 or bootstrap == 1:
            raise ValueError(f"bootstrap={bootstrap}: use 0 (no intervals) or at least 2 replicates")
        if not 0 < conf_level < 1:
            raise ValueError(f"conf_level={conf_level} must lie in (0, 1)")
        self.d, self.second_order, self.bootstrap = d, bool(second_order), int(bootstrap)
        self.seed, self.conf_level = int(seed), float(conf_level)

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"d": self.d, "second_order": self.second_order, "bootstrap": self.bootstrap,
                "seed": self.seed, "conf_level": self.conf_level}

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The shape of one sample's outputs (``()`` for scalars), as given to the first update."""
        self._require_initialized()
        return tuple(self._states["shape"].tolist())

    @property
    def terms(self) -> int:
        """Number of float64 sums kept per output and replicate."""
        d = self.d
        return 4 + 3 * d + (d + d * (d - 1) // 2 if self.second_order else 0)

    # ------------------------------------------------------------------ streaming
    def update(self, y_a: torch.Tensor, y_b: torch.Tensor, y_ab: torch.Tensor,
               y_ba: torch.Tensor | None = None, index: torch.Tensor | None = None) -> None:
        """Fold the outputs of a batch of base samples in (see the class docstring for shapes)."""
        d = self.d
        if y_a.shape != y_b.shape or y_ab.shape != (d, *y_a.shape):
            raise ValueError(f"expected y_a, y_b of one shape (b, ...) and y_ab of shape (d={d}, b, ...); "
                             f"got {tuple(y_a.shape)}, {tuple(y_b.shape)}, {tuple(y_ab.shape)}")
        if self.second_order and (y_ba is None or y_ba.shape != y_ab.shape):
            raise ValueError("second_order=True needs y_ba of the shape of y_ab (outputs at B with "
                             "group j taken from A)")
        b = y_a.shape[0]
        if b == 0:
            return
        shape = tuple(y_a.shape[1:])
        a = y_a.reshape(b, -1).double()
        bb = y_b.reshape(b, -1).double()
        ab = y_ab.reshape(d, b, -1).double()
        ba = y_ba.reshape(d, b, -1).double() if self.second_order else None
        if not self.initialized:
            self._init_states(a, bb)
            self._states["shape"] = torch.tensor(shape, dtype=torch.int64, device=a.device)
        elif self._states["shift"].numel() != a.shape[1]:
            raise ValueError(f"outputs have {a.shape[1]} elements per sample, earlier batches had "
                             f"{self._states['shift'].numel()}")
        if index is None:
            start = int(self._states["count"][0].item())
            index = torch.arange(start, start + b)
        index = index.reshape(-1)
        if index.numel() != b:
            raise ValueError(f"index has {index.numel()} entries for {b} base samples")
        dev = self._states["sums"].device
        a, bb, ab = a.to(dev), bb.to(dev), ab.to(dev)
        ba = ba.to(dev) if ba is not None else None
        self._states["minimum"] = torch.minimum(self._states["minimum"],
                                                torch.minimum(a.amin(0), bb.amin(0)))
        self._states["maximum"] = torch.maximum(self._states["maximum"],
                                                torch.maximum(a.amax(0), bb.amax(0)))
        weights = poisson_weights(index, self.bootstrap, self.seed).to(dev) if self.bootstrap else None
        self._states["count"][0] += b
        if weights is not None:
            self._states["count"][1:] += weights.sum(0)
        shift = self._states["shift"]
        m = a.shape[1]
        step = max(1, _CHUNK_ELEMENTS // (b * self.terms))  # outputs per chunk
        for lo in range(0, m, step):
            sl = slice(lo, lo + step)
            parts = (a[:, sl] - shift[sl], bb[:, sl] - shift[sl], ab[:, :, sl] - shift[sl],
                     ba[:, :, sl] - shift[sl] if ba is not None else None)
            self._states["sums"][0, :, sl] += self._point_sums(*parts)
            if weights is not None:
                self._states["sums"][1:, :, sl] += self._replicate_sums(parts, weights)

    def _init_states(self, a: torch.Tensor, b: torch.Tensor) -> None:
        m, dev = a.shape[1], a.device  # the state lives where the outputs are (GPU or CPU)
        slots = 1 + self.bootstrap
        self._states = {
            "shift": torch.cat([a, b]).mean(0),
            "count": torch.zeros(slots, dtype=torch.float64, device=dev),
            "sums": torch.zeros(slots, self.terms, m, dtype=torch.float64, device=dev),
            "minimum": torch.full((m,), math.inf, dtype=torch.float64, device=dev),
            "maximum": torch.full((m,), -math.inf, dtype=torch.float64, device=dev),
        }

    def _replicate_sums(self, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
                        weights: torch.Tensor) -> torch.Tensor:
        """Poisson-weighted batch sums ``(R, K, M)`` of the per-sample terms, about the state's shift.

        The terms are taken about the median of (up to) the batch's first 64 A rows, so no sum
        cancels and a unit that is mostly at one value (a rarely active ReLU) is mostly exactly 0;
        they are formed in float32, weighted
        with one batched matmul, then re-expressed about the state's shift exactly in float64.
        """
        centre = parts[0][:64].median(0).values
        z = self._terms(*((t - centre).float() if t is not None else None for t in parts))  # (K, b, M)
        rep = torch.matmul(weights.T.float(), z).transpose(0, 1).double()  # (R, K, M)
        return _reshift(rep, weights.sum(0), -centre, self.d, self.second_order, inplace=True)

    def _point_sums(self, a: torch.Tensor, b: torch.Tensor, ab: torch.Tensor,
                    ba: torch.Tensor | None) -> torch.Tensor:
        """The batch totals ``(K, M)`` of the terms of :meth:`_terms`, in float64, by direct reductions."""
        d = self.d
        out = torch.empty(self.terms, a.shape[1], dtype=torch.float64, device=a.device)
        out[0], out[1] = a.sum(0), b.sum(0)
        out[2] = (a * a).sum(0) + (b * b).sum(0)
        out[3] = (a * b).sum(0)
        diff = ab - a
        out[4:4 + d] = torch.linalg.vecdot(diff, b.expand_as(diff), dim=1)
        out[4 + d:4 + 2 * d] = (diff * diff).sum(1)
        out[4 + 2 * d:4 + 3 * d] = diff.sum(1)
        if ba is not None:
            out[4 + 3 * d:4 + 4 * d] = (ba - b).sum(1)
            j, k = torch.triu_indices(d, d, offset=1)
            out[4 + 4 * d:] = (ba[j] * ab[k]).sum(1)
        return out

    def _terms(self, a: torch.Tensor, b: torch.Tensor, ab: torch.Tensor,
               ba: torch.Tensor | None) -> torch.Tensor:
        """Per-sample terms ``(K, b, M)``: a, b, a²+b², ab, b(a_j-a), (a-a_j)², a_j-a[, b_j-b, b_j a_k]."""
        d = self.d
        z = torch.empty(self.terms, *a.shape, dtype=a.dtype, device=a.device)
        z[0], z[1] = a, b
        torch.mul(a, a, out=z[2]).addcmul_(b, b)
        torch.mul(a, b, out=z[3])
        diff = torch.sub(ab, a, out=z[4 + 2 * d:4 + 3 * d])
        torch.mul(b, diff, out=z[4:4 + d])
        torch.mul(diff, diff, out=z[4 + d:4 + 2 * d])
        if ba is not None:
            torch.sub(ba, b, out=z[4 + 3 * d:4 + 4 * d])
            j, k = torch.triu_indices(d, d, offset=1)
            torch.mul(ba[j], ab[k], out=z[4 + 4 * d:])
        return z

    # ------------------------------------------------------------------ merging
    def _merge_states(self, theirs: dict[str, torch.Tensor]) -> None:
        shift = self._states["shift"]
        if shift.shape != theirs["shift"].shape:
            raise MergeError(f"SobolAccumulator: {shift.numel()} outputs vs {theirs['shift'].numel()}")
        other = _reshift(theirs["sums"], theirs["count"], shift - theirs["shift"], self.d,
                         self.second_order)
        self._states["sums"] = self._states["sums"] + other
        self._states["count"] = self._states["count"] + theirs["count"]

    # ------------------------------------------------------------------ results
    def compute(self, aggregate: int = 0) -> SobolResult:
        """Indices of every output (see :class:`SobolResult`); the state is left unchanged.

        Args:
            aggregate: sum the partial variances and the variance over the last ``aggregate``
                output dimensions before dividing: the aggregated index of Gamboa et al. (2013),
                the variance-weighted mean of the elements' indices. With outputs ``(C, H, W)``,
                ``aggregate=2`` gives one index per channel over its map and ``aggregate=3`` one
                for the whole layer. Constant elements add nothing; a group of constants is NaN.
        """
        self._require_initialized()
        st = self._states
        shape = self.output_shape
        if not 0 <= aggregate <= len(shape):
            raise ValueError(f"aggregate={aggregate}: the outputs have {len(shape)} dimensions {shape}")
        est = _estimate(st["sums"], st["count"], self.d, self.second_order)
        constant = st["maximum"] == st["minimum"]
        est["V"] = torch.where(constant, 0.0, est["V"])
        for key in ("V1", "VT", "V2"):
            if key in est:
                est[key] = torch.where(constant, 0.0 if aggregate else math.nan, est[key])
        if aggregate:
            split = len(shape) - aggregate
            size = math.prod(shape[split:])
            shape = shape[:split]
            est = {k: v.reshape(*v.shape[:-1], -1, size).sum(-1) for k, v in est.items()}
            constant = est["V"][0] == 0
        # a replicate whose variance all but vanished (it drew none of a rare unit's changes) has
        # no defined index: it is left out of the half-width rather than blowing it up
        floor = _DEGENERATE * est["V"][:1]
        safe = torch.where((est["V"] > floor) & (est["V"] > 0), est["V"], math.nan)[:, None]
        ratios = {"S1": est["V1"] / safe, "ST": est["VT"] / safe}
        if self.second_order:
            ratios["S2"] = est["V2"] / safe
        z = _normal_quantile(0.5 + self.conf_level / 2)

        def conf(key: str) -> torch.Tensor:
            if not self.bootstrap:
                return torch.full_like(ratios[key][0], math.nan)
            return z * _nanstd(ratios[key][1:])

        def point(t: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
            return t.reshape((*lead, *shape))

        d = self.d
        s2 = s2c = None
        if self.second_order:
            s2 = point(_square(ratios["S2"][0], d), (d, d))
            s2c = point(_square(conf("S2"), d), (d, d))
        return SobolResult(
            S1=point(ratios["S1"][0], (d,)), ST=point(ratios["ST"][0], (d,)),
            S1_conf=point(conf("S1"), (d,)), ST_conf=point(conf("ST"), (d,)), S2=s2, S2_conf=s2c,
            V=point(est["V"][0], ()), V1=point(est["V1"][0], (d,)), VT=point(est["VT"][0], (d,)),
            constant=point(constant, ()), n=int(st["count"][0].item()))


def _nanstd(t: torch.Tensor) -> torch.Tensor:
    """Standard deviation (ddof 1) over dim 0, ignoring NaN; NaN where fewer than 2 values are finite."""
    ok = ~torch.isnan(t)
    n = ok.sum(0)
    mean = torch.where(ok, t, 0).sum(0) / n.clamp(min=1)
    var = torch.where(ok, (t - mean) ** 2, 0).sum(0) / (n - 1).clamp(min=1)
    return torch.where(n >= 2, var.sqrt(), math.nan)


def _square(pairs: torch.Tensor, d: int) -> torch.Tensor:
    out = torch.full((d, d, pairs.shape[-1]), math.nan, dtype=pairs.dtype, device=pairs.device)
    j, k = torch.triu_indices(d, d, offset=1)
    out[j, k] = pairs
    return out


def _normal_quantile(p: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(p))


def _split(sums: torch.Tensor, d: int, second_order: bool) -> dict[str, torch.Tensor]:
    """Name the term rows of ``sums (S, K, M)``."""
    out = {"a": sums[:, 0], "b": sums[:, 1], "q": sums[:, 2], "p": sums[:, 3],
           "U": sums[:, 4:4 + d], "T": sums[:, 4 + d:4 + 2 * d], "D": sums[:, 4 + 2 * d:4 + 3 * d]}
    if second_order:
        out["E"] = sums[:, 4 + 3 * d:4 + 4 * d]
        out["W"] = sums[:, 4 + 4 * d:]
    return out


def _estimate(sums: torch.Tensor, count: torch.Tensor, d: int,
              second_order: bool) -> dict[str, torch.Tensor]:
    """Variance and partial variances of every slot (point estimate, replicates) from the sums."""
    s = _split(sums, d, second_order)
    n = count[:, None]
    rows = d + 2 + (d if second_order else 0)
    total = s["a"] + s["b"] + (s["D"] + s["a"][:, None]).sum(1)
    if second_order:
        total = total + (s["E"] + s["b"][:, None]).sum(1)
    g = total / (n * rows)  # grand mean of every row, in shifted units
    mu = (s["a"] + s["b"]) / (2 * n)
    var = s["q"] / (2 * n) - mu * mu
    v1 = (s["U"] - g[:, None] * s["D"]) / n[:, :, None]
    vt = s["T"] / (2 * n[:, :, None])
    out = {"V": var, "V1": v1, "VT": vt}
    if second_order:
        j, k = torch.triu_indices(d, d, offset=1)
        vjk = (s["W"] - s["p"][:, None] - g[:, None] * (s["E"][:, j] + s["D"][:, k])) / n[:, :, None]
        out["V2"] = vjk - v1[:, j] - v1[:, k]
    return out


def _reshift(sums: torch.Tensor, count: torch.Tensor, delta: torch.Tensor, d: int,
             second_order: bool, inplace: bool = False) -> torch.Tensor:
    """Re-express sums taken about shift ``c`` as sums about ``c + delta`` (exact algebra).

    Only the sums of non-differences change (a, b, a²+b², ab, U, W); with ``inplace`` the given
    tensor is updated (the originals each update needs are read before they change).
    """
    out = sums if inplace else sums.clone()
    o = _split(out, d, second_order)
    n = count[:, None]
    total = o["a"] + o["b"]
    if second_order:
        j, k = torch.triu_indices(d, d, offset=1)
        sum_bj = o["E"] + o["b"][:, None]
        sum_ak = o["D"] + o["a"][:, None]
        o["W"].sub_(delta * (sum_bj[:, j] + sum_ak[:, k]) - n[:, :, None] * delta * delta)
    nd = n * delta
    o["q"].sub_(2 * delta * total - 2 * nd * delta)
    o["p"].sub_(delta * total - nd * delta)
    o["U"].sub_(delta * o["D"])
    o["a"].sub_(nd)
    o["b"].sub_(nd)
    return out


def sobol_indices(y_a: torch.Tensor, y_b: torch.Tensor, y_ab: torch.Tensor,
                  y_ba: torch.Tensor | None = None, bootstrap: int = 0, seed: int = 0,
                  conf_level: float = 0.95) -> SobolResult:
    """Sobol' indices of every output from whole output arrays (one :class:`SobolAccumulator` pass).

    Args:
        y_a, y_b: outputs at A and at B, shape ``(n, ...)``.
        y_ab: ``(d, n, ...)``; ``y_ab[j]`` evaluated at A with group ``j`` taken from B.
        y_ba: ``(d, n, ...)`` at B with group ``j`` taken from A; gives second-order indices.
        bootstrap: Poisson bootstrap replicates for the confidence half-widths (0: none).
        seed: seeds the bootstrap weights.
        conf_level: confidence level of the half-widths.

    Returns:
        A :class:`SobolResult`: ``S1`` and ``ST`` of shape ``(d, ...)`` in float64, NaN (and
        ``constant`` True) for outputs that never varied.

    Example:
        >>> import torch
        >>> A, B = saltelli_sample(2, 1024, seed=0)
        >>> f = lambda x: x[..., 0] * x[..., 1]
        >>> ab = torch.stack([torch.where(torch.arange(2) == j, B, A) for j in range(2)])
        >>> r = sobol_indices(f(A), f(B), f(ab))
        >>> [round(v, 1) for v in r.S1.tolist()]
        [0.4, 0.4]
    """
    acc = SobolAccumulator(d=y_ab.shape[0], second_order=y_ba is not None, bootstrap=bootstrap, seed=seed,
                           conf_level=conf_level)
    acc.update(y_a, y_b, y_ab, y_ba)
    return acc.compute()
