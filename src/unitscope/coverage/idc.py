"""Importance-Driven Coverage (IDC, Gerasimou et al., ICSE 2020; spec coverage.md §3.4).

IDC asks which *combinations* of typical values of the most important units a test set reaches.
From the (correctly classified) training inputs it

1. ranks the units of a layer by their summed relevance (LRP by default; any attribution works)
   and keeps the top ``m``;
2. clusters each kept unit's training activations in 1-D with k-means (k fixed, or chosen by the
   silhouette score over a range) and keeps the sorted centroids;
3. counts the combinations |INCC| = Π_n k_n of one cluster per kept unit.

A test input then falls in the combination of its units' nearest centroids; IDC is the fraction
of combinations that some test input reached. The math works on activation tensors, without a
model: ``acts`` is ``(n, units)`` for one layer (``(n, C, *spatial)`` is reduced by the spatial
mean) or a dict of them by layer name.

Groups measured at once, each with its own kept units and covered set:

* ``("layer", name)`` per layer: the top ``m`` units of that layer;
* ``("end2end", "")`` when there are several layers: the top ``m`` units over all layers
  together, ranked by the raw summed relevance (SEED's model-wise IDC) or after a per-layer
  normalisation (``cross_layer_norm``);
* the same per class when ``fit`` gets the training inputs' classes: units ranked by the
  relevance summed over that class's inputs, covered by the test inputs of that class. The
  clusters of a unit are shared by every group that keeps it (fitted on all training inputs).

Combination ids are mixed-radix integers; the covered state is a bitmap (a sorted id tensor when
|INCC| > 2^24), so merging shards is a set union and the value never decreases.

Example (spec §5.4):
    >>> import torch
    >>> from unitscope.coverage.idc import IDC
    >>> idc = IDC.from_centroids([[0.0, 1.0], [0.0, 2.0, 4.0]])
    >>> [round(idc.update(torch.tensor([t])), 4) for t in ([0.1, 1.9], [0.9, 0.2], [0.2, 2.2], [0.6, 3.5])]
    [0.1667, 0.1667, 0.0, 0.1667]
    >>> idc.value()
    0.5
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from ..stats.base import Accumulator, MergeError

SINGLE = "layer"
BITMAP_LIMIT = 2 ** 24
#: the largest radix product one int64 word of a combination key holds
WORD_LIMIT = 2 ** 62

Acts = torch.Tensor | Mapping[str, torch.Tensor]


class ClusteringError(ValueError):
    """k-means cannot be fitted as asked (fewer samples than clusters)."""


# ---------------------------------------------------------------------- 1-D clustering
def silhouette_1d(values: np.ndarray, labels: np.ndarray) -> float:
    """The silhouette score (Rousseeuw 1987) of a labelling of 1-D values, exact, in O(n log n) per cluster.

    Equals scikit-learn's ``silhouette_score`` (Euclidean, every sample): for every value the mean
    distance to each cluster comes from the cluster's sorted values and prefix sums instead of
    an n × n distance matrix. A value alone in its cluster scores 0.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    lab = np.asarray(labels).reshape(-1)
    ids, own = np.unique(lab, return_inverse=True)
    if not 2 <= len(ids) <= len(x) - 1:
        raise ValueError(f"the silhouette needs 2 to n - 1 clusters, got {len(ids)} for {len(x)} values")
    mean_dist = np.empty((len(ids), len(x)))
    sizes = np.bincount(own)
    for c in range(len(ids)):
        s = np.sort(x[own == c])
        prefix = np.concatenate([[0.0], np.cumsum(s)])
        below = np.searchsorted(s, x, side="right")
        total = (x * below - prefix[below]) + (prefix[-1] - prefix[below] - x * (len(s) - below))
        mean_dist[c] = total
    rows = np.arange(len(x))
    a_sum = mean_dist[own, rows]
    with np.errstate(divide="ignore", invalid="ignore"):
        a = a_sum / (sizes[own] - 1)
        other = mean_dist / sizes[:, None]
    other[own, rows] = np.inf
    b = other.min(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sil = (b - a) / np.maximum(a, b)
    sil = np.where(sizes[own] > 1, np.nan_to_num(sil), 0.0)
    return float(sil.mean())


def cluster_1d(values: torch.Tensor, k: int | None = None, k_range: tuple[int, int] = (2, 4),
               seed: int = 0, n_init: int = 10) -> tuple[torch.Tensor, float]:
    """Sorted distinct k-means centroids of 1-D values, and the silhouette score of the chosen k.

    With ``k`` given, k-means with that k (capped at the number of distinct values); otherwise
    every k in ``k_range`` (inclusive) that the data allows is tried and the one with the best
    silhouette score kept, the smaller k on ties (DeepImportance's ``quantizeSilhouette``: range
    (2, 4)). A unit with one distinct value gets one centroid. Uses scikit-learn's ``KMeans``
    (``n_init`` restarts, ``random_state=seed``) and the exact silhouette of every value
    (:func:`silhouette_1d`, equal to scikit-learn's ``silhouette_score``, without its n × n
    distance matrix).

    Raises:
        ClusteringError: fewer (finite) values than clusters.
    """
    from sklearn.cluster import KMeans

    v = values.detach().double().cpu().reshape(-1)
    v = v[torch.isfinite(v)].numpy()
    n = len(v)
    lo, hi = (int(k), int(k)) if k is not None else (int(k_range[0]), int(k_range[1]))
    if lo < 1 or hi < lo:
        raise ClusteringError(f"k={k}, k_range={k_range}: need 1 <= k (and k_range low <= high)")
    if n < lo:
        raise ClusteringError(f"k-means with {lo} clusters needs at least {lo} samples, got {n}; "
                              "use more training inputs or a smaller k")
    distinct = len(np.unique(v))
    if distinct == 1 or hi == 1:
        return torch.tensor([float(v.mean())], dtype=torch.float64), float("nan")
    x = v[:, None]

    def fit(kk: int) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return KMeans(n_clusters=kk, n_init=n_init, random_state=seed).fit(x)

    if k is not None:
        km = fit(min(lo, distinct))
        return _sorted_unique(km.cluster_centers_[:, 0]), float("nan")
    candidates = [kk for kk in range(max(lo, 2), hi + 1) if kk <= distinct and kk <= n - 1]
    if not candidates:
        raise ClusteringError(f"the silhouette choice of k in {k_range} needs more than {lo} samples with "
                              f"{lo} distinct values, got {n} samples ({distinct} distinct); fix k instead")
    best, best_score = None, -math.inf
    for kk in candidates:
        km = fit(kk)
        if len(np.unique(km.labels_)) < 2:
            continue
        score = silhouette_1d(v, km.labels_)
        if score > best_score + 1e-12:
            best, best_score = km, score
    if best is None:
        return torch.tensor([float(v.mean())], dtype=torch.float64), float("nan")
    return _sorted_unique(best.cluster_centers_[:, 0]), best_score


def _as_keys(cov: torch.Tensor) -> torch.Tensor:
    """A covered state as saved: a bitmap stays as it is; a set of keys becomes ``(keys, words)``
    (states saved before keys had several words hold a flat vector of one-word keys)."""
    return cov.reshape(-1, 1) if cov.dtype != torch.bool and cov.dim() == 1 else cov


def _union_keys(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The distinct ``(keys, words)`` rows of two sets of combination keys."""
    if a.shape[1:] != b.shape[1:]:
        raise MergeError(f"IDC: combination keys of {a.shape[1]} and {b.shape[1]} words; fit once and "
                         "clone() the IDC to every shard")
    return torch.unique(torch.cat([a, b]), dim=0)


def _sorted_unique(c: np.ndarray) -> torch.Tensor:
    return torch.unique(torch.as_tensor(c, dtype=torch.float64))


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each value (sorted centroids; a tie goes to the lower one)."""
    mids = (centroids[1:] + centroids[:-1]) / 2
    return torch.bucketize(values.double().contiguous(), mids.to(values.device).contiguous())


# ---------------------------------------------------------------------- helpers
def normalise_scores(scores: torch.Tensor, how: str = "none") -> torch.Tensor:
    """One layer's importance scores made comparable across layers for an end-to-end ranking.

    ``"none"``: as they are (SEED); ``"per_layer_max"``: divided by the largest absolute score;
    ``"per_layer_z"``: z-scores within the layer. Raw LRP relevance is roughly conserved per
    layer, so without a normalisation narrow layers get larger per-unit scores.
    """
    if how == "per_layer_max":
        return scores / scores.abs().max().clamp_min(1e-300)
    if how == "per_layer_z":
        return (scores - scores.mean()) / scores.std(unbiased=False).clamp_min(1e-300)
    if how != "none":
        raise ValueError(f"cross_layer_norm={how!r}: use 'none', 'per_layer_max' or 'per_layer_z'")
    return scores


def _as_layers(acts: Acts, what: str, reduce: str = "mean") -> dict[str, torch.Tensor]:
    if isinstance(acts, torch.Tensor):
        acts = {SINGLE: acts}
    elif not isinstance(acts, Mapping):
        raise TypeError(f"IDC {what}: give a tensor (n, units) or a dict of them by layer name, "
                        f"got {type(acts).__name__}")
    out = {}
    for name, t in acts.items():
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            raise ValueError(f"IDC {what}: layer {name!r} must be a tensor (n, units) or (n, C, *spatial)")
        t = t.detach()
        if t.dim() > 2:
            dims = tuple(range(2, t.dim()))
            t = t.float().mean(dims) if reduce == "mean" else t.float().sum(dims)
        out[str(name)] = t
    return out


class IDC(Accumulator):
    """Importance-driven coverage over one or several layers (see the module docstring).

    Args:
        m: important units kept per group (DeepImportance's default 2; SEED uses 5).
        k: clusters per unit; None chooses k by the silhouette score over ``k_range``.
        k_range: the k tried by the silhouette choice, inclusive ((2, 4) as in DeepImportance).
        importance: ``"sum"`` (signed relevance summed over inputs, the original) or ``"abs_sum"``.
        cross_layer_norm: end-to-end ranking over layers: ``"none"`` (raw scores, SEED),
            ``"per_layer_max"`` (each layer's scores divided by its largest absolute score) or
            ``"per_layer_z"`` (z-scores within each layer).
        round_centroids: decimals to round centroids to (2 in DeepImportance), None to keep them.
        drop_zeros: leave a unit's exact zeros out of its clustering (DeepImportance does it for
            dense layers, where a dead ReLU input is 0; spec coverage §3.1); a unit left with
            fewer values than clusters (a dead unit) gets the single centroid 0.
        min_values: a unit with fewer training values than this (after ``drop_zeros``) gets the
            single centroid 0 instead of a clustering (DeepImportance: 10; default 0, off).
        seed, n_init: k-means seed and restarts.
    """

    rules: ClassVar[dict[str, str]] = {}
    key = "idc"
    kind = "fraction"

    def __init__(self, m: int = 2, k: int | None = None, k_range: Sequence[int] = (2, 4),
                 importance: str = "sum", cross_layer_norm: str = "none", round_centroids: int | None = None,
                 seed: int = 0, n_init: int = 10, drop_zeros: bool = False, min_values: int = 0) -> None:
        super().__init__()
        if int(m) < 1:
            raise ValueError(f"IDC(m={m}): m must be >= 1")
        if importance not in ("sum", "abs_sum"):
            raise ValueError(f"IDC(importance={importance!r}): use 'sum' or 'abs_sum'")
        if cross_layer_norm not in ("none", "per_layer_max", "per_layer_z"):
            raise ValueError(f"IDC(cross_layer_norm={cross_layer_norm!r}): use 'none', 'per_layer_max' "
                             "or 'per_layer_z'")
        if k is not None and int(k) < 1:
            raise ValueError(f"IDC(k={k}): k must be >= 1, or None for the silhouette choice")
        self.m = int(m)
        self.k = None if k is None else int(k)
        self.k_range = (int(k_range[0]), int(k_range[1]))
        self.importance = importance
        self.cross_layer_norm = cross_layer_norm
        self.round_centroids = round_centroids
        self.seed, self.n_init = int(seed), int(n_init)
        if int(min_values) < 0:
            raise ValueError(f"IDC(min_values={min_values}): use 0 (off) or a positive count (10 in "
                             "DeepImportance)")
        self.drop_zeros, self.min_values = bool(drop_zeros), int(min_values)
        self.reset()

    def config(self) -> dict[str, Any]:
        """Constructor arguments (two IDCs merge only when these match)."""
        return {"m": self.m, "k": self.k, "k_range": list(self.k_range), "importance": self.importance,
                "cross_layer_norm": self.cross_layer_norm, "round_centroids": self.round_centroids,
                "seed": self.seed, "n_init": self.n_init, "drop_zeros": self.drop_zeros,
                "min_values": self.min_values}

    def reset(self) -> None:
        """Forget the fit and everything covered."""
        self._layers: list[str] = []
        self._units: dict[str, int] = {}
        #: group descriptions: scope ("layer" / "end2end"), layer ("" for end2end), class (-1: all),
        #: kept units [(layer, unit)], their importance
        self.groups: list[dict[str, Any]] = []
        #: (layer, unit) -> sorted centroids (float64)
        self.centroids: dict[tuple[str, int], torch.Tensor] = {}
        self.silhouette: dict[tuple[str, int], float] = {}
        self._covered: list[torch.Tensor] = []
        self._seen: list[int] = []

    # ------------------------------------------------------------------ fitting
    @property
    def fitted(self) -> bool:
        """Whether the important units and their clusters are known."""
        return bool(self.groups)

    @property
    def initialized(self) -> bool:
        """Whether the IDC is fitted (its state exists)."""
        return self.fitted

    @property
    def layers(self) -> list[str]:
        """The layer names it was fitted on, in order."""
        return list(self._layers)

    @classmethod
    def from_centroids(cls, centroids: Sequence[Sequence[float]] | Mapping[str, Mapping[int, Sequence[float]]
                                                                          ], **options: Any) -> IDC:
        """An IDC whose kept units and centroids are given (one layer-wise group per layer).

        ``centroids`` is a list (one entry per unit 0, 1, ... of a single layer) or a dict
        ``{layer: {unit: [centroids]}}``; ``m`` becomes the number of units given per layer.
        """
        if not isinstance(centroids, Mapping):
            centroids = {SINGLE: dict(enumerate(centroids))}
        idc = cls(m=max(len(v) for v in centroids.values()), **options)
        for layer, units in centroids.items():
            idc._layers.append(str(layer))
            idc._units[str(layer)] = max(int(u) for u in units) + 1
            kept = [(str(layer), int(u)) for u in units]
            for key, c in zip(kept, units.values()):
                idc.centroids[key] = torch.unique(torch.as_tensor(list(c), dtype=torch.float64))
            idc._add_group("layer", str(layer), -1, kept, [math.nan] * len(kept))
        return idc

    def fit(self, acts: Acts, relevance: Acts | None = None, units: Any = None,
            classes: torch.Tensor | None = None, class_relevance: Mapping[int, Acts] | None = None) -> IDC:
        """Choose the important units and cluster their training activations; returns ``self``.

        Args:
            acts: training activations, ``(n, units)`` or a dict by layer (the inputs IDC is
                built on: DeepImportance keeps only the correctly classified ones).
            relevance: per-input relevance of the same layers, ``(n, units)`` (``(n, C, *spatial)``
                is summed over positions), or already summed over inputs, ``(units,)``.
            units: instead of ``relevance``: the important units, a list of indices (one layer)
                or a dict ``{layer: [indices]}`` (no end-to-end or per-class groups then).
            classes: ``(n,)`` class of every training input (requires per-input relevance): adds
                the per-class groups.
            class_relevance: instead of ``classes``: relevance already summed per class,
                ``{class: (units,) tensor or dict of them by layer}`` (what a streaming pass keeps).

        Raises:
            ValueError: a layer with fewer units than ``m``; relevance and units both or neither.
            ClusteringError: fewer training inputs than clusters.
        """
        if self.fitted:
            raise ValueError("IDC is already fitted; call reset() to fit again")
        layers = _as_layers(acts, "fit")
        if (relevance is None) == (units is None):
            raise ValueError("IDC.fit(): give either relevance= (to rank the units) or units= (the "
                             "important units themselves)")
        n = {t.shape[0] for t in layers.values()}
        if len(n) != 1 or 0 in n:
            raise ValueError(f"IDC.fit(): every layer must hold the same, non-zero number of inputs, got {n}")
        for name, t in layers.items():
            if t.dim() != 2:
                raise ValueError(f"IDC.fit(): layer {name!r} has shape {tuple(t.shape)}; expected (n, units)")
            if t.shape[1] < self.m:
                raise ValueError(f"layer {name!r} has {t.shape[1]} units, fewer than m={self.m}: choose "
                                 f"m <= {t.shape[1]} or another layer")
        self._layers = list(layers)
        self._units = {k: int(t.shape[1]) for k, t in layers.items()}
        if units is not None:
            chosen = units if isinstance(units, Mapping) else {SINGLE: units}
            for layer in self._layers:
                idx = [int(i) for i in chosen.get(layer, [])]
                if len(idx) != self.m or any(not 0 <= i < self._units[layer] for i in idx):
                    raise ValueError(f"units for layer {layer!r} must be {self.m} indices in "
                                     f"[0, {self._units[layer]}), got {idx}")
                self._add_group("layer", layer, -1, [(layer, i) for i in idx], [math.nan] * self.m)
        else:
            per_class = None
            if class_relevance is not None:
                if classes is not None:
                    raise ValueError("IDC.fit(): give classes= or class_relevance=, not both")
                per_class = {int(c): _as_layers(r, "fit(class_relevance=)")
                             for c, r in class_relevance.items()}
            self._rank(layers, _as_layers(relevance, "fit(relevance=)", reduce="sum"), classes, per_class)
        self._cluster(layers)
        return self

    def _scores(self, rel: dict[str, torch.Tensor], classes: torch.Tensor | None, n: int,
                per_class: dict[int, dict[str, torch.Tensor]] | None = None
                ) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Summed importance per layer: (C + 1, units), row 0 for all inputs, then one row per class."""
        out, labels = {}, []
        if per_class is not None:
            labels = sorted(per_class)
        if classes is not None:
            classes = torch.as_tensor(classes).long().reshape(-1)
            if len(classes) != n:
                raise ValueError(f"IDC.fit(): classes has {len(classes)} entries for {n} inputs")
            labels = sorted(int(c) for c in torch.unique(classes))
        for layer in self._layers:
            if layer not in rel:
                raise ValueError(f"IDC.fit(): relevance has no layer {layer!r}")
            r = rel[layer].double()
            if r.shape[-1] != self._units[layer]:
                raise ValueError(f"IDC.fit(): relevance of {layer!r} has {r.shape[-1]} units, the "
                                 f"activations {self._units[layer]}")
            if r.dim() == 1:
                if classes is not None:
                    raise ValueError("IDC.fit(classes=...) needs per-input relevance (n, units)")
                rows = [r]
                for c in labels:
                    rc = per_class[c].get(layer) if per_class is not None else None
                    if rc is None or rc.shape != r.shape:
                        raise ValueError(f"IDC.fit(): class_relevance[{c}] needs layer {layer!r} with "
                                         f"{r.shape[0]} units")
                    rows.append(rc.double())
                out[layer] = torch.stack(rows)
                if self.importance == "abs_sum" and bool((out[layer] < 0).any()):
                    # |Σ r| is not Σ |r|: a summed relevance with a negative entry cannot be the latter
                    raise ValueError(f"IDC(importance='abs_sum'): the summed relevance of {layer!r} has "
                                     "negative entries, so it is not a sum of absolute values; pass "
                                     "per-input relevance (n, units), or sums of |relevance| (as "
                                     "unit_relevance(absolute=True) gives)")
                continue
            if self.importance == "abs_sum":
                r = r.abs()
            if per_class is not None:
                raise ValueError("IDC.fit(class_relevance=...) goes with summed relevance (units,)")
            if r.shape[0] != n:
                raise ValueError(f"IDC.fit(): relevance of {layer!r} has {r.shape[0]} inputs, "
                                 f"the activations {n}")
            rows = [r.sum(0)]
            if classes is not None:
                per = torch.zeros(max(labels) + 1, r.shape[1], dtype=r.dtype).index_add_(0, classes, r)
                rows += [per[c] for c in labels]
            out[layer] = torch.stack(rows)
        return out, labels

    def _rank(self, acts: dict[str, torch.Tensor], rel: dict[str, torch.Tensor],
              classes: torch.Tensor | None, per_class: dict[int, dict[str, torch.Tensor]] | None) -> None:
        n = next(iter(acts.values())).shape[0]
        scores, labels = self._scores(rel, classes, n, per_class)
        for row, cls in enumerate([-1, *labels]):
            for layer in self._layers:
                s = scores[layer][row]
                top = torch.sort(-s, stable=True).indices[: self.m].tolist()  # ties: lower index
                self._add_group("layer", layer, cls, [(layer, i) for i in top], [float(s[i]) for i in top])
            if len(self._layers) > 1:
                normed = [self._normalise(scores[la][row]) for la in self._layers]
                flat = torch.cat(normed)
                owners = [(la, i) for la in self._layers for i in range(self._units[la])]
                top = torch.sort(-flat, stable=True).indices[: self.m].tolist()
                self._add_group("end2end", "", cls, [owners[i] for i in top], [float(flat[i]) for i in top])

    def _normalise(self, s: torch.Tensor) -> torch.Tensor:
        return normalise_scores(s, self.cross_layer_norm)

    def _add_group(self, scope: str, layer: str, cls: int, kept: list[tuple[str, int]],
                   importance: list[float]) -> None:
        self.groups.append({"scope": scope, "layer": layer, "class": int(cls), "units": kept,
                            "importance": importance})

    def _order(self, unit: tuple[str, int]) -> tuple[int, int]:
        return self._layers.index(unit[0]), unit[1]

    def _cluster(self, acts: dict[str, torch.Tensor]) -> None:
        needed = sorted({u for g in self.groups for u in g["units"]}, key=self._order)
        for layer, unit in needed:
            v = acts[layer][:, unit]
            if self.drop_zeros:
                v = v[v != 0]
            least = max(self.min_values, (self.k or self.k_range[0]) if self.drop_zeros else 0)
            if int(torch.isfinite(v).sum()) < least:  # too few values (a dead unit after drop_zeros)
                c, score = torch.zeros(1, dtype=torch.float64), float("nan")
            else:
                c, score = cluster_1d(v, self.k, self.k_range, self.seed, self.n_init)
            if self.round_centroids is not None:
                c = torch.unique(torch.round(c, decimals=int(self.round_centroids)))
            self.centroids[(layer, unit)] = c
            self.silhouette[(layer, unit)] = score

    # ------------------------------------------------------------------ testing
    def combinations(self, g: int) -> int:
        """|INCC| of group ``g``: the product of its units' cluster counts."""
        return math.prod(len(self.centroids[u]) for u in self.groups[g]["units"])

    def _start(self) -> None:
        if self._covered:
            return
        for g in range(len(self.groups)):
            total = self.combinations(g)
            self._covered.append(torch.zeros(total, dtype=torch.bool) if total <= BITMAP_LIMIT
                                 else torch.zeros(0, len(self._word_units(g)), dtype=torch.int64))
            self._seen.append(0)

    def _ids(self, g: int, layers: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Combination keys of every input for group ``g``, ``(n, words)`` int64, and which are valid.

        A key is the mixed-radix number of the inputs' clusters, split over as many int64 words
        as the group's |INCC| needs (each word below 2^62), so no key wraps around however many
        units and clusters a group has. An input with a NaN or inf value in the group is invalid.
        """
        n = next(iter(layers.values())).shape[0]
        words = []
        ok = torch.ones(n, dtype=torch.bool)
        for units in self._word_units(g):
            word, radix = torch.zeros(n, dtype=torch.int64), 1
            for layer, unit in units:
                v = layers[layer][:, unit].cpu()
                c = self.centroids[(layer, unit)]
                word += assign(v, c) * radix
                ok &= torch.isfinite(v)
                radix *= len(c)
            words.append(word)
        return torch.stack(words, 1), ok

    def update(self, acts: Acts, classes: torch.Tensor | None = None) -> float:
        """Fold test activations in; return the gain in :meth:`value` (never negative).

        ``classes`` (the test inputs' classes) is needed when the IDC has per-class groups.
        """
        if not self.fitted:
            raise ValueError("IDC needs fit(train_acts, relevance=...) (or from_centroids) before update()")
        layers = _as_layers(acts, "update")
        if set(layers) != set(self._layers):
            raise ValueError(f"IDC.update(): got layers {sorted(layers)}, fitted on {sorted(self._layers)}")
        for name, t in layers.items():
            if t.dim() != 2 or t.shape[1] != self._units[name]:
                raise ValueError(f"IDC.update(): layer {name!r} has shape {tuple(t.shape)}, expected "
                                 f"(n, {self._units[name]}) as in fit")
        n = next(iter(layers.values())).shape[0]
        has_classes = any(g["class"] >= 0 for g in self.groups)
        if has_classes and classes is None:
            raise ValueError("this IDC has per-class groups (fitted with classes=): pass the test inputs' "
                             "classes to update(acts, classes)")
        cls = None
        if classes is not None:
            cls = torch.as_tensor(classes).reshape(-1).cpu()
            if len(cls) != n:
                raise ValueError(f"IDC.update(): classes has {len(cls)} entries for {n} inputs")
            numeric = torch.is_floating_point(cls) or torch.is_complex(cls) or cls.dtype == torch.bool
            if len(cls) and numeric:  # an empty list is float to torch, and fine
                raise ValueError(f"IDC.update(): classes must be integer class indices, got {cls.dtype}")
            if len(cls) and int(cls.min()) < 0:
                raise ValueError(f"IDC.update(): classes must be >= 0, got {int(cls.min())}")
            cls = cls.long()
        before = self.value()
        self._start()
        for g, group in enumerate(self.groups):
            ids, ok = self._ids(g, layers)
            if group["class"] >= 0:
                mine = cls == group["class"]
                ids, ok = ids[mine], ok[mine]
            self._seen[g] += int(ids.shape[0])
            ids = ids[ok]
            cov = self._covered[g]
            if cov.dtype == torch.bool:  # |INCC| <= BITMAP_LIMIT: one word
                cov[ids[:, 0]] = True
            else:
                self._covered[g] = _union_keys(cov, ids)
        return self.value() - before

    def propose(self, acts: Acts, classes: torch.Tensor | None = None) -> IDC:
        """The state after ``acts``, leaving ``self`` unchanged (for coverage-guided fuzzing)."""
        candidate = self.clone()
        candidate.update(acts, classes)
        return candidate

    def commit(self, candidate: IDC) -> float:
        """Adopt a state returned by :meth:`propose`; returns the gain."""
        before = self.value()
        self.load_state_dict(candidate.state_dict())
        return self.value() - before

    # ------------------------------------------------------------------ reading
    def _main(self) -> int:
        for g, group in enumerate(self.groups):
            if group["class"] < 0 and (group["scope"] == "end2end" or len(self._layers) == 1):
                return g
        return 0

    def covered(self, g: int) -> int:
        """Combinations of group ``g`` covered so far."""
        if not self._covered:
            return 0
        cov = self._covered[g]
        return int(cov.sum()) if cov.dtype == torch.bool else int(cov.shape[0])

    def _word_units(self, g: int) -> list[list[tuple[str, int]]]:
        """Group ``g``'s units split into the int64 words of its combination keys (see :meth:`_ids`):
        a word takes units while the product of their cluster counts stays at most ``WORD_LIMIT``."""
        split, radix = [[]], 1
        for unit in self.groups[g]["units"]:
            count = len(self.centroids[unit])
            if radix * count > WORD_LIMIT:
                split, radix = [*split, []], 1
            split[-1].append(unit)
            radix *= count
        return split

    def group_value(self, g: int) -> float:
        """IDC of group ``g``: covered / |INCC|."""
        return self.covered(g) / self.combinations(g)

    def value(self) -> float:
        """IDC end to end over all layers (of the single layer when there is one), for all classes."""
        if not self.fitted:
            return 0.0
        return self.group_value(self._main())

    def compute(self) -> float:
        """Same as :meth:`value`."""
        return self.value()

    def layer_values(self) -> dict[str, float]:
        """IDC of every layer (all classes)."""
        return {grp["layer"]: self.group_value(g) for g, grp in enumerate(self.groups)
                if grp["scope"] == "layer" and grp["class"] < 0}

    def results(self) -> list[dict[str, Any]]:
        """One record per group: scope, layer, class, m, combinations, covered, coverage, max_achievable."""
        out = []
        for g, grp in enumerate(self.groups):
            total = self.combinations(g)
            seen = self._seen[g] if self._seen else 0
            out.append({"scope": grp["scope"], "layer": grp["layer"], "class": grp["class"],
                        "m": len(grp["units"]), "combinations": total, "covered": self.covered(g),
                        "coverage": self.group_value(g), "max_achievable": min(1.0, seen / total),
                        "inputs": seen})
        return out

    def important_units(self) -> list[dict[str, Any]]:
        """One record per kept unit of every group: its rank, importance and centroids."""
        out = []
        for grp in self.groups:
            for rank, (unit, imp) in enumerate(zip(grp["units"], grp["importance"])):
                c = self.centroids[unit]
                out.append({"scope": grp["scope"], "group_layer": grp["layer"], "class": grp["class"],
                            "rank": rank, "layer": unit[0], "unit": unit[1], "importance": imp,
                            "clusters": len(c), "silhouette": self.silhouette.get(unit, math.nan),
                            "centroids": " ".join(f"{float(x):.4g}" for x in c)})
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The state as tensors: a JSON header (groups, layers), the centroids and the covered sets."""
        if not self.fitted:
            return {}
        keys = sorted(self.centroids, key=self._order)
        meta = {"layers": self._layers, "units": [self._units[k] for k in self._layers],
                "groups": self.groups,
                "centroids": [[la, u, len(self.centroids[(la, u)]), self.silhouette.get((la, u), math.nan)]
                              for la, u in keys],
                "seen": self._seen, "started": bool(self._covered), "config": self.config()}
        out = {"meta": torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8),
               "centroids": torch.cat([self.centroids[u] for u in keys])}
        for g, cov in enumerate(self._covered):
            out[f"covered.{g}"] = cov.clone()
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the state with one returned by :meth:`state_dict`."""
        self.reset()
        if not state:
            return
        if "meta" not in state or "centroids" not in state:
            raise MergeError("not an IDC state (no 'meta' or 'centroids' entry)")
        meta = json.loads(bytes(state["meta"].tolist()).decode())
        self._layers = list(meta["layers"])
        self._units = dict(zip(self._layers, meta["units"]))
        self.groups = [{**g, "units": [(la, int(u)) for la, u in g["units"]]} for g in meta["groups"]]
        flat, pos = state["centroids"].double(), 0
        for la, u, count, sil in meta["centroids"]:
            self.centroids[(la, int(u))] = flat[pos:pos + count].clone()
            self.silhouette[(la, int(u))] = float(sil)
            pos += count
        if meta["started"]:
            self._covered = [_as_keys(state[f"covered.{g}"].clone()) for g in range(len(self.groups))]
            self._seen = list(meta["seen"])

    def clone(self) -> IDC:
        """An independent copy."""
        other = IDC(**{**self.config(), "k_range": tuple(self.k_range)})
        other.load_state_dict(self.state_dict())
        return other

    def merge(self, other: Accumulator) -> IDC:
        """Fold another IDC, fitted identically, in: the union of the covered combinations."""
        if not isinstance(other, IDC) or other.config() != self.config():
            raise MergeError("IDC.merge() takes an IDC of the same configuration")
        if not other.fitted:
            return self
        if not self.fitted:
            self.load_state_dict(other.state_dict())
            return self
        mine, theirs = self.state_dict(), other.state_dict()
        if json.dumps(self.groups) != json.dumps(other.groups) or not torch.equal(mine["centroids"],
                                                                                  theirs["centroids"]):
            raise MergeError("the two IDC states were fitted differently (other units or centroids); "
                             "fit once and clone() the IDC to every shard")
        if not other._covered:
            return self
        self._start()
        for g, cov in enumerate(other._covered):
            if cov.dtype == torch.bool:
                self._covered[g] = self._covered[g] | cov
            else:
                self._covered[g] = _union_keys(self._covered[g], cov)
            self._seen[g] += other._seen[g]
        return self

    def sync(self, group: Any = None) -> IDC:
        """Make every rank hold the union of all ranks' covered sets (no-op without torch.distributed)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, self.state_dict(), group=group)
        merged = IDC(**self.config())
        for state in gathered:
            part = IDC(**self.config())
            part.load_state_dict(state)
            merged.merge(part)
        self.load_state_dict(merged.state_dict())
        return self

    def to(self, device: torch.device | str) -> IDC:
        """The state stays on the CPU (it is tiny); returns ``self``."""
        return self

    def __repr__(self) -> str:
        return f"IDC(m={self.m}, k={self.k}, layers={self._layers}, value={self.value():.4g})"
