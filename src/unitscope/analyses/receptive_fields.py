"""Analytic receptive fields per layer, border layers and unproductive layers.

The receptive field (RF) of a unit is the input region that can influence it. For a chain of conv and
pool layers it follows a closed recurrence per spatial axis (see ``docs/receptive-fields-and-flops.md``):

* ``k_eff = d·(k − 1) + 1``
* ``r_out = r_in + (k_eff − 1)·j_in``
* ``j_out = j_in·s``
* ``start_out = start_in + ((k_eff − 1)/2 − p)·j_in``

starting from ``r = 1, j = 1, start = 0.5`` at the input. An upsampling step by s (``nn.Upsample``,
``nn.PixelShuffle``, a transposed convolution, ``F.interpolate``) gives ``j_out = j_in / s``; its r
and start are the averages over the s positions an output unit can take on the input grid (see
:func:`_mean_reads`). Branching graphs (residual additions, Inception concatenations) are traced with
:mod:`torch.fx`; a node with several inputs takes the input with the largest RF (the longest path, as
phd-lab's ``noskip`` models do).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..models.info import probe_dtype_device
from ..models.modes import preserved

__all__ = ["plot_receptive_fields", "receptive_fields", "unproductive_layers"]

_KERNEL_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                  nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                  *(getattr(nn, f"LPPool{n}d") for n in (1, 2, 3) if hasattr(nn, f"LPPool{n}d")))
_ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: input units an interpolation mode reads around the source position (nn.Upsample, F.interpolate)
_TAPS = {"nearest": 1, "nearest-exact": 1, "area": 1, "linear": 2, "bilinear": 2, "trilinear": 2,
         "bicubic": 4}
#: the largest denominator a float scale factor is rounded to (1.1 -> 11/10)
_SCALE_DENOMINATOR = 1024


@dataclass(frozen=True)
class _RF:
    """Receptive field state per spatial axis (height, width)."""

    r: tuple[float, float] = (1.0, 1.0)
    j: tuple[float, float] = (1.0, 1.0)
    start: tuple[float, float] = (0.5, 0.5)
    upsampled: bool = False  # an upsampling step lies on the path: r and start are averages

    def size(self) -> float:
        return max(self.r)


def _pair(value: Any) -> tuple[float, float]:
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            return float(value[0]), float(value[0])
        return float(value[0]), float(value[1])
    return float(value), float(value)


def _apply_kernel(rf: _RF, kernel: Any, stride: Any, padding: Any, dilation: Any = 1) -> _RF:
    k, s, d = _pair(kernel), _pair(stride if stride is not None else kernel), _pair(dilation)
    if isinstance(padding, str):  # "same" / "valid" in Conv2d
        p = tuple((d[a] * (k[a] - 1)) / 2 if padding == "same" else 0.0 for a in range(2))
    else:
        p = _pair(padding)
    r, j, start = [], [], []
    for a in range(2):
        k_eff = d[a] * (k[a] - 1) + 1
        r.append(rf.r[a] + (k_eff - 1) * rf.j[a])
        start.append(rf.start[a] + ((k_eff - 1) / 2 - p[a]) * rf.j[a])
        j.append(rf.j[a] * s[a])
    return _RF(tuple(r), tuple(j), tuple(start), rf.upsampled)  # type: ignore[arg-type]


def _spatial(shape: Any) -> tuple[int, int] | None:
    """The (H, W) of a batch of 2-D maps (N, C, H, W), else None."""
    if isinstance(shape, torch.Size) and len(shape) == 4:
        return int(shape[2]), int(shape[3])
    return None


def _global(rf: _RF, in_hw: tuple[int, int] | None, image: tuple[int, int]) -> _RF:
    """A layer connected to every position of its input: the RF covers the whole image."""
    n = in_hw or (1, 1)
    r = tuple(max(rf.r[a] + (n[a] - 1) * rf.j[a], float(image[a])) for a in range(2))
    j = tuple(rf.j[a] * n[a] for a in range(2))
    start = tuple(rf.start[a] + (n[a] - 1) / 2 * rf.j[a] for a in range(2))
    return _RF(r, j, start, rf.upsampled)  # type: ignore[arg-type]


def _adaptive(rf: _RF, in_hw: tuple[int, int] | None, out_hw: tuple[int, int] | None,
              image: tuple[int, int]) -> _RF:
    if in_hw is None or out_hw is None:
        return _global(rf, in_hw, image)
    if out_hw == (1, 1):
        return _global(rf, in_hw, image)
    if all(i % o == 0 for i, o in zip(in_hw, out_hw)):  # exactly a regular pool with k = s = in/out
        k = tuple(i // o for i, o in zip(in_hw, out_hw))
        return _apply_kernel(rf, k, k, 0)
    # Uneven bins: the widest bin spans ceil(in/out) + 1 positions, bins advance by in/out on average.
    k = tuple(math.ceil(i / o) + 1 for i, o in zip(in_hw, out_hw))
    s = tuple(i / o for i, o in zip(in_hw, out_hw))
    return _apply_kernel(rf, k, s, 0)


def _mean_reads(reads: Callable[[int], list[int]], count: int, step: Fraction) -> tuple[float, float]:
    """The RF growth and centre shift of a resampling step along one axis, in input units.

    Output unit ``o`` reads the input units ``reads(o)``; the linear model places it at ``o·step``
    (``step = j_out / j_in``). Over ``o = 0 .. count − 1`` (a whole period of the pattern), returns
    the mean span ``max − min`` of the units read (r grows by span·j_in) and the mean offset of
    their centre from ``o·step`` (start moves by offset·j_in). Units that read nothing (a transposed
    convolution whose kernel is smaller than its stride) are left out. With these means the
    recurrence gives the RF averaged over the unit positions; when every position reads the same
    span (nearest ×s followed by a kernel with k − 1 a multiple of s) it is every unit's RF.
    """
    spans, offsets = [], []
    for o in range(count):
        units = reads(o)
        if units:
            spans.append(Fraction(max(units) - min(units)))
            offsets.append(Fraction(max(units) + min(units), 2) - o * step)
    if not spans:
        return 0.0, 0.0
    return float(sum(spans) / len(spans)), float(sum(offsets) / len(offsets))


def _resample(rf: _RF, axes: list[tuple[float, float, Fraction]]) -> _RF:
    """Apply per-axis ``(span, offset, step)`` of :func:`_mean_reads`: ``j_out = j_in·step``."""
    r = tuple(rf.r[a] + span * rf.j[a] for a, (span, _, _) in enumerate(axes))
    start = tuple(rf.start[a] + offset * rf.j[a] for a, (_, offset, _) in enumerate(axes))
    j = tuple(rf.j[a] * float(step) for a, (_, _, step) in enumerate(axes))
    return _RF(r, j, start, True)  # type: ignore[arg-type]


def _transposed(rf: _RF, module: nn.Module) -> _RF:
    """A transposed convolution with stride s: output ``o`` reads input ``i`` when
    ``o + p − i·s = m·d`` for a kernel tap ``m``; ``j_out = j_in / s``."""
    k, s, p, d = (_pair(module.kernel_size), _pair(module.stride), _pair(module.padding),
                  _pair(module.dilation))
    axes = []
    for a in range(2):
        ka, sa, pa, da = int(k[a]), int(s[a]), int(p[a]), int(d[a])

        def reads(o: int, ka: int = ka, sa: int = sa, pa: int = pa, da: int = da) -> list[int]:
            return [(o + pa - m * da) // sa for m in range(ka) if (o + pa - m * da) % sa == 0]

        axes.append((*_mean_reads(reads, sa, Fraction(1, sa)), Fraction(1, sa)))
    return _resample(rf, axes)


def _interpolation_reads(mode: str, step: Fraction, align_corners: bool) -> Callable[[int], list[int]]:
    """The input units output ``o`` of ``F.interpolate(mode=...)`` reads (``step`` = in / out)."""
    taps = _TAPS[mode]

    def reads(o: int) -> list[int]:
        if mode == "nearest":
            return [math.floor(o * step)]
        if mode == "nearest-exact":
            return [math.floor((o + Fraction(1, 2)) * step)]
        if mode == "area":  # adaptive average pooling: the bin [⌊o·step⌋, ⌈(o + 1)·step⌉)
            return list(range(math.floor(o * step), math.ceil((o + 1) * step)))
        x = o * step if align_corners else (o + Fraction(1, 2)) * step - Fraction(1, 2)
        f = math.floor(x)
        if x == f:  # on an input unit: the other taps have weight 0
            return [f]
        return list(range(f - taps // 2 + 1, f + taps // 2 + 1))

    return reads


def _interpolation(rf: _RF, mode: str, scale_factor: Any, align_corners: bool | None,
                   recompute: bool | None, in_hw: tuple[int, int] | None,
                   out_hw: tuple[int, int] | None) -> _RF | None:
    """``nn.Upsample`` / ``F.interpolate`` / ``nn.PixelShuffle``; None when the scale is unknown."""
    if mode not in _TAPS:
        return None
    align = bool(align_corners) and _TAPS[mode] > 1
    axes = []
    for a in range(2):
        if align:  # unit o sits at o·(n_in − 1)/(n_out − 1): no period, average over the map
            if in_hw is None or out_hw is None:
                return None
            n_in, n_out = in_hw[a], out_hw[a]
            step = Fraction(n_in - 1, n_out - 1) if n_out > 1 else Fraction(0)
            count = n_out
        else:
            if scale_factor is not None and not recompute:
                scale = Fraction(_pair(scale_factor)[a]).limit_denominator(_SCALE_DENOMINATOR)
            elif in_hw is not None and out_hw is not None:
                scale = Fraction(out_hw[a], in_hw[a])
            else:
                return None
            step, count = 1 / scale, scale.numerator  # the pattern repeats every numerator units
        axes.append((*_mean_reads(_interpolation_reads(mode, step, align), count, step), step))
    return _resample(rf, axes)


def _unmodelled(rf: _RF, new: _RF | None, name: str, what: str) -> _RF:
    """``new``, or ``rf`` with a warning when the resampling could not be modelled."""
    if new is not None:
        return new
    warnings.warn(f"receptive_fields: {name} ({what}) resamples by a scale or mode the recurrence cannot "
                  "read (no scale_factor and no 2-D map); its RF is passed through unchanged", stacklevel=4)
    return rf


def _upsampling(module: nn.Module, name: str, rf: _RF, in_hw: tuple[int, int] | None,
                out_hw: tuple[int, int] | None) -> _RF | None:
    """The RF after an upsampling module; None when it is not one."""
    if isinstance(module, _TRANSPOSED):
        return _transposed(rf, module)
    if isinstance(module, nn.PixelShuffle):  # output o reads input o // s (of some channel)
        new = _interpolation(rf, "nearest", module.upscale_factor, None, None, in_hw, out_hw)
    elif isinstance(module, nn.Upsample):
        new = _interpolation(rf, module.mode, module.scale_factor, module.align_corners,
                             module.recompute_scale_factor, in_hw, out_hw)
    else:
        return None
    return _unmodelled(rf, new, name, type(module).__name__)


def _functional_upsampling(node: Any, rf: _RF, in_hw: tuple[int, int] | None,
                           out_hw: tuple[int, int] | None) -> _RF | None:
    """The RF after an ``F.interpolate`` / ``F.pixel_shuffle`` node; None for other nodes."""
    if node.target in (nn.functional.pixel_shuffle, torch.pixel_shuffle):
        factor = node.args[1] if len(node.args) > 1 else node.kwargs.get("upscale_factor")
        new = _interpolation(rf, "nearest", factor if isinstance(factor, int) else None, None, None,
                             in_hw, out_hw)
    elif node.target is nn.functional.interpolate:  # F.upsample* are traced as the call they make
        try:
            bound = inspect.signature(nn.functional.interpolate).bind(*node.args, **node.kwargs)
        except TypeError:
            new = None
        else:
            bound.apply_defaults()
            args = bound.arguments
            scale = args["scale_factor"]
            new = _interpolation(rf, args["mode"], scale if isinstance(scale, (int, float, tuple, list))
                                 else None, args["align_corners"], args["recompute_scale_factor"],
                                 in_hw, out_hw)
    else:
        return None
    return _unmodelled(rf, new, node.name, getattr(node.target, "__name__", str(node.target)))


_F = nn.functional
#: F.lp_pool1d/2d/3d (3-D from torch 2.2)
_LP_POOLS = tuple(getattr(_F, f"lp_pool{n}d") for n in (1, 2, 3) if hasattr(_F, f"lp_pool{n}d"))
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_MAX_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation")
_AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding")
#: functional kernel calls as torch.fx records them: target -> names of the positional arguments
_FUNCTIONAL_KERNELS: dict[Any, tuple[str, ...]] = {
    **dict.fromkeys((torch.conv1d, torch.conv2d, torch.conv3d), _CONV_ARGS),
    **dict.fromkeys((_F.max_pool1d, _F.max_pool2d, _F.max_pool3d, torch.max_pool1d, torch.max_pool2d,
                     torch.max_pool3d, _F.max_pool1d_with_indices, _F.max_pool2d_with_indices,
                     _F.max_pool3d_with_indices), _MAX_POOL_ARGS),
    **dict.fromkeys((_F.avg_pool1d, _F.avg_pool2d, _F.avg_pool3d, torch.avg_pool1d), _AVG_POOL_ARGS),
    **dict.fromkeys(_LP_POOLS, ("input", "norm_type", "kernel_size", "stride")),
    **dict.fromkeys((_F.pixel_unshuffle, torch.pixel_unshuffle), ("input", "downscale_factor")),
}


def _functional_kernel(node: Any, rf: _RF, collapses: bool) -> _RF | None:
    """The RF after a functional conv / pooling / pixel-unshuffle node; None for other nodes.

    The kernel of ``F.conv2d`` is read from the shape of its weight; a pooling stride left out (or
    ``[]``, as ``torch.max_pool2d`` defaults it) is the kernel size. Arguments computed at run time
    (graph nodes rather than constants) cannot be read: a call whose output is 1×1 (``collapses``,
    as ``F.avg_pool2d(x, x.shape[2:])``) is then left to the caller as global pooling (None), any
    other is passed through with a warning.
    """
    names = _FUNCTIONAL_KERNELS.get(node.target)
    if names is None:
        return None
    args = {**dict(zip(names, node.args)), **node.kwargs}
    if "downscale_factor" in args:
        args = {"kernel_size": args["downscale_factor"], "stride": args["downscale_factor"]}
    elif "weight" in args:
        meta = getattr(args["weight"], "meta", {}).get("tensor_meta")
        args["kernel_size"] = tuple(meta.shape[2:]) if meta is not None and len(meta.shape) > 2 else None
        args.setdefault("stride", 1)
    values = [args.get(key) for key in ("kernel_size", "stride", "padding", "dilation")]
    if values[0] is None or any(isinstance(v, torch.fx.Node) or (isinstance(v, (tuple, list)) and any(
            isinstance(e, torch.fx.Node) for e in v)) for v in values):
        if collapses:
            return None
        what = getattr(node.target, "__name__", node.target)
        warnings.warn(f"receptive_fields: {node.name} ({what}) takes its kernel, stride or padding from a "
                      "value the traced graph does not hold (computed at run time), so the recurrence "
                      "cannot read it; its RF is passed through unchanged", stacklevel=4)
        return rf
    kernel, stride, padding, dilation = values
    stride = kernel if stride is None or (isinstance(stride, (tuple, list)) and not stride) else stride
    padding = 0 if padding is None else padding
    return _apply_kernel(rf, kernel, stride, padding, 1 if dilation is None else dilation)


def _module_rf(module: nn.Module, name: str, rf: _RF, in_hw: tuple[int, int] | None,
               out_hw: tuple[int, int] | None, image: tuple[int, int]) -> _RF:
    if isinstance(module, _KERNEL_LAYERS):
        dilation = getattr(module, "dilation", 1)
        padding = getattr(module, "padding", 0)  # LPPool has none
        return _apply_kernel(rf, module.kernel_size, module.stride, padding, dilation)
    if isinstance(module, _ADAPTIVE):
        return _adaptive(rf, in_hw, out_hw, image)
    if isinstance(module, nn.PixelUnshuffle):  # an s×s block per output unit: kernel s, stride s
        s = int(module.downscale_factor)
        return _apply_kernel(rf, s, s, 0, 1)
    upsampled = _upsampling(module, name, rf, in_hw, out_hw)
    if upsampled is not None:
        return upsampled
    if in_hw is not None and out_hw is None:  # Linear on a flattened map etc.: sees everything
        return _global(rf, in_hw, image)
    if in_hw is not None and out_hw is not None and out_hw != in_hw and out_hw == (1, 1):
        return _global(rf, in_hw, image)
    return rf  # element-wise: activations, BN, dropout, identity


class _RunError(RuntimeError):
    """The model itself failed on the probe input (not a tracing problem)."""


def _run_message(model: nn.Module, x: torch.Tensor, exc: BaseException | None) -> str:
    first = str(exc).strip().splitlines()[0][:160] if exc is not None and str(exc).strip() else ""
    return (f"{type(model).__name__} failed on a {tuple(x.shape)} input ({type(exc).__name__}: {first}); "
            "pass an input_size the model accepts (its maps must not shrink below 1 pixel)")


def _image_size(input_size: int | tuple[int, int] | tuple[int, int, int]) -> tuple[int, int]:
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        size: tuple[int, ...] = (input_size, input_size)
    else:
        try:
            values = tuple(input_size)
            size = tuple(int(v) for v in values)
        except (TypeError, ValueError):
            values = size = ()
        if any(float(v) != int(v) for v in values):  # 8.5 must not silently become 8
            raise ValueError(f"input_size={input_size!r}: the sizes must be whole pixels")
        if len(size) == 3:  # (C, H, W)
            size = size[1:]
        if len(size) != 2:
            raise ValueError(f"input_size must be an int or (H, W) (or (C, H, W)), got {input_size!r}")
    if min(size) < 1:
        raise ValueError(f"input_size={input_size!r}: the image side must be a positive size, e.g. "
                         "input_size=224 or (224, 224)")
    return size  # type: ignore[return-value]


def _in_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv1d, nn.Conv3d, *_TRANSPOSED)):
            return int(module.in_channels)
    return 3


def _trace_fx(model: nn.Module, x: torch.Tensor, image: tuple[int, int]
              ) -> list[tuple[str, nn.Module, _RF, _RF, tuple[int, int] | None, int, tuple[str, ...]]]:
    """Per call_module node: (name, module, rf, input rf, output hw, node index, enclosing modules)."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = torch.fx.symbolic_trace(model)
    try:
        ShapeProp(gm).propagate(x)
    except Exception as exc:
        raise _RunError(exc) from exc
    state: dict[Any, _RF] = {}
    hw: dict[Any, tuple[int, int] | None] = {}
    calls = []
    modules = dict(model.named_modules())
    for index, node in enumerate(gm.graph.nodes):
        meta = node.meta.get("tensor_meta")
        out_hw = _spatial(getattr(meta, "shape", None))
        hw[node] = out_hw
        inputs = [n for n in node.all_input_nodes if n in state]
        if node.op == "placeholder":
            state[node] = _RF()
            continue
        if not inputs:
            state[node] = _RF()
            continue
        src = max(inputs, key=lambda n: state[n].size())  # the longest path
        rf, in_hw = state[src], hw[src]
        if node.op == "call_module":
            module = modules[node.target]
            new = _module_rf(module, node.target, rf, in_hw, out_hw, image)
            stack = tuple(node.meta.get("nn_module_stack", {}).keys())
            calls.append((node.target, module, new, rf, out_hw, index, stack))
        elif (node.op == "call_function"
              and (functional := _functional_upsampling(node, rf, in_hw, out_hw)) is not None):
            new = functional
        elif node.op == "call_function" and (kernel := _functional_kernel(
                node, rf, in_hw is not None and out_hw == (1, 1) != in_hw)) is not None:
            new = kernel
        elif in_hw is not None and out_hw is not None and out_hw == (1, 1) and in_hw != (1, 1):
            new = _global(rf, in_hw, image)  # functional global pooling (F.adaptive_avg_pool2d)
        elif in_hw is not None and out_hw is None and node.op != "output":
            new = rf  # flatten / view: keeps the RF of the map it came from
        else:
            new = rf
        state[node] = new
        hw[node] = out_hw
    return calls


