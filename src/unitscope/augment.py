"""Parametrised augmentations: the input variables of sensitivity analysis.

Each augmentation is a named *variable* with one or more scalar parameters, each with a range.
A design point ``u`` in the unit cube (one column per parameter) is mapped linearly onto the
ranges, and every image of a batch is augmented with its own parameters, in float, in one
vectorised step per augmentation (no PIL, no uint8 round trip, no renormalisation afterwards).

The augmentations are those of Kharyuk et al.'s sensitivity study (spec A.3), set 1 and set 2;
switches (``hflip``, ``grayscale``, ``sharpness``) have one parameter ``u`` in [0, 1] and are
applied when ``u <= 0.5``. Geometric parameters are fractions of the image side, so a range
means the same at any resolution (at 224 px they are the seed's pixel ranges).

The augmentations are always composed in this fixed order, whatever order they are listed in
(colour first, then filters, then geometry, then erasing so an erased box stays black):

    brightness, contrast, saturation, hue, grayscale, sharpness, blur, local_blur, hflip,
    rotation, roll, erasing, then user-registered variables in registration order.

Images are float tensors in [0, 1] with 1 or 3 channels; ``saturation``, ``hue`` and
``grayscale`` need 3 channels. Register your own variable with :func:`register_variable`.

Example:
    >>> import torch
    >>> aug = Augmenter(["brightness", ("hflip", None)])
    >>> aug.columns
    ['brightness.factor', 'hflip.u']
    >>> x = torch.full((2, 3, 8, 8), 0.2)
    >>> y = aug(x, torch.tensor([[0.0, 0.9], [1.0, 0.1]]))  # factors 0.1 and 2.5
    >>> [round(v, 4) for v in y.mean((1, 2, 3)).tolist()]
    [0.02, 0.5]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "SETS",
    "VARIABLES",
    "AugmentError",
    "Augmenter",
    "Param",
    "Variable",
    "hsv_to_rgb",
    "register_variable",
    "rgb_to_hsv",
]


class AugmentError(ValueError):
    """A variable, range or image that the augmentations cannot use; the message names the fix."""


@dataclass(frozen=True)
class Param:
    """One scalar parameter of a variable: its default range and the domain a range must lie in."""

    name: str
    low: float
    high: float
    domain: tuple[float, float]


@dataclass(frozen=True)
class Variable:
    """A named augmentation: its parameters and ``fn(x (n,C,H,W), values (n, k)) -> x``."""

    name: str
    params: tuple[Param, ...]
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    rgb: bool = False
    doc: str = ""

    @property
    def switch(self) -> bool:
        """Whether this is an on/off augmentation (one parameter ``u``, applied when ``u <= 0.5``)."""
        return self.params == _SWITCH


#: every registered variable by name, in the fixed order of application
VARIABLES: dict[str, Variable] = {}

#: the seed's two augmentation sets (spec A.3), under unitscope's names
SETS: dict[int, tuple[str, ...]] = {
    1: ("erasing", "sharpness", "roll", "grayscale", "blur"),
    2: ("brightness", "contrast", "saturation", "hue", "hflip", "rotation", "local_blur"),
}


def register_variable(name: str, params: Sequence[Param], rgb: bool = False
                      ) -> Callable[[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], Any]:
    """Decorator that registers ``fn(x, values)`` as variable ``name`` (applied after the built-ins).

    ``x`` is a float batch ``(n, C, H, W)`` in [0, 1] and ``values`` an ``(n, len(params))`` tensor
    of parameter values (already mapped onto the ranges); ``fn`` returns the augmented batch and
    must treat every row with its own values, vectorised. ``rgb=True`` marks variables that need
    3 channels.

    Example:
        >>> @register_variable("doc_gamma", [Param("gamma", 0.5, 2.0, (1e-3, 10.0))])
        ... def _gamma(x, v):
        ...     return x.clamp(min=0) ** v[:, 0, None, None, None]
        >>> Augmenter(["doc_gamma"]).columns
        ['doc_gamma.gamma']
        >>> del VARIABLES["doc_gamma"]
    """
    def deco(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Any:
        if name in VARIABLES:
            raise AugmentError(f"variable {name!r} is already registered; pick another name")
        for p in params:
            _check_range(name, p, p.low, p.high)
        VARIABLES[name] = Variable(name, tuple(params), fn, rgb, (fn.__doc__ or "").strip())
        return fn
    return deco


def _check_range(var: str, p: Param, low: float, high: float) -> None:
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise AugmentError(f"{var}.{p.name}: range [{low}, {high}] is empty; give low < high "
                           f"within {list(p.domain)}")
    if low < p.domain[0] or high > p.domain[1]:
        raise AugmentError(f"{var}.{p.name}: range [{low}, {high}] leaves the valid domain "
                           f"{list(p.domain)}; choose a range inside it")


# --------------------------------------------------------------------------- colour helpers
def _col(v: torch.Tensor, i: int = 0) -> torch.Tensor:
    """Column ``i`` of the values, shaped to broadcast over (n, C, H, W)."""
    return v[:, i].to(torch.float32)[:, None, None, None]


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma ``(n, 1, H, W)`` with ITU-R 601 weights (as torchvision's ``rgb_to_grayscale``)."""
    if x.shape[1] == 1:
        return x
    return (x * _luma_weights(x).view(1, 3, 1, 1)).sum(1, keepdim=True)


