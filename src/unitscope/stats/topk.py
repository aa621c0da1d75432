"""Per-unit top-k: the k largest activations of every unit and which samples produced them.

Every value is kept together with its *global* dataset index (and, optionally, a small integer
payload such as the spatial location of the maximum), so the top-k of a shard can be merged with
the top-k of any other shard. Selection is exact and deterministic: values in descending order,
ties broken by the smaller global index. Merging shards in any order or grouping therefore gives
bit-for-bit the result of one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from .base import Accumulator, MergeError, as_matrix

#: index of an empty slot (sorts after every real index, so real ties always win)
EMPTY = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class TopKResult:
    """The top-k of every unit, best first.

    Attributes:
        values: ``(units, k)`` float64, descending; empty slots are ``-inf``.
        indices: ``(units, k)`` int64 global sample indices; empty slots are ``EMPTY``
            (``torch.iinfo(torch.int64).max``).
        aux: ``(units, k, aux_dim)`` int64 payload (``-1`` in empty slots), or None when
            ``aux_dim == 0``.
        count: ``(units,)`` int64, number of filled slots (less than ``k`` when fewer finite
            values were seen).
    """

    values: torch.Tensor
    indices: torch.Tensor
    aux: torch.Tensor | None
    count: torch.Tensor


def _select(values: torch.Tensor, indices: torch.Tensor, aux: torch.Tensor,
            k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep, per row, the ``k`` best of ``(U, M)`` candidates: value descending, index ascending.

    Two stable sorts (secondary key first) give a total order, vectorised over all rows.
    """
    idx_sorted, perm = torch.sort(indices, dim=1, stable=True)
    v = values.gather(1, perm)
    v_sorted, perm2 = torch.sort(v, dim=1, descending=True, stable=True)
    keep = perm2[:, :k]
    out_idx = idx_sorted.gather(1, keep)
    src = perm.gather(1, keep)  # positions in the unsorted candidates
    out_aux = aux.gather(1, src.unsqueeze(-1).expand(-1, -1, aux.shape[-1]))
    return v_sorted[:, :k].contiguous(), out_idx.contiguous(), out_aux.contiguous()


