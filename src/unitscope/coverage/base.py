"""What every coverage criterion shares: layer bookkeeping, the fit/update phases, merge and states.

A criterion is a mergeable accumulator over *activation tensors*, not over a model (spec
coverage.md §1.5): ``acts`` is a tensor ``(n, units)`` for one layer, or a dict of such tensors by
layer name. A tensor with more dimensions, ``(n, channels, *spatial)``, is reduced to
``(n, channels)`` by the spatial mean first (one unit per channel, as every reference does).

Life cycle:

* ``fit(acts)`` (only criteria with a profile: ranges, training traces) may be called on any
  number of training batches; it folds them into the profile.
* ``update(acts)`` folds test inputs in and returns the gain (value after minus value before).
  The first update freezes the profile; a later ``fit`` is refused until :meth:`reset`.
* ``value()`` is recomputed from the state every time (no drifting running sums).
* ``merge(other)`` folds another criterion of the same configuration in: profiles while fitting,
  covered sets once testing (set union, so two shards merged equal one pass).
* ``state_dict()`` / ``load_state_dict()`` hold the profile and the covered state as plain
  tensors (layer names included), so a criterion saved with safetensors comes back whole.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..stats.base import Accumulator, MergeError

#: every criterion class by its short name (``"nc"``, ``"kmnc"``, ...)
CRITERIA: dict[str, type[Criterion]] = {}

#: the layer name used when ``acts`` is a single tensor
SINGLE = "layer"

Acts = torch.Tensor | Mapping[str, torch.Tensor]

_IDLE, _FITTING, _TESTING = 0, 1, 2


class Criterion(Accumulator):
    """Base class of the coverage criteria (see the module docstring for the protocol).

    Subclasses set ``key`` (the short name), ``kind`` (``"fraction"`` in [0, 1] or ``"count"``),
    ``needs_fit`` and ``needs_classes``, and implement ``_fit_layers`` (when they need a profile),
    ``_start`` (create the covered state), ``_update_layers``, ``_merge_covered``, ``_merge_profile``
    and ``_layer_values`` / ``value``.

    State lives in ``self._st[layer][field]`` (per layer) and ``self._sh[field]`` (shared).
    """

    key: ClassVar[str] = ""
    kind: ClassVar[str] = "fraction"
    needs_fit: ClassVar[bool] = False
    needs_classes: ClassVar[bool] = False
    #: state fields that make up the profile (compared on merge while testing)
    profile_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.key:
            CRITERIA[cls.key] = cls

    def __init__(self) -> None:
        super().__init__()
        self._layers: list[str] = []
        self._units: dict[str, int] = {}
        self._st: dict[str, dict[str, torch.Tensor]] = {}
        self._sh: dict[str, torch.Tensor] = {}
        self._phase = _IDLE
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ public verbs
    @property
    def initialized(self) -> bool:
        """Whether any data (training or test) has arrived."""
        return self._phase != _IDLE

    @property
    def fitted(self) -> bool:
        """Whether ``fit`` has seen data (always True for criteria that need no profile)."""
        return not self.needs_fit or self._phase != _IDLE

    @property
    def layers(self) -> list[str]:
        """The layer names, in the order they were first given."""
        return list(self._layers)

    def fit(self, acts: Acts, classes: torch.Tensor | None = None) -> Criterion:
        """Fold training activations into the profile; returns ``self`` so calls chain.

        Args:
            acts: ``(n, units)`` tensor or dict of them by layer name (the build set D).
            classes: ``(n,)`` class of every input (surprise criteria only; see ``needs_classes``).
        """
        if not self.needs_fit:
            raise ValueError(f"{type(self).__name__} needs no profile: call update() directly")
        if self._phase == _TESTING:
            raise ValueError(f"{type(self).__name__}.fit() after update(): the profile is frozen once "
                             "test inputs arrive; call reset() and fit again")
        layers = self._check(acts, "fit")
        if not layers:
            return self
        cls = self._classes(classes, layers, "fit")
        self._fit_layers(layers, cls)
        self._phase = _FITTING
        self._cache.clear()
        return self

    def update(self, acts: Acts, classes: torch.Tensor | None = None) -> float:
        """Fold test activations in; return the gain in :meth:`value` (never negative).

        Args:
            acts: ``(n, units)`` tensor or dict of them by layer name, the same layers and unit
                counts as ``fit`` (or as the first update).
            classes: ``(n,)`` class of every input (surprise criteria only).
        """
        if self.needs_fit and self._phase == _IDLE:
            raise ValueError(f"{type(self).__name__} needs a profile of training activations: call "
                             f"fit(train_acts) before update()")
        layers = self._check(acts, "update")
        if not layers:
            return 0.0
        cls = self._classes(classes, layers, "update")
        before = self.value() if self._phase == _TESTING else 0.0
        if self._phase != _TESTING:
            self._start()
            self._phase = _TESTING
        self._update_layers(layers, cls)
        self._cache.pop("value", None)
        return self.value() - before

    def freeze(self) -> Criterion:
        """Fix the profile and start the test phase with nothing covered; returns ``self``.

        The first :meth:`update` does this by itself; calling it after ``fit`` moves the one-off
        preparation (variance mask, KDE factors, bounds) out of the test pass and surfaces errors
        about the profile (too few samples, singular covariances) right after the build.
        """
        if self._phase == _IDLE:
            raise ValueError(f"{type(self).__name__}.freeze() needs fit(train_acts) (or an update) first")
        if self._phase != _TESTING:
            self._start()
            self._phase = _TESTING
            self._cache.pop("value", None)
        return self

    def propose(self, acts: Acts, classes: torch.Tensor | None = None) -> Criterion:
        """The candidate state after ``acts``, leaving ``self`` unchanged (for fuzzing)."""
        candidate = self.clone()
        candidate.update(acts, classes)
        return candidate

    def commit(self, candidate: Criterion) -> float:
        """Adopt a state returned by :meth:`propose`; returns the gain."""
        if type(candidate) is not type(self) or candidate.config() != self.config():
            raise MergeError(f"commit() takes a candidate proposed by this {type(self).__name__}")
        before = self.value()
        self.load_state_dict(candidate.state_dict())
        return self.value() - before

    def value(self) -> float:
        """The coverage: a fraction in [0, 1], or a count for ``kind == "count"`` criteria."""
        if self._phase != _TESTING:
            return 0.0
        if "value" not in self._cache:  # recomputed from the state after every change
            self._cache["value"] = self._value()
        return self._cache["value"]

    def layer_values(self) -> dict[str, float]:
        """Coverage per layer (empty for criteria defined on all layers together)."""
        if self._phase != _TESTING:
            return dict.fromkeys(self._layers, 0.0) if self._has_layer_values() else {}
        return self._layer_values()

    def compute(self) -> float:
        """Same as :meth:`value` (the accumulator protocol's name)."""
        return self.value()

    def diagnostics(self) -> dict[str, float]:
        """Extra counts that qualify the value (degenerate units, out-of-bounds surprise, ...)."""
        return {}

    def reset(self) -> None:
        """Forget the profile and everything covered."""
        self._layers, self._units, self._st, self._sh = [], {}, {}, {}
        self._phase = _IDLE
        self._cache.clear()

    # ------------------------------------------------------------------ states
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The state as flat tensors: ``"<layer>/<field>"``, ``"/<field>"`` and the header ``"/meta"``."""
        if self._phase == _IDLE:
            return {}
        meta = {"layers": self._layers, "units": [self._units[k] for k in self._layers],
                "phase": self._phase}
        out = {"/meta": torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}
        for layer in self._layers:
            for field, t in self._st[layer].items():
                out[f"{layer}/{field}"] = t.detach().clone()
        for field, t in self._sh.items():
            out[f"/{field}"] = t.detach().clone()
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the state with one returned by :meth:`state_dict`."""
        self.reset()
        if not state:
            return
        if "/meta" not in state:
            raise MergeError(f"{type(self).__name__}: not a coverage criterion state (no '/meta' entry)")
        meta = json.loads(bytes(state["/meta"].tolist()).decode())
        self._layers = list(meta["layers"])
        self._units = dict(zip(self._layers, meta["units"]))
        self._phase = int(meta["phase"])
        self._st = {k: {} for k in self._layers}
        for name, t in state.items():
            if name == "/meta":
                continue
            layer, _, field = name.rpartition("/")
            if layer == "":
                self._sh[field] = t.detach().clone()
            elif layer in self._st:
                self._st[layer][field] = t.detach().clone()
            else:
                raise MergeError(f"{type(self).__name__}: state entry {name!r} names an unknown layer")

    def to(self, device: torch.device | str) -> Criterion:
        """Move the state to ``device`` in place."""
        if self.device is not None and self.device != torch.device(device):
            self._cache.clear()
        self._st = {k: {f: t.to(device) for f, t in v.items()} for k, v in self._st.items()}
        self._sh = {f: t.to(device) for f, t in self._sh.items()}
        return self

    @property
    def device(self) -> torch.device | None:
        """The device of the state (None while empty)."""
        for fields in [*self._st.values(), self._sh]:
            for t in fields.values():
                return t.device
        return None

    def merge(self, other: Accumulator) -> Criterion:
        """Fold ``other`` in (in place; returns ``self``).

        Two fitting criteria merge their profiles; two testing ones must share the same profile
        and merge what they covered. The empty criterion is the identity.
        """
        if type(other) is not type(self):
            raise MergeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        assert isinstance(other, Criterion)
        if other.config() != self.config():
            raise MergeError(f"cannot merge {type(self).__name__} of different configuration: "
                             f"{self.config()} vs {other.config()}")
        if other._phase == _IDLE:
            return self
        if self._phase == _IDLE:
            self.load_state_dict(other.state_dict())
            return self
        if self._layers != other._layers or self._units != other._units:
            raise MergeError(f"cannot merge {type(self).__name__} over different layers: "
                             f"{self._units} vs {other._units}")
        dev = self.device
        other = other.clone().to(dev) if dev is not None else other
        if self._phase != other._phase:
            # a fitted shard that saw no test input adds nothing, provided the profiles agree
            self._check_same_profile(other)
            if self._phase == _FITTING:
                self.load_state_dict(other.state_dict())
        elif self._phase == _FITTING:
            self._merge_profile(other)
        else:
            self._check_same_profile(other)
            self._merge_covered(other)
        self._cache.clear()
        return self

    def _sync_states(self, group: Any) -> bool:
        return False  # gather the states and merge them in rank order

    def _sync_by_gather(self, group: Any) -> None:
        from ..stats.base import sync_by_gather

        sync_by_gather(self, group)

    def clone(self) -> Criterion:
        """An independent copy with the same configuration and state."""
        other = type(self)(**self.config())
        other.load_state_dict(self.state_dict())
        other._cache = dict(self._cache)  # derived from the profile only, and never modified in place
        return other

    # ------------------------------------------------------------------ helpers for subclasses
    def _prepare(self, t: torch.Tensor) -> torch.Tensor:
        """One layer's activations as ``(n, units)``: spatial mean of ``(n, C, *spatial)`` maps."""
        if t.dim() > 2:
            t = t.float().mean(dim=tuple(range(2, t.dim())))
        return t

    def _check(self, acts: Acts, verb: str) -> dict[str, torch.Tensor]:
        name = type(self).__name__
        if isinstance(acts, torch.Tensor):
            acts = {SINGLE: acts}
        elif not isinstance(acts, Mapping):
            raise TypeError(f"{name}.{verb}() takes a tensor (n, units) or a dict of them by layer "
                            f"name, got {type(acts).__name__}")
        out: dict[str, torch.Tensor] = {}
        rows = -1
        for layer, t in acts.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}.{verb}(): layer {layer!r} is a {type(t).__name__}, not a tensor")
            if t.dim() < 2:
                raise ValueError(f"{name}.{verb}(): layer {layer!r} has shape {tuple(t.shape)}; expected "
                                 "(n, units) or (n, channels, *spatial); use t[None] for one input")
            if rows not in (-1, t.shape[0]):
                sizes = sorted({int(v.shape[0]) for v in acts.values() if isinstance(v, torch.Tensor)})
                raise ValueError(f"{name}.{verb}(): the layers hold different numbers of inputs {sizes}")
            rows = t.shape[0]
            if not torch.is_floating_point(t):
                t = t.float()
            out[str(layer)] = self._prepare(t.detach()) if rows else t.new_zeros(0, t.shape[1])
        if not self._layers:
            self._layers = list(out)
            self._units = {k: int(t.shape[1]) for k, t in out.items()}
            self._st = {k: {} for k in out}
            return out if rows else {}
        if out.keys() != self._units.keys():
            raise ValueError(f"{name}.{verb}(): got layers {sorted(out)} but this criterion was built on "
                             f"{sorted(self._layers)}; pass the same layers as in fit()/the first update")
        if any(t.shape[1] != self._units[k] for k, t in out.items()):
            detail = ", ".join(f"{k}: {int(t.shape[1])} units, expected {self._units[k]}"
                               for k, t in out.items() if t.shape[1] != self._units[k])
            raise ValueError(f"{name}.{verb}(): shape mismatch with fit ({detail}); capture the same layers "
                             "with the same reduction for fit and update")
        if not rows:
            return {}
        return out if list(out) == self._layers else {k: out[k] for k in self._layers}

    def _fitted_classes(self) -> int:
        """How many classes the profile holds (criteria with class-wise profiles override it)."""
        return 1

    def _classes(self, classes: torch.Tensor | None, layers: dict[str, torch.Tensor],
                 verb: str) -> torch.Tensor | None:
        if not self.needs_classes:
            return None
        first = next(iter(layers.values()))
        if classes is None:
            fitted = self._fitted_classes() if verb != "fit" else 1
            if fitted > 1:
                raise ValueError(f"{type(self).__name__}.{verb}(): the profile holds {fitted} classes, so "
                                 "pass the class of every input (classes=predicted or true labels, "
                                 "as in fit)")
            return torch.zeros(first.shape[0], dtype=torch.long, device=first.device)
        classes = torch.as_tensor(classes, device=first.device)
        if classes.shape != (first.shape[0],) or torch.is_floating_point(classes):
            raise ValueError(f"{type(self).__name__}: classes must be an integer tensor of shape "
                             f"({first.shape[0]},), got {classes.dtype} {tuple(classes.shape)}")
        if len(classes) and int(classes.min()) < 0:
            raise ValueError(f"{type(self).__name__}: classes must be >= 0")
        return classes.long()

    def _check_same_profile(self, other: Criterion) -> None:
        for field in self.profile_fields:
            for layer in self._layers:
                a, b = self._st[layer].get(field), other._st[layer].get(field)
                if a is not None and (b is None or not torch.equal(a, b)):
                    raise MergeError(f"{type(self).__name__}: the two states were fitted on different "
                                     f"training data ({field!r} of layer {layer!r} differs); fit once and "
                                     "copy the criterion (clone()) to every shard")
            a, b = self._sh.get(field), other._sh.get(field)
            if a is not None and (b is None or not torch.equal(a, b)):
                raise MergeError(f"{type(self).__name__}: the two states were fitted on different training "
                                 f"data ({field!r} differs); fit once and clone() to every shard")

    def _has_layer_values(self) -> bool:
        return True

    # ------------------------------------------------------------------ to implement
    def _fit_layers(self, layers: dict[str, torch.Tensor], classes: torch.Tensor | None) -> None:
        raise NotImplementedError

    def _merge_profile(self, other: Criterion) -> None:
        raise NotImplementedError

    def _start(self) -> None:
        raise NotImplementedError

    def _update_layers(self, layers: dict[str, torch.Tensor], classes: torch.Tensor | None) -> None:
        raise NotImplementedError

    def _merge_covered(self, other: Criterion) -> None:
        raise NotImplementedError

    def _value(self) -> float:
        raise NotImplementedError

    def _layer_values(self) -> dict[str, float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def criterion(spec: str | Criterion, **options: Any) -> Criterion:
    """A criterion from its short name (``"nc"``, ``"kmnc"``, ...) and options, or one given as is.

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    from . import cluster, neuron, surprise  # noqa: F401  (importing them registers the criteria)

    if isinstance(spec, Criterion):
        if options:
            raise ValueError(f"options {sorted(options)} given for a {type(spec).__name__} object; set them "
                             "in its constructor instead")
        return spec
    if not isinstance(spec, str) or spec.lower() not in CRITERIA:
        known = ", ".join(sorted(CRITERIA))
        raise ValueError(f"unknown coverage criterion {spec!r}; known criteria: {known}")
    return CRITERIA[spec.lower()](**options)


# ---------------------------------------------------------------------- small tensor helpers
def nan_to(t: torch.Tensor, value: float) -> torch.Tensor:
    """``t`` with NaN replaced by ``value`` (a copy); ``±inf`` is kept (for rankings)."""
    return torch.nan_to_num(t, nan=value, posinf=math.inf, neginf=-math.inf)


def nonfinite_to(t: torch.Tensor, value: float) -> torch.Tensor:
    """``t`` with NaN and ``±inf`` replaced by ``value`` (a copy), so they stay out of a min or max."""
    return torch.nan_to_num(t, nan=value, posinf=value, neginf=value)  # one pass, no isfinite mask


def topk_mask(v: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``(n, units)`` mask of the ``k`` largest values of every row.

    Ties are broken deterministically: among equal values the smaller unit index wins. NaN is
    never selected and ranks below ``-inf``; with ``k >= units`` every non-NaN unit is.

    Example:
        >>> topk_mask(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), 2).tolist()
        [[False, True, True, False]]
        >>> topk_mask(torch.tensor([[2.0, 2.0, 2.0]]), 2).tolist()
        [[True, True, False]]
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    nan = torch.isnan(v)
    if k >= v.shape[1]:
        return ~nan
    # a stable descending sort keeps equal values in index order, so its first k columns are the
    # k largest with ties to the smaller index. NaN goes to the end first (a stable sort on the NaN
    # flag), so a real -inf still ranks above it, and it is masked out after
    last = nan.to(torch.uint8).sort(dim=1, stable=True).indices
    values = nan_to(v, -math.inf).gather(1, last)
    order = last.gather(1, values.sort(dim=1, descending=True, stable=True).indices[:, :k])
    return torch.zeros_like(nan).scatter_(1, order, True) & ~nan


#: bit j of a 64-unit word has weight 2**j; bit 63 wraps to the sign bit (two's complement)
_BIT_WEIGHTS = torch.tensor([1 << j for j in range(63)] + [-(1 << 63)], dtype=torch.int64)


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean ``(n, m)`` mask into ``(n, ceil(m / 64))`` int64 words (exact pattern keys).

    Example:
        >>> pack_rows(torch.tensor([[True, False, True] + [False] * 61 + [True]])).tolist()
        [[5, 1]]
    """
    n, m = mask.shape
    pad = (-m) % 64
    b = mask.to(torch.int64)
    if pad:
        b = torch.cat([b, b.new_zeros(n, pad)], dim=1)
    return (b.view(n, -1, 64) * _BIT_WEIGHTS.to(b.device)).sum(-1)


def union_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The distinct rows of ``a`` and ``b`` together (sorted), for set-of-pattern states."""
    both = torch.cat([a, b.to(a.device, a.dtype)])
    if both.shape[0] == 0:
        return both
    return torch.unique(both, dim=0)


def union_ids(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The distinct int64 ids of ``a`` and ``b`` together (sorted)."""
    return torch.unique(torch.cat([a, b.to(a.device, a.dtype)]))