def _luma_weights(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor([0.2989, 0.587, 0.114], dtype=x.dtype, device=x.device)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """HSV of RGB images ``(..., 3, H, W)`` in [0, 1]; hue in [0, 1), as ``colorsys.rgb_to_hsv``.

    Example:
        >>> rgb_to_hsv(torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)).flatten().tolist()
        [0.3333333432674408, 1.0, 1.0]
    """
    r, g, b = x.unbind(-3)
    v, _ = x.max(-3)
    c = v - x.min(-3).values
    s = torch.where(v > 0, c / torch.where(v > 0, v, 1), 0)
    safe = torch.where(c > 0, c, 1)
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(c > 0, torch.remainder(h / 6, 1.0), 0)
    return torch.stack([h, s, v], dim=-3)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """RGB of HSV images ``(..., 3, H, W)`` (inverse of :func:`rgb_to_hsv`)."""
    h, s, v = x.unbind(-3)
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], device=x.device).view(3, 1, 1) + 6 * h.unsqueeze(-3), 6)
    return v.unsqueeze(-3) * (1 - s.unsqueeze(-3) * torch.clamp(torch.minimum(k, 4 - k), 0, 1))


def _blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (reflect padding), as grouped convolutions."""
    n, c, h, w = x.shape
    t = torch.arange(size, device=x.device, dtype=x.dtype) - (size - 1) / 2
    k = torch.exp(-t[None] ** 2 / (2 * sigma.to(x.dtype)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n·C, size)
    y = F.pad(x.reshape(1, n * c, h, w), (size // 2,) * 4, mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    return y.reshape(n, c, h, w)


def _switch(x: torch.Tensor, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.where(_col(v) <= 0.5, y, x)


def _grid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device, dtype=torch.float32)[None, :, None]
    cols = torch.arange(w, device=x.device, dtype=torch.float32)[None, None, :]
    return rows, cols


# --------------------------------------------------------------------------- the built-ins
_SWITCH = (Param("u", 0.0, 1.0, (0.0, 1.0)),)


@register_variable("brightness", [Param("factor", 0.1, 2.5, (0.0, math.inf))])
def _brightness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multiply by the factor, clip to [0, 1] (torchvision ``adjust_brightness``)."""
    return (x * _col(v)).clamp(0, 1)