class TopK(Accumulator):
    """The ``k`` largest values of every unit with their global sample indices.

    Args:
        k: how many values to keep per unit.
        aux_dim: length of an optional int64 payload stored with every value (e.g. 2 for the
            ``(row, col)`` of a spatial maximum); ``update`` then requires ``aux``.

    NaN never enters the top-k (it is counted in ``nonfinite``); ``+inf`` and ``-inf`` are kept
    as ordinary values (and counted in ``nonfinite`` too).

    Example:
        >>> import torch
        >>> from unitscope.stats import TopK
        >>> t = TopK(k=2)
        >>> t.update(torch.tensor([[1.0], [5.0], [3.0]]), index=torch.tensor([10, 11, 12]))
        >>> t.update(torch.tensor([[5.0]]), index=torch.tensor([7]))
        >>> r = t.compute()
        >>> r.values.tolist(), r.indices.tolist()
        ([[5.0, 5.0]], [[7, 11]])
    """

    rules: ClassVar[dict[str, str]] = {
        "values": "custom", "indices": "custom", "aux": "custom", "nonfinite": "sum",
    }

    def __init__(self, k: int, aux_dim: int = 0) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"TopK: k must be a positive int, got {k!r}")
        if isinstance(aux_dim, bool) or not isinstance(aux_dim, int) or aux_dim < 0:
            raise ValueError(f"TopK: aux_dim must be a non-negative int, got {aux_dim!r}")
        self.k = k
        self.aux_dim = aux_dim

    def config(self) -> dict[str, Any]:
        return {"k": self.k, "aux_dim": self.aux_dim}

    def _init_states(self, units: int, device: torch.device) -> None:
        i64 = {"dtype": torch.int64, "device": device}
        self._states = {
            "values": torch.full((units, self.k), -torch.inf, dtype=torch.float64, device=device),
            "indices": torch.full((units, self.k), EMPTY, **i64),
            "aux": torch.full((units, self.k, self.aux_dim), -1, **i64),
            "nonfinite": torch.zeros(units, **i64),
        }

    def update(self, x: torch.Tensor, index: torch.Tensor | None = None,
               aux: torch.Tensor | None = None) -> None:
        """Fold in a batch.

        Args:
            x: ``(N, *unit_shape)``, flattened to ``(N, units)``.
            index: ``(N,)`` int64 global dataset index of every sample (required).
            aux: ``(N, units, aux_dim)`` int64 payload (``(N, *unit_shape, aux_dim)`` is accepted
                too); required iff ``aux_dim > 0``.
        """
        x = as_matrix(x).to(torch.float64)
        n, units = x.shape
        if index is None:
            raise ValueError("TopK.update needs index=: the global dataset index of every sample")
        index = torch.as_tensor(index, device=x.device)
        if index.dtype.is_floating_point or index.dtype == torch.bool or index.shape != (n,):
            raise ValueError(
                f"TopK.update: index must be an integer tensor of shape ({n},), got "
                f"{index.dtype} {tuple(index.shape)}"
            )
        index = index.to(torch.int64)
        if self.aux_dim > 0:
            if aux is None:
                raise ValueError(f"TopK(aux_dim={self.aux_dim}).update needs aux=")
            aux = torch.as_tensor(aux, device=x.device)
            if (aux.dtype.is_floating_point or aux.dim() < 2 or aux.shape[0] != n
                    or aux.shape[-1] != self.aux_dim or aux.numel() != n * units * self.aux_dim):
                raise ValueError(
                    f"TopK.update: aux must have shape ({n}, {units}, {self.aux_dim}), got "
                    f"{tuple(aux.shape)}"
                )
            aux = aux.reshape(n, units, self.aux_dim).to(torch.int64)
        elif aux is not None:
            raise ValueError("TopK.update got aux= but was built with aux_dim=0")
        if not self.initialized:
            self._init_states(units, x.device)
        s = self._states
        if units != s["values"].shape[0]:
            raise ValueError(f"TopK: expected {s['values'].shape[0]} units, got {units}")
        if n == 0:
            return
        nan = torch.isnan(x)
        s["nonfinite"] = s["nonfinite"] + (~torch.isfinite(x)).sum(0)
        vals = torch.where(nan, -torch.inf, x).T  # (U, N)
        idx = torch.where(nan, EMPTY, index.unsqueeze(1)).T
        if aux is None:
            aux_b = s["aux"].new_empty((units, n, 0))
        else:
            aux_b = torch.where(nan.unsqueeze(-1), -1, aux).transpose(0, 1)
        s["values"], s["indices"], s["aux"] = _select(
            torch.cat([s["values"], vals], 1), torch.cat([s["indices"], idx], 1),
            torch.cat([s["aux"], aux_b], 1), self.k)

    def _merge_states(self, theirs: dict[str, torch.Tensor]) -> None:
        s = self._states
        if theirs["values"].shape != s["values"].shape or theirs["aux"].shape != s["aux"].shape:
            raise MergeError(
                f"TopK: state shapes differ ({tuple(s['values'].shape)} vs "
                f"{tuple(theirs['values'].shape)})"
            )
        s["values"], s["indices"], s["aux"] = _select(
            torch.cat([s["values"], theirs["values"]], 1),
            torch.cat([s["indices"], theirs["indices"]], 1),
            torch.cat([s["aux"], theirs["aux"]], 1), self.k)

    def _sync_states(self, group: Any) -> bool:
        # fixed-shape states: gather them with all_gather (no pickling), then select once over the
        # concatenation in rank order, which equals merging the ranks one after another
        s = self._states
        world = dist.get_world_size(group)
        names = ["values", "indices"] + (["aux"] if self.aux_dim > 0 else [])
        gathered: dict[str, list[torch.Tensor]] = {}
        for name in names:
            mine = s[name].contiguous()
            gathered[name] = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(gathered[name], mine, group=group)
        if self.aux_dim == 0:
            gathered["aux"] = [s["aux"]] * world
        s["values"], s["indices"], s["aux"] = _select(
            torch.cat(gathered["values"], 1), torch.cat(gathered["indices"], 1),
            torch.cat(gathered["aux"], 1), self.k)
        self._all_reduce_elementwise(group)
        return True

    def compute(self) -> TopKResult:
        """The top-k values, indices, payload and number of filled slots of every unit."""
        self._require_initialized()
        s = self._states
        return TopKResult(
            values=s["values"].clone(),
            indices=s["indices"].clone(),
            aux=s["aux"].clone() if self.aux_dim > 0 else None,
            count=(s["indices"] != EMPTY).sum(1),
        )