def _trace_hooks(model: nn.Module, x: torch.Tensor, image: tuple[int, int]
                 ) -> list[tuple[str, nn.Module, _RF, _RF, tuple[int, int] | None, int, tuple[str, ...]]]:
    """Fallback: chain the leaf modules in execution order (phd-lab's assumption)."""
    order: list[tuple[str, nn.Module, tuple[int, int] | None, tuple[int, int] | None]] = []
    handles = []

    def make(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            in_shape = args[0].shape if args and isinstance(args[0], torch.Tensor) else None
            out_shape = output.shape if isinstance(output, torch.Tensor) else None
            order.append((name, module, _spatial(in_shape), _spatial(out_shape)))
        return hook

    try:
        for name, module in model.named_modules():
            if name and not any(True for _ in module.children()):
                handles.append(module.register_forward_hook(make(name)))
        model(x)
    finally:
        for h in handles:
            h.remove()
    calls = []
    rf = _RF()
    for index, (name, module, in_hw, out_hw) in enumerate(order):
        new = _module_rf(module, name, rf, in_hw, out_hw, image)
        parts = name.split(".")
        stack = tuple(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        calls.append((name, module, new, rf, out_hw, index, stack))
        rf = new
    return calls


def receptive_fields(model: nn.Module, input_size: int | tuple[int, ...]) -> pd.DataFrame:
    """The analytic receptive field of every module that outputs a 2-D map, in execution order.

    Args:
        model: a PyTorch model taking (N, C, H, W) images; the number of input channels is read
            from its first convolution, and the trace input has the dtype and device of its
            parameters (a float64 model is traced in float64).
        input_size: the image size, an int for square images or (H, W) (a (C, H, W) shape is also
            accepted).

    Returns:
        A DataFrame with columns ``layer`` (``named_modules()`` name; containers such as
        ``layer4`` get the RF of their output), ``type``, ``rf_size`` (max over the two axes),
        ``jump`` (product of strides), ``start`` (centre of unit 0's RF in input pixels),
        ``output_size`` (map height), ``input_rf_size`` (the RF of the layer's input) and
        ``border`` (the RF covers the whole input on both axes). ``table.attrs["input_size"]``
        holds (H, W); ``table.attrs["upsampled"]`` lists the layers with an upsampling step on
        their path, whose ``rf_size`` and ``start`` are averages over their units' positions
        (``jump`` may then be fractional). A module called several times (a shared ReLU) reports
        its largest RF.

    Raises:
        ValueError: ``input_size`` is not a positive size, or the model cannot run on it.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        >>> table = receptive_fields(net, 8)
        >>> table["rf_size"].tolist(), table["output_size"].tolist()
        ([3, 3, 5], [6, 6, 4])
    """
    image = _image_size(input_size)
    dtype, device = probe_dtype_device(model)
    x = torch.zeros(1, _in_channels(model), *image, dtype=dtype or torch.get_default_dtype(), device=device)
    with preserved(model):
        model.eval()
        with torch.no_grad():
            try:
                calls = _trace_fx(model, x, image)
            except _RunError as exc:
                raise ValueError(_run_message(model, x, exc.__cause__)) from exc.__cause__
            except Exception as exc:
                warnings.warn(
                    f"receptive_fields: torch.fx could not trace {type(model).__name__} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                    "falling back to execution order, which treats the model as a chain and is wrong "
                    "for branches. Make the forward fx-traceable for exact results.", stacklevel=2)
                try:
                    calls = _trace_hooks(model, x, image)
                except Exception as run_exc:
                    raise ValueError(_run_message(model, x, run_exc)) from run_exc

    modules = dict(model.named_modules())
    # best[name] = (rf, input rf, out hw, index of the call that finished the module)
    best: dict[str, tuple[_RF, _RF, tuple[int, int] | None, int]] = {}
    for name, _module, rf, in_rf, out_hw, index, _stack in calls:
        prev = best.get(name)
        if prev is None or rf.size() >= prev[0].size():
            best[name] = (rf, in_rf, out_hw, index)
    # Containers: the output of their last call within them.
    first_in: dict[str, _RF] = {}
    for name, _module, rf, in_rf, out_hw, index, stack in calls:
        for outer in stack:
            if outer == name or outer not in modules:
                continue
            first_in.setdefault(outer, in_rf)
            best[outer] = (rf, first_in[outer], out_hw, index)
    depth = {name: name.count(".") for name in best}
    rows, upsampled = [], []
    for name in sorted(best, key=lambda n: (best[n][3], -depth[n])):
        rf, in_rf, out_hw, _ = best[name]
        if out_hw is None or not name:
            continue
        if rf.upsampled:
            upsampled.append(name)
        rows.append({
            "layer": name,
            "type": type(modules[name]).__name__,
            "rf_size": _num(rf.size()),
            "jump": _num(rf.j[0]),
            "start": rf.start[0],
            "output_size": out_hw[0],
            "input_rf_size": _num(in_rf.size()),
            "input_jump": _num(max(in_rf.j)),
            "kernel_size": _kernel_size(modules[name]),
            "border": bool(rf.r[0] >= image[0] and rf.r[1] >= image[1]),
        })
    table = pd.DataFrame(rows, columns=["layer", "type", "rf_size", "jump", "start", "output_size",
                                        "input_rf_size", "input_jump", "kernel_size", "border"])
    table.attrs["input_size"] = image
    table.attrs["upsampled"] = upsampled
    return table


def _kernel_size(module: nn.Module) -> float:
    """The largest side of a finite kernel (conv, pooling), NaN for modules without one."""
    k = getattr(module, "kernel_size", None)
    if k is None:
        return float("nan")
    return float(max(_pair(k)))


def _num(value: float) -> int | float:
    """An int for a whole number to 1e-9 (after upsampling steps a jump of 1/5 · 1/5 · 25 is
    1.0000000000000002 in floats: it reports 1); other values unchanged."""
    rounded = round(float(value), 9)
    return int(rounded) if rounded.is_integer() else float(value)


def unproductive_layers(table: pd.DataFrame, types: tuple[str, ...] | None = ("Conv2d",),
                        input_size: int | tuple[int, int] | None = None, rule: str = "any") -> pd.DataFrame:
    """The layers that can add no new context: rfa_toolbox's border rules, on the longest path.

    * Rule (a): the layer's input already has an RF at least the input resolution
      (``input_rf_size >= size``) and its own RF exceeds it (``rf_size > size``): it sits after
      the point where the RF covered the image.
    * Rule (b): the layer has a finite kernel and its input feature map (``size // input_jump``)
      is no larger than that kernel: every unit sees the whole map, so the layer "behaves like a
      fully-connected layer".

    Args:
        table: the output of :func:`receptive_fields`.
        types: module types to keep (default conv layers only, as in the papers); None keeps all.
        input_size: the resolution to test against; default ``table.attrs["input_size"]``
            (for non-square inputs the larger side).
        rule: ``"a"``, ``"b"`` or ``"any"`` (either, rfa_toolbox's ``is_border``; the default).

    Returns:
        The flagged rows of ``table``, with boolean columns ``rule_a`` and ``rule_b``.

    Example:
        >>> import torchvision
        >>> table = receptive_fields(torchvision.models.vgg16().features, 64)
        >>> unproductive_layers(table)["layer"].tolist()
        ['21', '24', '26', '28']
        >>> at_32 = receptive_fields(torchvision.models.vgg16().features, 32)
        >>> unproductive_layers(at_32, rule="b")["layer"].tolist()  # conv5_x see 2x2 maps
        ['24', '26', '28']
    """
    if rule not in ("a", "b", "any"):
        raise ValueError(f"rule={rule!r}: use 'a', 'b' or 'any'")
    if input_size is None:
        if "input_size" not in table.attrs:
            raise ValueError("the table has no attrs['input_size']; pass input_size= or use the table "
                             "returned by receptive_fields")
        input_size = table.attrs["input_size"]
    size = max(_image_size(input_size))
    out = table.copy()
    out["rule_a"] = (out["input_rf_size"] >= size) & (out["rf_size"] > size)
    out["rule_b"] = out["kernel_size"].notna() & (size // out["input_jump"] <= out["kernel_size"])
    mask = out["rule_a"] | out["rule_b"] if rule == "any" else out[f"rule_{rule}"]
    if types is not None:
        mask &= out["type"].isin(types)
    return out[mask].reset_index(drop=True)


def plot_receptive_fields(table: pd.DataFrame, ax: Any = None) -> Any:
    """Bar chart of ``rf_size`` per layer, a line at the input size, border layers highlighted.

    Args:
        table: the output of :func:`receptive_fields`.
        ax: a matplotlib Axes to draw on; default a new figure.

    Returns:
        The matplotlib Figure (never shown).

    Example:
        >>> from torch import nn
        >>> fig = plot_receptive_fields(receptive_fields(nn.Sequential(nn.Conv2d(3, 4, 3)), 8))
        >>> type(fig).__name__
        'Figure'
    """
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(max(6.0, 0.25 * len(table)), 4.0))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    positions = range(len(table))
    colors = ["tab:red" if b else "tab:blue" for b in table["border"]]
    ax.bar(list(positions), table["rf_size"].astype(float).tolist(), color=colors)
    size = table.attrs.get("input_size")
    if size is not None:
        ax.axhline(max(size), color="black", linestyle="--", linewidth=1,
                   label=f"input size {size[0]}×{size[1]}")
        ax.legend(loc="upper left")
    ax.set_xticks(list(positions))
    ax.set_xticklabels(table["layer"].tolist(), rotation=90, fontsize=7)
    ax.set_ylabel("receptive field (pixels)")
    ax.set_title("Receptive field per layer (red: border layers, RF ≥ input)")
    fig.tight_layout()
    return fig
