"""Surprise coverage: LSC, DSC and MDSC (Kim, Feldt and Yoo 2019; spec coverage.md §2.8).

An input's *activation trace* (AT) is its units of every given layer, concatenated in layer
order, keeping the units whose training variance is at least ``min_var`` (in every class, or
overall). A surprise adequacy (SA) value says how unlike the training traces of its class a test
trace is; coverage is the set of SA buckets hit.

* LSA(x) = −log p̂_c(AT(x)), p̂_c a Gaussian KDE of class c's training traces;
* DSA(x) = dist_a / dist_b, dist_a the distance to the nearest training trace x_a of class c,
  dist_b the distance from x_a (``reference="train"``, original) or from x (``"test"``, anchor) to
  the nearest training trace of another class;
* MDSA(x) = sqrt((AT(x) − μ_c)ᵀ Σ_c⁻¹ (AT(x) − μ_c)).

Buckets (``buckets="fixed"``, recommended): n buckets of equal width over fixed bounds [L, U);
a value in bucket ``floor((sa − L) · n / (U − L))`` covers it, values below L or at/above U are
counted in ``underflow`` / ``overflow``; SC = distinct buckets / n, monotone and order-free.
``buckets="anchor"`` counts the distinct ``trunc(sa / width)`` without bound (NeuraL-Coverage).
NaN or infinite SA values (a class without training traces, dist_b = 0) are dropped and counted
in ``dropped``.

Memory: LSC and DSC store their training traces (float32, at most ``max_train`` rows, an error
beyond); MDSC keeps only per-class count, mean and covariance (float64, O(classes · d²)),
streamed with the Chan et al. update, so its ``fit`` takes any amount of data.

Example:
    >>> import torch
    >>> from unitscope.coverage.surprise import DSC
    >>> dsc = DSC(bounds=(0.0, 1.0), n_buckets=10, min_var=0.0, var_scope="global")
    >>> dsc = dsc.fit(torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 0, 1]))
    >>> dsc.update(torch.tensor([[0.2, 0.0], [2.0, 0.0]]), torch.tensor([0, 0]))
    0.2
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..stats.moments import chan_combine
from .base import Criterion, union_ids

__all__ = ["DSC", "LSC", "MDSC"]

log = logging.getLogger(__name__)

#: rows per distance block
CHUNK = 2048

#: distances always by the matrix-product expansion, in float64: one method whatever the batch size
#: (torch.cdist's default switches method at 25 rows), so results do not depend on the batching
MM = "use_mm_for_euclid_dist"


class _Surprise(Criterion):
    """Shared machinery: traces, the variance mask, buckets, per-class dispatch."""

    needs_fit = True
    needs_classes = True
    default_bounds: tuple[float, float] | None = (0.0, 1.0)
    default_width: float = 1.0

    def __init__(self, bounds: tuple[float, float] | list[float] | None = None, n_buckets: int = 1000,
                 buckets: str = "fixed", width: float | None = None, min_var: float = 1e-5,
                 var_scope: str = "class", few_samples: str = "skip") -> None:
        super().__init__()
        name = type(self).__name__
        bounds = bounds if bounds is not None else self.default_bounds
        if bounds is not None:
            lo, hi = bounds
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"{name}(bounds={bounds}): need finite lower < upper")
            bounds = (float(lo), float(hi))
        if int(n_buckets) < 1:
            raise ValueError(f"{name}(n_buckets={n_buckets}): need at least one bucket")
        if buckets not in ("fixed", "anchor"):
            raise ValueError(f"{name}(buckets={buckets!r}): use 'fixed' (recommended) or 'anchor'")
        width = self.default_width if width is None else float(width)
        if not width > 0:
            raise ValueError(f"{name}(width={width}): the anchor bucket width must be > 0")
        if var_scope not in ("class", "global"):
            raise ValueError(f"{name}(var_scope={var_scope!r}): use 'class' (SADL) or 'global'")
        if few_samples not in ("skip", "error"):
            raise ValueError(f"{name}(few_samples={few_samples!r}): use 'skip' or 'error'")
        self.few_samples = few_samples
        self.bounds = bounds
        self.n_buckets, self.buckets, self.width = int(n_buckets), buckets, width
        self.min_var, self.var_scope = float(min_var), var_scope
        self.kind = "count" if buckets == "anchor" else "fraction"  # type: ignore[misc]

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"bounds": None if self.bounds is None else list(self.bounds), "n_buckets": self.n_buckets,
                "buckets": self.buckets, "width": self.width, "min_var": self.min_var,
                "var_scope": self.var_scope, "few_samples": self.few_samples}

    def _has_layer_values(self) -> bool:
        return False

    def _layer_values(self) -> dict[str, float]:
        return {}

    def _trace(self, layers: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([layers[k] for k in self._layers], dim=1)

    # ------------------------------------------------------------------ variance mask
    def _class_variances(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-class population variances (C, d), global variance (d,)), float64."""
        raise NotImplementedError

    def mask(self) -> torch.Tensor:
        """The units of the trace kept by the variance filter (boolean, length d)."""
        if "mask" in self._sh:
            return self._sh["mask"]
        if "mask" not in self._cache:
            self._check_memory()
            self.usable_classes()
            per_class, overall = self._class_variances()
            if self.var_scope == "class":
                keep = (per_class >= self.min_var).all(0)
            else:
                keep = overall >= self.min_var
            if not bool(keep.any()):
                hint = ("fit on more varied training inputs or lower min_var" if self.var_scope != "class"
                        else "fit on more training inputs per class, lower min_var or use var_scope='global'")
                raise ValueError(f"{type(self).__name__}: every unit has a training variance below "
                                 f"min_var={self.min_var} (var_scope={self.var_scope!r}); {hint}")
            self._cache["mask"] = keep
        return self._cache["mask"]

    # ------------------------------------------------------------------ test phase
    def _start(self) -> None:
        self._sh["mask"] = self.mask()
        self._prepare_model()
        dev = self._sh["mask"].device
        bounds = self.bounds if self.bounds is not None else self._auto_bounds()
        self._sh["bounds"] = torch.tensor(bounds, dtype=torch.float64, device=dev)
        self._sh["ids"] = torch.zeros(0, dtype=torch.long, device=dev)
        for name in ("underflow", "overflow", "dropped"):
            self._sh[name] = torch.zeros((), dtype=torch.long, device=dev)

    def surprise(self, acts: Any, classes: torch.Tensor | None = None) -> torch.Tensor:
        """The surprise adequacy of every input, float64 ``(n,)``; the state is left unchanged.

        Args:
            acts: the test activations (same layers and units as ``fit``).
            classes: the class of every input (predicted, by default in
                :class:`unitscope.analyses.coverage.Coverage`); default all 0.
        """
        if not self.initialized:
            raise ValueError(f"{type(self).__name__}.surprise() needs fit(train_acts, classes) first")
        layers = self._check(acts, "surprise")
        if not layers:
            return torch.zeros(0, dtype=torch.float64)
        cls = self._classes(classes, layers, "surprise")
        assert cls is not None
        return self._surprise(self._trace(layers), cls)

    def _surprise(self, at: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        self._prepare_model()
        return self._batch_surprise(at[:, self.mask().to(at.device)], classes)

    def _batch_surprise(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """SA of masked traces ``x`` (float64, on ``x``'s device); NaN for a class without a model.

        The usable classes are stacked in parts of classes with similar numbers of training traces
        (within 2x, see :func:`_size_parts`): one part when the classes are balanced. The inputs of
        a part are grouped by class into a zero-padded ``(classes, m, d)`` block (m the most inputs
        of one class) and :meth:`_grouped_surprise` evaluates all the part's class models with
        batched torch operations, so a batch costs the same number of operations whatever the
        number of classes (with small batches, per-operation overhead, not arithmetic,
        dominates). Padding the training side to the largest class of a part costs at most 2x the
        class-by-class arithmetic; the test side costs up to ``classes``x for a batch of one class.
        Rows are processed in blocks so the padded intermediates stay near 32 MB.
        """
        self._prepare_model()
        device = x.device
        known = self._cache["known"]  # the usable classes, sorted
        part_of, local = self._cache["part_of"], self._cache["local"]
        out = torch.full((x.shape[0],), math.nan, dtype=torch.float64, device=known.device)
        x, classes = x.to(known.device, torch.float64), classes.to(known.device, torch.long)
        k = torch.searchsorted(known, classes).clamp_(max=len(known) - 1)
        usable = known[k] == classes
        for p, (members, model) in enumerate(self._cache["parts"]):
            rows = torch.nonzero(usable & (part_of[k] == p)).squeeze(1)
            step = _rows_per_block(len(members) * self._group_width(model))
            for start in range(0, len(rows), step):
                block = rows[start:start + step]
                slot = local[k[block]]
                grouped, pos = _group(x[block], slot, len(members))
                out[block] = self._grouped_surprise(grouped, model)[slot, pos]
        return out.to(device)

    def _set_parts(self, known: list[int], sizes: list[int], build: Any) -> None:
        """Cache the class models: ``build(indices)`` stacks the models of those classes of ``known``.

        Classes are put in parts by their number of training traces (``sizes``), so a part's
        padding is at most 2x; ``part_of`` and ``local`` map a class's index in ``known`` to its
        part and its place there.
        """
        parts, part_of, local = [], [0] * len(known), [0] * len(known)
        for p, members in enumerate(_size_parts(sizes)):
            for j, i in enumerate(members):
                part_of[i], local[i] = p, j
            parts.append((members, build(members)))
        device = parts[0][1][0].device
        self._cache.update(known=torch.tensor(known, device=device), parts=parts,
                           part_of=torch.tensor(part_of, device=device),
                           local=torch.tensor(local, device=device))

    def _update_layers(self, layers: dict[str, torch.Tensor], classes: torch.Tensor | None) -> None:
        assert classes is not None
        sa = self._surprise(self._trace(layers), classes)
        dev = self._sh["ids"].device
        sa = sa.to(dev)
        finite = torch.isfinite(sa)
        self._sh["dropped"] += int((~finite).sum())
        sa = sa[finite]
        if self.buckets == "anchor":
            ids = torch.trunc(sa / self.width).long()
        else:
            pos = _bucket_position(sa, *self._sh["bounds"].tolist(), self.n_buckets)
            self._sh["underflow"] += int((pos < 0).sum())
            self._sh["overflow"] += int((pos >= self.n_buckets).sum())
            ids = torch.floor(pos[(pos >= 0) & (pos < self.n_buckets)]).long()
        self._sh["ids"] = union_ids(self._sh["ids"], ids)

    def _merge_covered(self, other: Criterion) -> None:
        self._sh["ids"] = union_ids(self._sh["ids"], other._sh["ids"])
        for name in ("underflow", "overflow", "dropped"):
            self._sh[name] = self._sh[name] + other._sh[name]

    def _value(self) -> float:
        hit = int(self._sh["ids"].numel())
        return float(hit) if self.buckets == "anchor" else hit / self.n_buckets

    def diagnostics(self) -> dict[str, float]:
        """``units`` kept by the mask, ``ridged`` classes, ``underflow``/``overflow``/``dropped`` inputs."""
        if "ids" not in self._sh:
            return {}
        out = {name: float(self._sh[name]) for name in ("underflow", "overflow", "dropped")}
        out["units"] = float(self._sh["mask"].sum())
        self._prepare_model()
        out["ridged"] = float(len(self._cache.get("ridged", ())))
        out["skipped_classes"] = float(len(self._cache["skipped"]))
        return out

    def usable_classes(self) -> list[int]:
        """The classes with enough training traces for the estimator (the others are skipped).

        With ``few_samples="skip"`` (default) a class with fewer training inputs than the
        estimator needs is left out, with a warning: its test inputs have no SA and count as
        ``dropped``, and ``diagnostics()["skipped_classes"]`` says how many classes were left out.
        ``few_samples="error"`` raises instead.
        """
        if "usable" not in self._cache:
            counts, least = self._class_counts(), self._min_class_size()
            small = {c: n for c, n in counts.items() if n < least}
            name = type(self).__name__
            if small and self.few_samples == "error":
                raise ValueError(f"{name}: classes {small} (class: training inputs) have fewer than "
                                 f"{least}, which {self._estimator} needs; fit on more data or pass "
                                 "few_samples='skip'")
            usable = sorted(set(counts) - set(small))
            if not usable:
                raise ValueError(f"{name}: no class has {least} training inputs, which {self._estimator} "
                                 "needs; fit on more data")
            if small:
                log.warning("%s: classes %s have fewer than %d training inputs and are skipped; their test "
                            "inputs are counted as dropped", name, sorted(small), least)
            self._cache["usable"], self._cache["skipped"] = set(usable), sorted(small)
        return sorted(self._cache["usable"])

    def _factor(self, cov: torch.Tensor, c: int) -> torch.Tensor | None:
        """Cholesky factor of ``cov``; with the ridge added (and recorded) when it is singular."""
        factor = _cholesky(cov)
        ridge = getattr(self, "ridge", 0.0)
        if factor is None and ridge:
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            factor = _cholesky(cov + ridge * cov.diagonal().mean() * eye)
            if factor is not None:
                self._cache.setdefault("ridged", set()).add(c)
                log.info("%s: the covariance of class %d is singular; added the ridge %g · mean(diag) · I",
                         type(self).__name__, c, ridge)
        return factor

    # ------------------------------------------------------------------ to implement
    def _auto_bounds(self) -> tuple[float, float]:
        raise NotImplementedError(f"{type(self).__name__} needs explicit bounds=(lower, upper)")

    #: what the per-class minimum is for, in error messages
    _estimator = "the per-class variance filter (or pass var_scope='global')"

    def _check_memory(self) -> None:
        """Raise a clear error before allocating per-class matrices that cannot fit."""

    def _class_counts(self) -> dict[int, int]:
        """Training inputs per class (classes with at least one)."""
        raise NotImplementedError

    def _fitted_classes(self) -> int:
        return len(self._class_counts())

    def _min_class_size(self) -> int:
        return 2 if self.var_scope == "class" else 1  # a per-class variance needs two inputs

    def _prepare_model(self) -> None:
        """Build the per-class models, stacked in the order of ``self._cache["known"]``."""
        raise NotImplementedError

    def _group_width(self, model: tuple[torch.Tensor, ...]) -> int:
        """Entries per input and class in the largest intermediate of :meth:`_grouped_surprise`."""
        raise NotImplementedError

    def _grouped_surprise(self, x: torch.Tensor, model: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """SA ``(classes, m)`` of traces grouped by class, ``(classes, m, d)`` float64, for one part.

        ``model`` holds the part's stacked class models; padding rows hold zeros and their values
        are discarded.
        """
        raise NotImplementedError


class _StoredTraces(_Surprise):
    """Surprise criteria that keep the training traces themselves (LSC, DSC)."""

    profile_fields = ("train", "train_classes")

    def __init__(self, *args: Any, max_train: int = 20000, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if int(max_train) < 1:
            raise ValueError(f"{type(self).__name__}(max_train={max_train}): must be >= 1")
        self.max_train = int(max_train)

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {**super().config(), "max_train": self.max_train}

    def _fit_layers(self, layers: dict[str, torch.Tensor], classes: torch.Tensor | None) -> None:
        assert classes is not None
        at = self._trace(layers).float()
        ok = torch.isfinite(at).all(1)  # NaN or inf rows stay out of the profile
        at, classes = at[ok], classes[ok]
        train = self._sh.get("train")
        total = at.shape[0] + (0 if train is None else train.shape[0])
        if total > self.max_train:
            raise ValueError(f"{type(self).__name__} keeps its training traces and would hold {total} rows, "
                             f"more than max_train={self.max_train}; fit on a subsample or raise max_train "
                             "(memory grows as rows × units × 4 bytes)")
        if train is None:
            self._sh["train"], self._sh["train_classes"] = at, classes
        else:
            self._sh["train"] = torch.cat([train, at.to(train.device)])
            self._sh["train_classes"] = torch.cat([self._sh["train_classes"], classes.to(train.device)])

    def _merge_profile(self, other: Criterion) -> None:
        self._sh["train"] = torch.cat([self._sh["train"], other._sh["train"]])
        self._sh["train_classes"] = torch.cat([self._sh["train_classes"], other._sh["train_classes"]])
        if self._sh["train"].shape[0] > self.max_train:
            raise ValueError(f"{type(self).__name__}: the merged profile holds {self._sh['train'].shape[0]} "
                             f"training rows, more than max_train={self.max_train}")

    def _class_variances(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, cls = self._sh["train"].double(), self._sh["train_classes"]
        usable = self.usable_classes()
        x = x[torch.isin(cls, torch.tensor(usable, device=cls.device))]
        per_class = torch.stack([self._sh["train"][cls == c].double().var(0, unbiased=False) for c in usable])
        return per_class, x.var(0, unbiased=False)

    def _class_counts(self) -> dict[int, int]:
        classes, counts = torch.unique(self._sh["train_classes"], return_counts=True)
        return dict(zip(classes.tolist(), counts.tolist()))

    def _class_data(self) -> dict[int, torch.Tensor]:
        x = self._sh["train"][:, self.mask()].double()
        cls = self._sh["train_classes"]
        return {c: x[cls == c] for c in self.usable_classes()}


class LSC(_StoredTraces):
    """Likelihood-based surprise coverage: buckets of LSA = −log p̂_c(AT(x)).

    p̂_c is a Gaussian kernel density estimate over class c's training traces, evaluated exactly
    (log-sum-exp over all stored traces, in float64, chunked).

    Args:
        bandwidth: ``"scott"`` (default; scipy ``gaussian_kde`` as in SADL and DeepImportance: the
            kernel covariance is the class's sample covariance × n_c^(−2/(d+4))) or a float h for an
            isotropic kernel h²·I (the anchor uses sklearn ``KernelDensity`` with h = 0.2).
        ridge: when a class's kernel covariance is singular to working precision (about as many
            units as training inputs of the class), ``ridge · mean(diag) · I`` is added to it
            (default 1e-6; the classes it was added to are counted in ``diagnostics()["ridged"]``
            and logged). A non-singular covariance is used as is, so values equal scipy's.
            ``ridge=0`` raises an error for a singular covariance instead.
        bounds: [L, U) of the fixed buckets. Default: U = 2000 as in SADL, and L = the smallest LSA
            of the training traces (rounded down), fixed when the first test input arrives. SADL
            takes L from the target set instead, which makes coverage non-monotone; LSA is a log
            density, so its scale shifts with the number of units and can be negative.
        n_buckets: 1000 (SADL).
        buckets, width: ``"anchor"`` counts distinct ``trunc(LSA / width)``, width 10 as in SEED.
        min_var, var_scope: the variance filter (1e-5, per class as in SADL).
        max_train: the most training traces kept (20000).
    """

    key = "lsc"
    default_bounds = None
    default_width = 10.0
    #: the upper bound of the default buckets (SADL's U)
    upper = 2000.0

    def __init__(self, bandwidth: str | float = "scott", ridge: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not (bandwidth == "scott" or (isinstance(bandwidth, (int, float)) and bandwidth > 0)):
            raise ValueError(f"LSC(bandwidth={bandwidth!r}): use 'scott' or a positive float")
        if not ridge >= 0:
            raise ValueError(f"LSC(ridge={ridge}): must be >= 0")
        self.bandwidth: str | float = bandwidth if bandwidth == "scott" else float(bandwidth)
        self.ridge = float(ridge)

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {**super().config(), "bandwidth": self.bandwidth, "ridge": self.ridge}

    @property
    def _estimator(self) -> str:  # type: ignore[override]
        if self.bandwidth == "scott":  # Scott's factor needs a class covariance, whatever the filter
            return "a KDE with Scott's bandwidth (or pass bandwidth=<float> and var_scope='global')"
        return _Surprise._estimator

    def _check_memory(self) -> None:
        classes = torch.unique(self._sh["train_classes"]).numel()
        _check_matrix_memory("LSC", classes, self._sh["train"].shape[1])

    def _min_class_size(self) -> int:
        return 2 if self.bandwidth == "scott" else super()._min_class_size()

    def _prepare_model(self) -> None:
        """The class KDEs: Cholesky factors, Σ⁻¹xᵢ and xᵢᵀΣ⁻¹xᵢ, stacked by part.

        Within a part the training columns are padded to its largest class: the padding columns
        of ``proj`` are 0 and their norms +inf, so they add exp(−inf) = 0 to the density.
        """
        if "parts" in self._cache:
            return
        data = self._class_data()
        kdes = []
        for c, x in data.items():
            n, d = x.shape
            if self.bandwidth == "scott":
                cov = torch.atleast_2d(torch.cov(x.T)) * n ** (-2.0 / (d + 4))
            else:
                cov = torch.eye(d, dtype=x.dtype, device=x.device) * float(self.bandwidth) ** 2
            chol = self._factor(cov, c)
            if chol is None:
                raise ValueError(f"LSC: the kernel covariance of class {c} is singular ({n} training inputs, "
                                 f"{d} units); fit on more inputs, use fewer layers, pass ridge=1e-6 or an "
                                 "isotropic bandwidth=<float>")
            z = torch.linalg.solve_triangular(chol, x.T, upper=False)  # whitened traces, (d, n)
            proj = torch.linalg.solve_triangular(chol.T, z, upper=True)  # Σ⁻¹ xᵢ, (d, n)
            log_norm = -math.log(n) - 0.5 * d * math.log(2 * math.pi) - float(chol.diagonal().log().sum())
            kdes.append((chol, proj, z.square().sum(0), log_norm))

        def build(members: list[int]) -> tuple[torch.Tensor, ...]:
            chol0 = kdes[members[0]][0]
            d, most = chol0.shape[0], max(kdes[i][1].shape[1] for i in members)
            f64 = {"dtype": torch.float64, "device": chol0.device}
            chols = torch.stack([kdes[i][0] for i in members])
            proj = torch.zeros(len(members), d, most, **f64)
            norms = torch.full((len(members), most), math.inf, **f64)
            for j, i in enumerate(members):
                n = kdes[i][1].shape[1]
                proj[j, :, :n], norms[j, :n] = kdes[i][1], kdes[i][2]
            log_norm = torch.tensor([kdes[i][3] for i in members], **f64)
            return chols, proj, norms, log_norm

        self._set_parts(sorted(data), [len(x) for x in data.values()], build)

    def _group_width(self, model: tuple[torch.Tensor, ...]) -> int:
        return max(model[1].shape[1:])

    def _auto_bounds(self) -> tuple[float, float]:
        x = self._sh["train"][:, self.mask()]
        sa = self._batch_surprise(x, self._sh["train_classes"])
        lower = math.floor(float(sa[torch.isfinite(sa)].min()))  # skipped classes have no LSA
        if not lower < self.upper:
            raise ValueError(f"LSC: the training traces have LSA >= {self.upper}; pass bounds=(lower, upper)")
        return float(lower), self.upper

    def _grouped_surprise(self, x: torch.Tensor, model: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """LSA from ‖L⁻¹(x − xᵢ)‖² = xᵀΣ⁻¹x + xᵢᵀΣ⁻¹xᵢ − 2 xᵀΣ⁻¹xᵢ, every class of a part at once.

        The training terms Σ⁻¹xᵢ and xᵢᵀΣ⁻¹xᵢ are precomputed, so a batch costs one batched
        triangular solve and one batched matrix product against each class's training traces
        (float64).
        """
        chol, proj, norms, log_norm = model
        quad = torch.linalg.solve_triangular(chol, x.mT, upper=False).square().sum(1)  # (classes, m)
        d2 = (quad[:, :, None] + norms[:, None, :] - 2 * (x @ proj)).clamp_(min=0)
        return -(torch.logsumexp(-0.5 * d2, dim=2) + log_norm[:, None])


class DSC(_StoredTraces):
    """Distance-based surprise coverage: buckets of DSA = dist_a / dist_b.

    Args:
        reference: where dist_b is measured from: ``"train"`` (default, SADL/DeepImportance: from the
            nearest same-class training trace x_a; precomputed once for every training trace) or
            ``"test"`` (the anchor: from the test trace itself).
        bounds: [L, U) of the fixed buckets, default (0, 2): DSA is 0 on a training trace and
            rarely above 2 (dist_a beyond twice the distance to another class).
        n_buckets: 1000 (SADL).
        buckets, width: ``"anchor"`` counts distinct ``trunc(DSA / width)``, width 0.1 as in SEED.
        min_var, var_scope, max_train: as in :class:`LSC`.

    Needs training traces of at least two classes.
    """

    key = "dsc"
    default_bounds = (0.0, 2.0)
    default_width = 0.1

    def __init__(self, reference: str = "train", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if reference not in ("train", "test"):
            raise ValueError(f"DSC(reference={reference!r}): use 'train' (original) or 'test' (anchor)")
        self.reference = reference

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {**super().config(), "reference": self.reference}

    def _prepare_model(self) -> None:
        if "dist_b" in self._cache:
            return
        data = self._class_data()
        if len(data) < 2:
            raise ValueError(f"DSC needs training traces of at least two classes, got classes "
                             f"{sorted(data)}; pass the classes to fit() (in Coverage: the model predicted "
                             "fewer than two classes on the training data; train it, or use "
                             "class_source='label')")
        x = torch.cat(list(data.values()))
        cls = torch.cat([torch.full((len(v),), c, dtype=torch.long, device=x.device)
                         for c, v in data.items()])
        dist_b = torch.empty(len(x), dtype=x.dtype, device=x.device)
        for start in range(0, len(x), CHUNK):
            d = torch.cdist(x[start:start + CHUNK], x, compute_mode=MM)
            d[cls[start:start + CHUNK, None] == cls[None, :]] = math.inf
            dist_b[start:start + CHUNK] = d.amin(1)
        self._cache["dist_b"] = dist_b
        if self.reference == "test":  # the flat traces; "train" keeps only the padded parts
            self._cache.update(x=x, cls=cls, known=torch.tensor(sorted(data), device=x.device))
        else:
            sizes = [len(v) for v in data.values()]
            traces, dists = x.split(sizes), dist_b.split(sizes)
            self._set_parts(sorted(data), sizes, lambda members: _pad_classes(
                [traces[i] for i in members], [dists[i] for i in members]))

    def _group_width(self, model: tuple[torch.Tensor, ...]) -> int:
        return model[0].shape[1]

    def _grouped_surprise(self, x: torch.Tensor, model: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``reference="train"``: dist_a and its nearest trace x_a among each class's own training traces.

        The padding columns are at +inf, so the nearest trace is the first minimum in the class's
        own order, as with the class's traces alone.
        """
        train, far, dist_b = model
        dist_a, nearest = (torch.cdist(x, train, compute_mode=MM) + far[:, None, :]).min(2)
        return dist_a / dist_b.gather(1, nearest)

    def _batch_surprise(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """``reference="test"``: one distance block to every training trace, masked by class."""
        if self.reference == "train":
            return super()._batch_surprise(x, classes)
        train, cls = self._cache["x"], self._cache["cls"]
        x, classes = x.to(train.device, train.dtype), classes.to(train.device)
        out = []
        step = _rows_per_block(train.shape[0])
        for start in range(0, x.shape[0], step):
            d = torch.cdist(x[start:start + step], train, compute_mode=MM)
            same = classes[start:start + step, None] == cls[None, :]
            dist_a = torch.where(same, d, math.inf).amin(1)
            out.append(dist_a / torch.where(same, math.inf, d).amin(1))
        sa = torch.cat(out).double() if out else torch.zeros(0, dtype=torch.float64, device=train.device)
        sa[~torch.isin(classes, self._cache["known"])] = math.nan
        return sa


class MDSC(_Surprise):
    """Mahalanobis-distance surprise coverage: buckets of MDSA to the class mean.

    The per-class mean and covariance stream in float64 (Chan et al. merge), so ``fit`` keeps no
    traces and takes any amount of data; MDSA uses a Cholesky factor and a triangular solve.

    Args:
        covariance: ``"population"`` (default, anchor: ÷ n) or ``"sample"`` (÷ (n − 1)).
        ridge: ``ridge · mean(diag) · I`` is added to a covariance that is singular to working
            precision (default 1e-6, counted in ``diagnostics()["ridged"]`` and logged); ``ridge=0``
            raises an error instead. A non-singular covariance is used as is.
        bounds: [L, U) of the fixed buckets, default (0, 100) (unitscope's choice: MDSA of a
            d-unit Gaussian trace is about sqrt(d)).
        n_buckets: 1000.
        buckets, width: ``"anchor"`` counts distinct ``trunc(MDSA / width)``, width 10 as in SEED.
        min_var, var_scope: as in :class:`LSC`.
    """

    key = "mdsc"
    profile_fields = ("count", "mean", "m2")
    default_bounds = (0.0, 100.0)
    default_width = 10.0

    def __init__(self, covariance: str = "population", ridge: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if covariance not in ("population", "sample"):
            raise ValueError(f"MDSC(covariance={covariance!r}): use 'population' or 'sample'")
        if not ridge >= 0:
            raise ValueError(f"MDSC(ridge={ridge}): must be >= 0")
        self.covariance, self.ridge = covariance, float(ridge)

    def config(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {**super().config(), "covariance": self.covariance, "ridge": self.ridge}

    def _grow(self, classes: int, d: int, device: torch.device) -> None:
        have = self._sh["count"].shape[0] if "count" in self._sh else 0
        if classes <= have:
            return
        _check_matrix_memory("MDSC", classes, d)
        f64 = {"dtype": torch.float64, "device": device}
        extra = classes - have
        new = {"count": torch.zeros(extra, **f64), "mean": torch.zeros(extra, d, **f64),
               "m2": torch.zeros(extra, d, d, **f64)}
        for k, v in new.items():
            self._sh[k] = torch.cat([self._sh[k].to(device), v]) if k in self._sh else v

    def _fit_layers(self, layers: dict[str, torch.Tensor], classes: torch.Tensor | None) -> None:
        assert classes is not None
        at = self._trace(layers).double()
        ok = torch.isfinite(at).all(1)  # NaN or inf rows stay out of the profile
        at, classes = at[ok], classes[ok]
        if not len(at):
            return
        self._grow(int(classes.max()) + 1, at.shape[1], at.device)
        for c in torch.unique(classes).tolist():
            self._combine(c, *_moments(at[classes == c]))

    def _combine(self, c: int, n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        sh = self._sh
        cnt, mu, m2_new = chan_combine(sh["count"][c], sh["mean"][c], sh["m2"][c], n, mean, m2, outer=True)
        sh["count"][c], sh["mean"][c], sh["m2"][c] = cnt, mu, m2_new

    def _merge_profile(self, other: Criterion) -> None:
        d = self._sh["mean"].shape[1]
        self._grow(other._sh["count"].shape[0], d, self._sh["mean"].device)
        for c in range(other._sh["count"].shape[0]):
            if other._sh["count"][c] > 0:
                self._combine(c, other._sh["count"][c], other._sh["mean"][c], other._sh["m2"][c])

    def _class_variances(self) -> tuple[torch.Tensor, torch.Tensor]:
        count, mean, m2 = self._sh["count"], self._sh["mean"], self._sh["m2"]
        present = self.usable_classes()
        per_class = torch.stack([m2[c].diagonal() / count[c] for c in present])
        d = mean.shape[1]
        n, mu, tot = count.new_zeros(()), mean.new_zeros(d), m2.new_zeros(d, d)
        for c in present:
            n, mu, tot = chan_combine(n, mu, tot, count[c], mean[c], m2[c], outer=True)
        return per_class, tot.diagonal() / n

    _estimator = "a covariance"

    def _class_counts(self) -> dict[int, int]:
        return {c: int(n) for c, n in enumerate(self._sh["count"].tolist()) if n > 0}

    def _min_class_size(self) -> int:
        return 2

    def _prepare_model(self) -> None:
        """Stack the usable classes' Cholesky factors ``(classes, d, d)`` and means ``(classes, d)``."""
        if "parts" in self._cache:
            return
        keep = self.mask()
        factors, means = [], []
        usable = self.usable_classes()
        for c in usable:
            n = float(self._sh["count"][c])
            ddof = 1 if self.covariance == "sample" else 0
            cov = self._sh["m2"][c][keep][:, keep] / (n - ddof)
            d = cov.shape[0]
            factor = self._factor(cov, c)
            if factor is None:
                raise ValueError(f"MDSC: the covariance of class {c} is singular ({int(n)} training inputs, "
                                 f"{d} units); fit on more inputs, use fewer layers or pass ridge=1e-6")
            factors.append(factor)
            means.append(self._sh["mean"][c][keep])
        stacked = (torch.stack(factors), torch.stack(means))
        self._set_parts(usable, [1] * len(usable), lambda members: stacked)  # no training-side padding

    def _group_width(self, model: tuple[torch.Tensor, ...]) -> int:
        return model[1].shape[1]

    def _grouped_surprise(self, x: torch.Tensor, model: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """MDSA = ‖L_c⁻¹(x − μ_c)‖, one batched triangular solve for every class."""
        factor, mean = model
        delta = (x - mean[:, None, :]).mT
        return torch.linalg.solve_triangular(factor, delta, upper=False).square().sum(1).sqrt()


#: an SA value this many float64 rounding units (relative) from a bucket edge is put on the edge
EDGE_ULPS = 16


def _bucket_position(sa: torch.Tensor, lo: float, hi: float, n: int) -> torch.Tensor:
    """``(sa − L)·n / (U − L)``: bucket ``floor`` of it, underflow below 0, overflow at n or above.

    A value within ``EDGE_ULPS`` rounding units (of the larger of ``|sa|``, ``|L|`` and ``|U|``) of
    a bucket edge is set onto it: an SA value whose exact value is a bucket edge (an MDSA of
    exactly U computed as U − 1 ulp, spec §4.2) then falls in the bucket above the edge, as in
    exact arithmetic, not in the one below, however narrow the bounds.
    """
    scale = n / (hi - lo)
    pos = (sa - lo) * scale
    edge = pos.round()
    # the rounding error of sa, and of sa − L, is a few ulps of the larger of |sa|, |L| and |U|
    magnitude = sa.abs().clamp(min=max(abs(lo), abs(hi)))
    near = (pos - edge).abs() <= EDGE_ULPS * torch.finfo(torch.float64).eps * magnitude * scale
    return torch.where(near, edge, pos)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, centred cross-product matrix) of the rows of ``x``, float64."""
    mean = x.mean(0)
    xc = x - mean
    return torch.tensor(float(len(x)), dtype=torch.float64, device=x.device), mean, xc.T @ xc


def _cholesky(cov: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor of ``cov``, or None when it is singular to working precision."""
    factor, info = torch.linalg.cholesky_ex(cov)
    if int(info) or not bool(torch.isfinite(factor).all()):
        return None
    if float(factor.diagonal().min()) ** 2 <= 1e-12 * float(cov.diagonal().max()):
        return None
    return factor


def _group(x: torch.Tensor, k: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``x`` grouped by ``k``: a zero-padded ``(groups, m, d)`` block, m the largest group.

    Returns the block and ``pos``, with row i of ``x`` at ``block[k[i], pos[i]]``; rows keep their
    order within a group.
    """
    order = torch.argsort(k, stable=True)
    counts = torch.bincount(k, minlength=groups)
    first = counts.cumsum(0) - counts
    pos = torch.empty_like(k)
    pos[order] = torch.arange(len(k), device=k.device) - first[k[order]]
    block = x.new_zeros(groups, int(counts.max()), x.shape[1])
    block[k, pos] = x
    return block, pos


def _pad_classes(traces: list[torch.Tensor],
                 dist_b: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DSC's training traces of some classes (one ``(n_c, d)`` tensor each), padded to the largest.

    Returns the traces ``(classes, most, d)`` (padding 0), the offset added to a distance
    ``(classes, most)`` (0, +inf on padding) and dist_b ``(classes, most)`` (padding 1).
    """
    most, first = max(len(t) for t in traces), traces[0]
    train = first.new_zeros(len(traces), most, first.shape[1])
    far = first.new_full((len(traces), most), math.inf)
    padded_b = first.new_ones(len(traces), most)
    for i, (part, part_b) in enumerate(zip(traces, dist_b)):
        train[i, :len(part)], far[i, :len(part)], padded_b[i, :len(part)] = part, 0.0, part_b
    return train, far, padded_b


def _size_parts(sizes: list[int]) -> list[list[int]]:
    """Indices of ``sizes`` in parts whose largest size is at most twice the smallest.

    Greedy from the largest: a part takes every remaining size of at least half its first.
    Balanced classes make one part; one large class among small ones gets a part of its own.

    Example:
        >>> _size_parts([150, 140, 160, 8000, 40])
        [[3], [2, 0, 1], [4]]
    """
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    parts: list[list[int]] = []
    for i in order:
        if parts and 2 * sizes[i] >= sizes[parts[-1][0]]:
            parts[-1].append(i)
        else:
            parts.append([i])
    return parts


def _rows_per_block(columns: int) -> int:
    """Rows per distance block so that a float64 block holds about 4 M entries (32 MB)."""
    return max(1, (1 << 22) // max(columns, 1))


#: the most memory the per-class d × d matrices of LSC and MDSC may take
MATRIX_BYTES = 4 << 30


def _check_matrix_memory(name: str, classes: int, d: int) -> None:
    need = classes * d * d * 8
    if need > MATRIX_BYTES:
        raise ValueError(f"{name} keeps a {d} × {d} float64 matrix for each of {classes} classes "
                         f"({need / 2**30:.1f} GiB, more than {MATRIX_BYTES / 2**30:.0f} GiB); build the "
                         "trace from fewer units, e.g. Coverage(surprise_layers=['<one deep layer>'])")