@register_variable("contrast", [Param("factor", 0.01, 3.5, (0.0, math.inf))])
def _contrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma (torchvision ``adjust_contrast``)."""
    means = x.mean((2, 3))  # the mean luma is the luma of the channel means
    m = means if x.shape[1] == 1 else means @ _luma_weights(x)[:, None]
    m = m.view(-1, 1, 1, 1)
    f = _col(v)
    return (f * x + (1 - f) * m).clamp(0, 1)


@register_variable("saturation", [Param("factor", 0.01, 3.5, (0.0, math.inf))], rgb=True)
def _saturation(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Blend with the luma image (torchvision ``adjust_saturation``)."""
    f = _col(v)
    return (f * x + (1 - f) * _gray(x)).clamp(0, 1)


@register_variable("hue", [Param("shift", -0.5, 0.5, (-0.5, 0.5))], rgb=True)
def _hue(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by the shift (a fraction of the colour circle; torchvision ``adjust_hue``)."""
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + v[:, 0].to(x.dtype)[:, None, None], 1.0)
    return hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], 1))


@register_variable("grayscale", _SWITCH, rgb=True)
def _grayscale(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Switch: replace every channel by the luma."""
    return _switch(x, v, _gray(x).expand_as(x))


@register_variable("sharpness", _SWITCH)
def _sharpness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Switch: torchvision ``adjust_sharpness`` with factor 1.5 (the seed's constant)."""
    from torchvision.transforms.v2.functional import adjust_sharpness

    return _switch(x, v, adjust_sharpness(x, 1.5))


@register_variable("blur", [Param("sigma", 0.1, 2.0, (1e-3, 10.0))])
def _gaussian_blur(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Gaussian blur, 7×7 kernel, one sigma (pixels) per image."""
    return _blur(x, v[:, 0], 7)


@register_variable("local_blur", [
    Param("a", 10 / 224, 32 / 224, (0.0, 1.0)), Param("b", 10 / 224, 32 / 224, (0.0, 1.0)),
    Param("dx", -32 / 224, 32 / 224, (-0.5, 0.5)), Param("dy", -32 / 224, 32 / 224, (-0.5, 0.5)),
    Param("angle", -15.0, 15.0, (-180.0, 180.0))])
def _local_blur(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Blur inside an ellipse: semi-axes a, b and centre shift dx, dy (fractions of the side),
    angle in degrees; the blurred copy has sigma 3/224 of the side (the seed's 3 px)."""
    n, _, h, w = x.shape
    sigma = 3 * h / 224
    size = 2 * math.ceil(3 * sigma) + 1
    blurred = _blur(x, torch.full((n,), sigma, device=x.device), min(size, 2 * (min(h, w) // 2) - 1))
    rows, cols = _grid(x)
    vv = v.to(torch.float32)
    cy = (h - 1) / 2 + vv[:, 3, None, None] * h
    cx = (w - 1) / 2 + vv[:, 2, None, None] * w
    t = torch.deg2rad(vv[:, 4, None, None])
    dy, dx = rows - cy, cols - cx
    u = (dx * torch.cos(t) + dy * torch.sin(t)) / (vv[:, 0, None, None] * w)
    q = (-dx * torch.sin(t) + dy * torch.cos(t)) / (vv[:, 1, None, None] * h)
    return torch.where((u * u + q * q <= 1)[:, None], blurred, x)


@register_variable("hflip", _SWITCH)
def _hflip(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Switch: mirror left-right."""
    return _switch(x, v, x.flip(-1))


@register_variable("rotation", [Param("angle", -10.0, 10.0, (-45.0, 45.0))])
def _rotation(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate by the angle (degrees) about the centre and zoom in just enough that no corner is
    empty (the seed's rotate-then-crop-black-borders), bilinear, in one ``grid_sample``."""
    n, _, h, w = x.shape
    t = torch.deg2rad(v[:, 0].to(torch.float32))
    cos, sin = torch.cos(t), torch.sin(t)
    zoom = cos + sin.abs() * max(h / w, w / h)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1] = cos / zoom, -sin * h / w / zoom
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h / zoom, cos / zoom
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


@register_variable("roll", [Param("dy", -0.2, 0.2, (-1.0, 1.0)), Param("dx", -0.2, 0.2, (-1.0, 1.0))])
def _roll(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Circular shift by (dy, dx) fractions of the side, rounded to whole pixels (``torch.roll``)."""
    n, c, h, w = x.shape
    sy = torch.round(v[:, 0] * h).long()[:, None]
    sx = torch.round(v[:, 1] * w).long()[:, None]
    iy = torch.remainder(torch.arange(h, device=x.device)[None] - sy.to(x.device), h)
    ix = torch.remainder(torch.arange(w, device=x.device)[None] - sx.to(x.device), w)
    y = x.gather(2, iy[:, None, :, None].expand(n, c, h, w))
    return y.gather(3, ix[:, None, None, :].expand(n, c, h, w))


@register_variable("erasing", [
    Param("cy", 0.2, 0.8, (0.0, 1.0)), Param("cx", 0.2, 0.8, (0.0, 1.0)),
    Param("scale", 0.02, 0.33, (0.0, 1.0)), Param("log_ratio", math.log(0.3), math.log(3.3), (-5.0, 5.0))])
def _erasing(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Set a box to 0: centre (cy, cx) as fractions, area ``scale`` of the image, aspect
    ``exp(log_ratio)``; left unchanged when the box would run past the bottom or right edge."""
    h, w = x.shape[-2:]
    vv = v.to(torch.float64)
    bh = torch.round(torch.sqrt(vv[:, 2] * h * w * torch.exp(vv[:, 3])))
    bw = torch.round(torch.sqrt(vv[:, 2] * h * w / torch.exp(vv[:, 3])))
    top = (torch.round(vv[:, 0] * h) - torch.div(bh, 2, rounding_mode="floor")).clamp(min=0)
    left = (torch.round(vv[:, 1] * w) - torch.div(bw, 2, rounding_mode="floor")).clamp(min=0)
    fits = (top + bh <= h) & (left + bw <= w)
    rows, cols = _grid(x)
    top, left, bh, bw, fits = (t.to(x.device)[:, None, None] for t in (top, left, bh, bw, fits))
    box = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw) & fits
    return torch.where(box[:, None], torch.zeros((), dtype=x.dtype, device=x.device), x)


# --------------------------------------------------------------------------- the composition
RangeSpec = tuple[float, float] | Mapping[str, tuple[float, float]] | None
VariableSpec = str | tuple[str, RangeSpec]


class Augmenter:
    """A chosen set of variables with their ranges, applied in the fixed order to batches.

    Args:
        variables: names, ``(name, (low, high))`` for a one-parameter variable, ``(name,
            {param: (low, high)})`` to change some parameters' ranges, or a mapping name ->
            range spec (``None`` keeps the defaults).
        channels: when given, check now that every variable works on images of this many
            channels (otherwise it is checked on the first batch).

    Attributes:
        names: the variables, in the order of application (that is also the order of the
            Sobol' groups).
        columns: ``"variable.param"`` of every design column.
        groups: the column indices of each variable (for :meth:`SaltelliDesign.rows`).
    """

    def __init__(self, variables: Sequence[VariableSpec] | Mapping[str, RangeSpec],
                 channels: int | None = None) -> None:
        items = list(variables.items()) if isinstance(variables, Mapping) else [
            (v, None) if isinstance(v, str) else tuple(v) for v in variables]
        if not items:
            raise AugmentError(f"no variables given; choose from {', '.join(VARIABLES)}")
        chosen: dict[str, Variable] = {}
        for item in items:
            if len(item) != 2 or not isinstance(item[0], str):
                raise AugmentError(f"variable spec {item!r}: use a name or (name, (low, high))")
            name, spec = item
            if name not in VARIABLES:
                raise AugmentError(f"unknown variable {name!r}; known: {', '.join(VARIABLES)} "
                                   "(or register your own with unitscope.augment.register_variable)")
            if name in chosen:
                raise AugmentError(f"variable {name!r} is listed twice")
            chosen[name] = _with_ranges(VARIABLES[name], spec)
        order = list(VARIABLES)
        self.variables = [chosen[n] for n in sorted(chosen, key=order.index)]
        self.names = [v.name for v in self.variables]
        self.columns = [f"{v.name}.{p.name}" for v in self.variables for p in v.params]
        self.groups: list[list[int]] = []
        for v in self.variables:
            start = sum(len(g) for g in self.groups)
            self.groups.append(list(range(start, start + len(v.params))))
        lows = [p.low for v in self.variables for p in v.params]
        highs = [p.high for v in self.variables for p in v.params]
        self.low = torch.tensor(lows, dtype=torch.float64)
        self.high = torch.tensor(highs, dtype=torch.float64)
        if channels is not None:
            self.check_channels(channels)

    @property
    def d(self) -> int:
        """Number of design columns (scalar parameters)."""
        return len(self.columns)

    def ranges(self) -> dict[str, tuple[float, float]]:
        """``"variable.param" -> (low, high)`` of every column."""
        return dict(zip(self.columns, zip(self.low.tolist(), self.high.tolist())))

    def check_channels(self, channels: int) -> None:
        """Raise :class:`AugmentError` if a chosen variable needs colour and the images have none."""
        if channels not in (1, 3):
            raise AugmentError(f"images have {channels} channels; augmentations take 1 (gray) or 3 (RGB)")
        rgb = [v.name for v in self.variables if v.rgb]
        if channels == 1 and rgb:
            raise AugmentError(f"{', '.join(rgb)} need RGB images (3 channels) and these have 1; "
                               "leave them out for gray images (e.g. digits)")

    def values(self, u: torch.Tensor) -> torch.Tensor:
        """Map design points ``u (n, d)`` in [0, 1] onto the parameter ranges (float64)."""
        if u.dim() != 2 or u.shape[1] != self.d:
            raise AugmentError(f"design points must be (n, {self.d}) for columns {self.columns}, "
                               f"got {tuple(u.shape)}")
        return self.low + u.double().cpu() * (self.high - self.low)

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Augment every image of ``x (n, C, H, W)`` with its own design point ``u[i]``."""
        if x.dim() != 4 or not x.is_floating_point():
            raise AugmentError(f"images must be a float batch (n, C, H, W), got {tuple(x.shape)} {x.dtype}")
        if u.shape[0] != x.shape[0]:
            raise AugmentError(f"{x.shape[0]} images but {u.shape[0]} design points")
        if x.numel() and (x.amin() < -1e-6 or x.amax() > 1 + 1e-6):
            raise AugmentError(f"augmentations need images in [0, 1]; these lie in [{x.amin().item():.3g}, "
                               f"{x.amax().item():.3g}]. Feed unnormalised images and put the "
                               "normalisation inside the model")
        self.check_channels(x.shape[1])
        vals = self.values(u).to(x.device)
        for var, cols in zip(self.variables, self.groups):
            x = var.fn(x, vals[:, cols])
        return x


def _with_ranges(var: Variable, spec: RangeSpec) -> Variable:
    if spec is None:
        return var
    if not isinstance(spec, Mapping):
        if len(var.params) != 1:
            names = ", ".join(p.name for p in var.params)
            raise AugmentError(f"{var.name} has parameters {names}: give their ranges as a mapping, "
                               f"e.g. ({var.name!r}, {{{var.params[0].name!r}: (low, high)}})")
        spec = {var.params[0].name: spec}
    known = {p.name for p in var.params}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise AugmentError(f"{var.name} has no parameter {unknown[0]!r}; it has {', '.join(sorted(known))}")
    params = []
    for p in var.params:
        if p.name in spec:
            rng = spec[p.name]
            try:
                low, high = (float(t) for t in rng)
            except (TypeError, ValueError):
                raise AugmentError(f"{var.name}.{p.name}: range {rng!r} must be two numbers "
                                   "(low, high)") from None
            _check_range(var.name, p, low, high)
            p = replace(p, low=low, high=high)
        params.append(p)
    return replace(var, params=tuple(params))
