"""FLOPs and parameters per layer for one inference, counted by torch's own ``FlopCounterMode``.

``torch.utils.flop_counter.FlopCounterMode`` counts the floating-point operations of the aten ops a
forward runs (convolutions, matrix products, attention), attributing them to the module that ran
them. One multiply-accumulate counts as 2 FLOPs. Element-wise ops (activations, BN, pooling, additions)
are not counted, so the totals match the usual "2 × MACs of conv and linear layers".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..models.info import check_input_shape, forward_checked, probe_dtype_device
from ..models.modes import preserved

__all__ = ["flops", "flops_total"]


def _input(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> torch.Tensor:
    input_shape = check_input_shape(model, input_shape)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    dtype, device = probe_dtype_device(model)
    return torch.zeros(batch_size, *input_shape, device=device, dtype=dtype or torch.get_default_dtype())


@contextmanager
def _no_fused_attention() -> Iterator[None]:
    """Switch off the fused fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``.

    In eval mode under ``no_grad`` they run one fused kernel that the flop counter does not see, so
    a transformer counted 0 FLOPs. The switch (``torch.backends.mha``, torch >= 2.2) is restored,
    and attention itself runs on its math backend (see ``_math_attention``).
    """
    with ExitStack() as stack:
        mha = getattr(torch.backends, "mha", None)
        if mha is not None and hasattr(mha, "set_fastpath_enabled"):
            before = mha.get_fastpath_enabled()
            mha.set_fastpath_enabled(False)
            stack.callback(mha.set_fastpath_enabled, before)
        stack.enter_context(_math_attention())
        yield


def _math_attention() -> Any:
    """``scaled_dot_product_attention`` on its math backend, made of counted matrix products.

    Which fused kernel torch picks (and whether the counter knows it) depends on the version and
    device: torch 2.11 on the CPU counted 20480 FLOPs for a transformer layer that costs 22080.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no backend switch, the default path
        return nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _count(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> tuple[dict[str, int], int]:
    """FLOPs per ``named_modules()`` name (containers included) and the grand total."""
    from torch.utils.flop_counter import FlopCounterMode

    x = _input(model, input_shape, batch_size)
    with preserved(model), torch.no_grad(), _no_fused_attention(), \
            FlopCounterMode(display=False, depth=None) as counter:
        model.eval()
        forward_checked(model, x)
    total = int(counter.get_total_flops())
    root = type(model).__name__
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        # keys are "<RootClass>.<dotted named_modules() name>"; the root itself is "<RootClass>"
        name = key[len(root) + 1:] if key.startswith(root + ".") else ("" if key == root else key)
        per_module[name] = int(sum(ops.values()))
    return per_module, total


def flops(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1) -> pd.DataFrame:
    """FLOPs and parameters of every leaf module for one forward of ``batch_size`` samples.

    Args:
        model: the model; it is run once in eval mode under ``torch.no_grad()``.
        input_shape: the shape of one sample without the batch dimension, e.g. (3, 224, 224);
            ``unitscope.models.registry.default_input_shape(name)`` gives a registered model's.
        batch_size: samples in the forward; FLOPs scale linearly with it.

    Raises:
        ValueError: ``input_shape`` is not a shape of positive sizes, or ``batch_size`` < 1.
        unitscope.InputError: the model cannot run on ``input_shape`` (the message names the shape
            it declares, if any).

    Returns:
        A DataFrame with columns ``layer`` (``named_modules()`` name), ``type``, ``flops`` (a
        multiply-accumulate counts 2) and ``parameters`` (the module's own), one row per leaf
        module in ``named_modules()`` order, and one per module with parameters of its own beside
        its children (``nn.MultiheadAttention``: its in-projection and the products its children
        did not run), so the rows' parameters add up to the model's. FLOPs run outside any leaf
        (functional calls in a ``forward``) are not in the rows; :func:`flops_total` includes them.

    Example:
        >>> from torch import nn
        >>> flops(nn.Sequential(nn.Linear(10, 5), nn.ReLU()), (10,)).to_dict("list")
        {'layer': ['0', '1'], 'type': ['Linear', 'ReLU'], 'flops': [100, 0], 'parameters': [55, 0]}
    """
    per_module, _ = _count(model, input_shape, batch_size)
    rows = []
    counted: set[int] = set()  # a parameter shared by two modules (tied weights) counts in the first
    for name, module in model.named_modules():
        mine = [p for p in module.parameters(recurse=False) if id(p) not in counted]
        counted.update(id(p) for p in mine)
        own = sum(p.numel() for p in mine)
        children = list(module.named_children())
        if children and not own:  # a container: its leaves have the rows
            continue
        if not name and len(list(model.modules())) > 1 and not own:
            continue
        # a module with parameters of its own and children (nn.MultiheadAttention's in-projection)
        # gets the FLOPs its children did not run
        prefix = f"{name}." if name else ""
        inner = sum(per_module.get(prefix + child, 0) for child, _ in children)
        rows.append({"layer": name, "type": type(module).__name__,
                     "flops": per_module.get(name, 0) - inner, "parameters": own})
    return pd.DataFrame(rows, columns=["layer", "type", "flops", "parameters"])


def flops_total(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1) -> dict[str, int]:
    """Total FLOPs of one forward of ``batch_size`` samples and the model's parameter count.

    Example:
        >>> from torch import nn
        >>> flops_total(nn.Conv2d(3, 8, 3, padding=1), (3, 16, 16))
        {'flops': 110592, 'parameters': 224}
    """
    _, total = _count(model, input_shape, batch_size)
    return {"flops": total, "parameters": sum(p.numel() for p in model.parameters())}
