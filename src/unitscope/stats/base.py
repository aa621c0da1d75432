"""The accumulator protocol every streaming statistic in unitscope follows.

An accumulator is a small, mergeable state: a few tensors, each declared with the rule that
combines two copies of it (``sum``, ``min``, ``max``, ``equal`` or ``custom``). The verbs are

* ``update(...)`` folds one batch in (shape and device are taken lazily from the first batch),
* ``merge(other)`` folds another accumulator of the same kind in place and returns ``self``,
* ``compute()`` reads the result without touching the state,
* ``sync()`` makes every rank of an initialised ``torch.distributed`` group hold the merged state,
* ``state_dict()`` / ``load_state_dict()`` round-trip the state as plain tensors, so states can be
  written with safetensors (no pickle) and merged offline.

Merging shards in any grouping gives the state of one pass over all of them (to float tolerance),
which is what makes runs resumable and distributed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist

RULES = ("sum", "min", "max", "equal", "custom")

#: every concrete accumulator class, by name, so saved states can be loaded back without pickle
ACCUMULATORS: dict[str, type[Accumulator]] = {}


class MergeError(ValueError):
    """Two accumulators cannot be merged (different kind, configuration or shape)."""


class Accumulator:
    """Base class: subclasses declare ``rules`` and implement ``_init_states``, ``update``, etc.

    ``rules`` maps each state name to its merge rule. States of rule ``custom`` are combined by the
    subclass's ``_merge_states`` (and ``_sync_states`` for the distributed case); the others are
    combined here, elementwise.
    """

    rules: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        bad = {k: v for k, v in cls.rules.items() if v not in RULES}
        if bad:
            raise TypeError(f"{cls.__name__}: unknown merge rules {bad}; use one of {RULES}")
        ACCUMULATORS[cls.__name__] = cls

    def __init__(self) -> None:
        self._states: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------- state handling
    @property
    def initialized(self) -> bool:
        """Whether the first batch has arrived (states exist)."""
        return bool(self._states)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able): two accumulators merge only if their configs match."""
        return {}

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._states = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the state tensors by name (empty before the first update)."""
        return {k: v.detach().clone() for k, v in self._states.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the state with ``state`` (as returned by :meth:`state_dict`)."""
        if not state:
            self._states = {}
            return
        missing = sorted(set(self.rules) - set(state))
        extra = sorted(set(state) - set(self.rules))
        if missing or extra:
            raise MergeError(
                f"{type(self).__name__}: state has missing keys {missing} and unknown keys {extra}"
            )
        self._states = {k: v.detach().clone() for k, v in state.items()}

    def to(self, device: torch.device | str) -> Accumulator:
        """Move the state to ``device`` in place and return ``self``."""
        self._states = {k: v.to(device) for k, v in self._states.items()}
        return self

    @property
    def device(self) -> torch.device | None:
        """The device the state lives on (None before the first update)."""
        for v in self._states.values():
            return v.device
        return None

    def clone(self) -> Accumulator:
        """An independent copy with the same configuration and state."""
        other = type(self)(**self.config())
        other.load_state_dict(self.state_dict())
        return other

    # ----------------------------------------------------------------- merging
    def merge(self, other: Accumulator) -> Accumulator:
        """Fold ``other`` into ``self`` (in place, associative; the empty one is the identity)."""
        if type(other) is not type(self):
            raise MergeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        if other.config() != self.config():
            raise MergeError(
                f"cannot merge {type(self).__name__} states of different configuration: "
                f"{self.config()} vs {other.config()}"
            )
        if not other.initialized:
            return self
        if not self.initialized:
            self.load_state_dict(other.state_dict())
            return self
        dev = self.device
        theirs = {k: v.to(dev) for k, v in other._states.items()}
        for name, rule in self.rules.items():
            mine = self._states[name]
            if rule != "custom" and mine.shape != theirs[name].shape:
                raise MergeError(
                    f"{type(self).__name__}.{name}: shapes differ ({tuple(mine.shape)} vs "
                    f"{tuple(theirs[name].shape)}); were the same layers captured with the same "
                    "reduction?"
                )
            if rule == "sum":
                self._states[name] = mine + theirs[name]
            elif rule == "min":
                self._states[name] = torch.minimum(mine, theirs[name])
            elif rule == "max":
                self._states[name] = torch.maximum(mine, theirs[name])
            elif rule == "equal" and not torch.equal(mine, theirs[name]):
                raise MergeError(f"{type(self).__name__}.{name} must be equal in both states")
        if any(r == "custom" for r in self.rules.values()):
            self._merge_states(theirs)
        return self

    def _merge_states(self, theirs: dict[str, torch.Tensor]) -> None:
        """Combine the ``custom`` states with ``theirs`` (already on this device)."""
        raise NotImplementedError(f"{type(self).__name__} declares custom states but no merge")

    # ----------------------------------------------------------------- distributed
    def sync(self, group: Any = None) -> Accumulator:
        """Make every rank hold the merged state of all ranks (no-op without torch.distributed).

        Sum, min and max states are all-reduced. Custom states use the subclass's
        ``_sync_states`` when it has one, otherwise every rank gathers all states and merges them
        in rank order. Ranks that saw no data are handled by the gather path.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        if dist.get_world_size(group) == 1:
            return self
        # states made in a pass under inference_mode are inference tensors: a collective that
        # writes them in place (gloo on CUDA tensors does) is refused outside inference mode
        with torch.inference_mode():
            device = self.device or _collective_device(group)
            flag = torch.tensor([1 if self.initialized else 0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
            if flag.item() == 0 or not self._sync_states(group):
                self._sync_by_gather(group)
        return self

    def _sync_states(self, group: Any) -> bool:
        """All-reduce the elementwise states; return False to fall back to gather-and-merge."""
        if any(r == "custom" for r in self.rules.values()):
            return False
        self._all_reduce_elementwise(group)
        return True

    def _all_reduce_elementwise(self, group: Any) -> None:
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        for name, rule in self.rules.items():
            if rule in ops:
                dist.all_reduce(self._states[name], op=ops[rule], group=group)

    def _sync_by_gather(self, group: Any) -> None:
        sync_by_gather(self, group)

    # ----------------------------------------------------------------- to implement
    def update(self, *args: Any, **kwargs: Any) -> None:
        """Fold one batch into the state."""
        raise NotImplementedError

    def compute(self) -> Any:
        """Read the result; never mutates the state."""
        raise NotImplementedError

    def _require_initialized(self) -> None:
        if not self.initialized:
            raise ValueError(
                f"{type(self).__name__}.compute() called before any update: the data was empty"
            )


def _collective_device(group: Any) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sync_by_gather(acc: Any, group: Any) -> None:
    """Give every rank the merge, in rank order, of all ranks' states (gathered as CPU tensors).

    ``acc`` is anything with the accumulator verbs (``state_dict``, ``load_state_dict``,
    ``merge``, ``config``, ``device``, ``to``): the fallback for states no all-reduce can combine.
    """
    mine = {k: v.detach().cpu() for k, v in acc.state_dict().items()}
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    device = acc.device
    merged = type(acc)(**acc.config())
    for state in gathered:
        part = type(acc)(**acc.config())
        part.load_state_dict(state)
        merged.merge(part)
    acc.load_state_dict(merged.state_dict())
    if device is not None:
        acc.to(device)


def as_matrix(x: torch.Tensor) -> torch.Tensor:
    """Flatten a batch ``(N, *unit_shape)`` to ``(N, units)``; a 1-D batch is ``(N, 1)``."""
    if x.dim() == 0:
        raise ValueError("expected a batch of shape (N, units), got a scalar")
    # explicit unit count, not -1: reshape(0, -1) is ambiguous and fails for an empty batch
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


# --------------------------------------------------------------------- saving without pickle
def save_states(path: str | Path, accumulators: Mapping[str, Accumulator],
                meta: Mapping[str, Any] | None = None) -> None:
    """Write named accumulators to one safetensors file (tensors + JSON header, no pickle)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    header: dict[str, Any] = {}
    for key, acc in accumulators.items():
        if "/" in key:
            raise ValueError(f"accumulator key {key!r} must not contain '/'")
        header[key] = {"class": type(acc).__name__, "config": acc.config()}
        for name, t in acc.state_dict().items():
            tensors[f"{key}/{name}"] = t.detach().cpu().contiguous().clone()
    metadata = {"accumulators": json.dumps(header), "meta": json.dumps(dict(meta or {}))}
    save_file(tensors, str(path), metadata=metadata)


def load_states(path: str | Path) -> tuple[dict[str, Accumulator], dict[str, Any]]:
    """Read a file written by :func:`save_states`: ``(accumulators by key, meta)``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ValueError(
            f"cannot read accumulator states from {path}: {exc}. The file is corrupt or not a "
            "unitscope state file; delete it and rerun the shard that wrote it."
        ) from exc
    if "accumulators" not in metadata:
        raise ValueError(f"{path} is a safetensors file but not a unitscope state file")
    header = json.loads(metadata["accumulators"])
    out: dict[str, Accumulator] = {}
    for key, info in header.items():
        cls = ACCUMULATORS.get(info["class"])
        if cls is None:
            raise ValueError(f"{path}: unknown accumulator class {info['class']!r}")
        acc = cls(**info["config"])
        prefix = f"{key}/"
        acc.load_state_dict(
            {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        out[key] = acc
    return out, json.loads(metadata.get("meta", "{}"))
