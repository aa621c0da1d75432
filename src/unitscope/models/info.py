"""What a model is made of: one row per module with its type, output shape and parameters.

Also the input-shape checks that :func:`layer_info`, :func:`unitscope.analyses.flops.flops` and
:func:`unitscope.attribution.attribute` share: :func:`check_input_shape` compares the shape of one
sample with the model's declared ``input_shape`` and :func:`forward_checked` turns a forward that
fails on a wrong shape into an error naming the expected and the given shape.
"""

from __future__ import annotations

import numbers
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..units import UnitLayout
from .modes import preserved


def _input_error(message: str) -> ValueError:
    from ..engine import InputError  # lazy: the engine imports this package

    return InputError(message)


def _expects(model: nn.Module) -> str:
    expected = getattr(model, "input_shape", None)
    return f"{tuple(expected)} (channels, height, width)" if expected is not None else ""


def check_input_shape(model: nn.Module, shape: Any, what: str = "input_shape") -> tuple[int, ...]:
    """The shape of one sample as a tuple of positive ints, checked against ``model.input_shape``.

    Args:
        model: the network; when it declares ``input_shape``, a sample must have as many
            dimensions and the same channel count (the spatial size may differ: models with
            global pooling take any size, and a forward of the wrong size fails in
            :func:`forward_checked`).
        shape: the shape of one sample, without the batch dimension.
        what: the argument's name, for the message.

    Raises:
        ValueError: ``shape`` is not a sequence of positive ints.
        unitscope.InputError: ``shape`` does not fit the model's declared input shape.
    """
    if isinstance(shape, (int, str)) or not hasattr(shape, "__len__") or len(shape) < 1 or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in shape):
        raise ValueError(f"{what}={shape!r}: give the shape of one sample as positive sizes, "
                         "e.g. (3, 224, 224) (channels, height, width)")
    shape = tuple(int(v) for v in shape)
    expected = getattr(model, "input_shape", None)
    if expected is not None and (len(shape) != len(expected) or shape[0] != expected[0]):
        raise _input_error(f"{type(model).__name__} expects one sample of shape {_expects(model)}, but "
                           f"{what} is {shape}; pass {tuple(expected)} or pick the matching model")
    return shape


def probe_dtype_device(model: nn.Module) -> tuple[torch.dtype | None, torch.device]:
    """The dtype and device a probe input for ``model`` needs: those of its first floating-point
    parameter (or buffer); the dtype is None (any) for a model without one, on the CPU if it has
    no tensors at all.

    Example:
        >>> from torch import nn
        >>> probe_dtype_device(nn.Conv2d(1, 1, 3).double())
        (torch.float64, device(type='cpu'))
    """
    tensors = [*model.parameters(), *model.buffers()]
    for t in tensors:
        if t.is_floating_point():
            return t.dtype, t.device
    return None, tensors[0].device if tensors else torch.device("cpu")


def _out_of_memory(exc: RuntimeError) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA, MPS or the CPU allocator), not a shape error."""
    text = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text


def forward_checked(model: nn.Module, x: torch.Tensor, hint: str | None = None) -> Any:
    """``model(x)``; a forward that fails on the shape of ``x`` raises an error naming both shapes.

    A ``RuntimeError`` of the forward (torch's conv / matmul shape errors) becomes
    :class:`unitscope.InputError` naming the given sample shape, the declared one if the model
    has it, and torch's own message, then ``hint`` (what the caller's user should change) when the
    model declares no shape. Out-of-memory errors, a :class:`unitscope.capture.StopForward` and
    failures on a sample of exactly the declared shape (not a shape problem) are raised unchanged.
    """
    from ..capture import CaptureError  # lazy, as the engine's import

    try:
        return model(x)
    except CaptureError:  # about the layers, not the input
        raise
    except RuntimeError as exc:
        if _out_of_memory(exc):
            raise
        given = tuple(x.shape[1:])
        expected = getattr(model, "input_shape", None)
        if expected is not None and given == tuple(expected):
            raise
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if expected is not None:
            hint = f"it expects {_expects(model)}"
        elif hint is None:
            hint = "give the shape one sample of its data has, (channels, height, width)"
        raise _input_error(f"{type(model).__name__} cannot run on samples of shape {given} ({first}); "
                           f"{hint}") from exc


def layer_info(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> pd.DataFrame:
    """A table of ``model``'s modules: name, type, input and output shape, channels, parameters.

    ``channels`` counts the units: dim 1 of a convolution's output, the last axis of a token map
    or channels-last block (see :class:`unitscope.units.UnitLayout`).

    Output shapes come from one forward of a zero batch of ``input_shape`` (channels, height,
    width), or of ``model.input_shape`` when the model declares it; without either they are empty.

    Raises:
        ValueError: ``input_shape`` is not a shape of positive sizes.
        unitscope.InputError: the model cannot run on ``input_shape`` (the message names the shape it
            declares, if any).

    Example:
        >>> import unitscope
        >>> from unitscope.models.info import layer_info
        >>> info = layer_info(unitscope.load_model("digits-cnn"))
        >>> info.set_index("name").loc["conv2", "output_shape"]
        '(32, 8, 8)'
    """
    if input_shape is not None:
        input_shape = check_input_shape(model, input_shape)
    else:
        input_shape = getattr(model, "input_shape", None)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], int | None]] = {}
    if input_shape is not None:
        handles = []
        units = UnitLayout(model)

        def make(name: str):
            def hook(module: nn.Module, args: tuple, output: object) -> None:
                if name not in shapes and isinstance(output, torch.Tensor) and args \
                        and isinstance(args[0], torch.Tensor):
                    width = int(output.shape[units.axis(name, output)]) if output.dim() > 1 else None
                    shapes[name] = (tuple(args[0].shape[1:]), tuple(output.shape[1:]), width)
            return hook

        try:
            handles.append(units.watch())
            for name, module in model.named_modules():
                if name:
                    handles.append(module.register_forward_hook(make(name)))
            dtype, device = probe_dtype_device(model)
            x = torch.zeros(1, *input_shape, dtype=dtype or torch.get_default_dtype(), device=device)
            with preserved(model), torch.inference_mode():
                model.eval()
                forward_checked(model, x)
        finally:
            for h in handles:
                h.remove()
    rows = []
    for name, module in model.named_modules():
        if not name:
            continue
        shape = shapes.get(name)
        rows.append({
            "name": name,
            "type": type(module).__name__,
            "input_shape": str(shape[0]) if shape else "",
            "output_shape": str(shape[1]) if shape else "",
            "channels": shape[2] if shape else None,
            "parameters": sum(p.numel() for p in module.parameters(recurse=False)),
            "leaf": not any(True for _ in module.children()),
        })
    return pd.DataFrame(rows)
