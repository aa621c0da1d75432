"""Feature visualisation by activation maximisation, in the style of lucid and lucent.

An image is optimised with Adam so that a unit responds strongly (Olah et al. 2017, "Feature
Visualization", Distill). What makes the images readable is the lucid recipe:

* **FFT parameterisation**: the image is the orthonormal inverse real 2-D FFT of a learned
  spectrum scaled by ``1 / max(f, 1/max(H, W))`` (a 1/f spectrum, so low frequencies move
  first), divided by 4. ``param="pixel"`` optimises pixels directly.
* **Colour decorrelation** (3 channels only): each pixel's colour is ``M v`` with lucid's ImageNet
  colour-correlation matrix, normalised to a largest column norm of 1; a sigmoid maps to (0, 1).
* **Transforms** at every step (``transforms="standard"``): grey padding, jitter, scaling by
  0.90–1.10, rotation by −10…10° and a second jitter, drawn per image. Unlike lucent, sizes are
  fractions of the image (a 16th of the side for the pad and the jitter), so 8-pixel and
  64-pixel inputs get transforms of their scale; shifts are symmetric and the fill is grey.

Several targets are optimised together, one image each in one batch: the loss is the sum of the
objectives, and Adam's updates are per parameter, so the images do not interact. Random draws
come from a generator seeded with ``seed``: a given seed gives the same images.

Example:
    >>> import torch
    >>> from unitscope.visualize import visualize
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    >>> vis = visualize(net, ["0:1", "0:3"], size=16, steps=8)
    >>> tuple(vis.images.shape), tuple(vis.trace.shape)
    ((2, 3, 16, 16), (8, 2))
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .capture import LayerError, StopForward, resolve_layers
from .models.modes import preserved
from .units import UnitLayout

log = logging.getLogger(__name__)

#: lucid's ImageNet colour correlation (square root of the colour covariance), columns normalised
#: so that the largest has norm 1 (the numbers are lucid's and lucent's)
COLOR_CORRELATION = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]],
                                 dtype=torch.float64)
COLOR_MATRIX = COLOR_CORRELATION / COLOR_CORRELATION.norm(dim=0).max()
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OBJECTIVES = ("channel", "neuron", "direction", "direction_cosine")
SCALES = [1 + (i - 5) / 50 for i in range(11)]
ANGLES = list(range(-10, 11)) + [0] * 5


class VisualizationError(RuntimeError):
    """The optimisation cannot go on (non-finite objective or gradient)."""


@dataclass
class Visualization:
    """What :func:`visualize` returns.

    Attributes:
        images: ``(targets, channels, size, size)`` in [0, 1], after the last step.
        snapshots: step -> images at that step, for every threshold.
        trace: ``(steps, targets)`` objective value of each image at each step (to be maximised).
        targets: the targets, as given.
    """

    images: torch.Tensor
    snapshots: dict[int, torch.Tensor]
    trace: torch.Tensor
    targets: list[Any]


# ------------------------------------------------------------------------------- parameterisation
def fft_scale(h: int, w: int, decay_power: float = 1.0) -> torch.Tensor:
    """The ``(h, w // 2 + 1)`` spectrum scale ``1 / max(ρ, 1/max(h, w)) ** decay_power``."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    rho = torch.sqrt(fx * fx + fy * fy)
    return 1.0 / rho.clamp(min=1.0 / max(h, w)) ** decay_power


class ImageParam(nn.Module):
    """A batch of images as learnable parameters: FFT spectrum or pixels, optional colour decorrelation.

    Args:
        batch, channels, size: the image batch shape ``(batch, channels, size, size)``.
        param: ``"fft"`` or ``"pixel"``.
        decorrelate: apply lucid's colour matrix (3 channels only; ignored otherwise).
        sd: standard deviation of the initial parameters (lucid's 0.01).
        generator: the random source of the initial parameters.
    """

    def __init__(self, batch: int, channels: int, size: int, param: str = "fft", decorrelate: bool = True,
                 sd: float = 0.01, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if param not in ("fft", "pixel"):
            raise ValueError(f"param={param!r}: use 'fft' or 'pixel'")
        self.param, self.size = param, size
        self.decorrelate = decorrelate and channels == 3
        if decorrelate and channels != 3:
            log.info("colour decorrelation applies to 3-channel images only; %d channels are left as "
                     "they are", channels)
        shape = (batch, channels, size, size // 2 + 1, 2) if param == "fft" else (batch, channels, size, size)
        self.raw = nn.Parameter(torch.randn(shape, generator=generator) * sd)
        self.register_buffer("scale", fft_scale(size, size).float(), persistent=False)
        self.register_buffer("colors", COLOR_MATRIX.float(), persistent=False)

    def pre_sigmoid(self) -> torch.Tensor:
        """The image before the sigmoid (linear in the parameters)."""
        if self.param == "fft":
            spectrum = torch.view_as_complex(self.raw) * self.scale
            x = torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho") / 4.0
        else:
            x = self.raw
        if self.decorrelate:
            x = torch.einsum("ij,bjhw->bihw", self.colors, x)
        return x

    def forward(self) -> torch.Tensor:
        """The images in (0, 1)."""
        return torch.sigmoid(self.pre_sigmoid())


# ------------------------------------------------------------------------------- transforms
def standard_transforms(size: int) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """lucent's standard transforms as fractions of ``size``: one random affine warp per image.

    Grey pad of ``size/16``, jitter of ``size/16`` and ``size/32`` (symmetric), scale in
    {0.90, 0.92, …, 1.10}, rotation in −10…10° (0° six times as likely, as in lucent). The
    output has the padded size.
    """
    pad = max(1, round(size / 16))
    jitter = max(1, round(size / 16)) + max(1, round(size / 32))

    def apply(img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b = img.shape[0]
        x = F.pad(img, (pad, pad, pad, pad), value=0.5)
        side = x.shape[-1]
        scale = torch.tensor(SCALES)[torch.randint(len(SCALES), (b,), generator=gen)]
        angle = torch.tensor(ANGLES, dtype=torch.float32)[torch.randint(len(ANGLES), (b,), generator=gen)]
        shift = torch.randint(-jitter, jitter + 1, (b, 2), generator=gen).float() * 2 / side
        rad = angle * math.pi / 180
        cos, sin = torch.cos(rad) / scale, torch.sin(rad) / scale
        rows = [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)]
        theta = torch.stack(rows, 1)
        grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    return apply


def _transforms(spec: Any, size: int) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    if spec == "standard":
        return standard_transforms(size)
    if spec in ("none", None):
        return lambda img, gen: img
    if callable(spec):
        return lambda img, gen: spec(img)
    raise ValueError(f"transforms={spec!r}: use 'standard', 'none' or a callable image -> image")


def _preprocess(spec: Any, model: nn.Module, channels: int) -> Callable[[torch.Tensor], torch.Tensor]:
    if spec == "auto":
        spec = "imagenet" if type(model).__module__.startswith("torchvision.") and channels == 3 else None
    if spec is None or spec == "none":
        return lambda x: x
    if spec == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return lambda x: (x - mean.to(x)) / std.to(x)
    if spec == "caffe":
        return lambda x: x * 255 - 117
    if callable(spec):
        return spec
    raise ValueError(f"preprocess={spec!r}: use 'auto', 'imagenet', 'caffe', None or a callable")


# ------------------------------------------------------------------------------- objectives
@dataclass
class _Target:
    layer: str
    channel: int | None
    vector: torch.Tensor | None


def _as_list(targets: Any) -> list[Any]:
    """The targets as a list: a string or one ``(layer, channel | tensor)`` pair is one target."""
    single = isinstance(targets, tuple) and len(targets) == 2 and isinstance(targets[1], (int, torch.Tensor))
    return [targets] if isinstance(targets, str) or single else list(targets)


def _parse_targets(model: nn.Module, targets: Sequence[Any], objective: str) -> list[_Target]:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: use one of {', '.join(OBJECTIVES)}")
    targets = _as_list(targets)
    if not targets:
        raise ValueError("name at least one target, e.g. 'conv1:3' (layer:channel)")
    parsed = []
    for t in targets:
        if isinstance(t, str):
            layer, sep, unit = t.rpartition(":")
            if not sep or not unit.strip().lstrip("-").isdigit():
                raise ValueError(f"target {t!r}: write 'layer:channel', e.g. 'features.3:7'")
            parsed.append(_Target(layer, int(unit), None))
        elif isinstance(t, tuple) and len(t) == 2 and isinstance(t[1], int):
            parsed.append(_Target(str(t[0]), t[1], None))
        elif isinstance(t, tuple) and len(t) == 2 and isinstance(t[1], torch.Tensor):
            parsed.append(_Target(str(t[0]), None, t[1].detach().flatten().float()))
        else:
            raise ValueError(f"target {t!r}: use 'layer:channel', (layer, channel) or "
                             "(layer, direction tensor)")
        if objective.startswith("direction") != (parsed[-1].vector is not None):
            form = "(layer, direction tensor)" if objective.startswith("direction") else "'layer:channel'"
            raise ValueError(f"objective={objective!r} needs targets of the form {form}, got {t!r}")
    modules = dict(model.named_modules())
    for t in parsed:
        if t.layer not in modules or not t.layer:
            resolve_layers(model, t.layer)  # raises LayerError with the closest names
            raise LayerError(f"target layer {t.layer!r} must be an exact module name")
    return parsed


def _values(act: torch.Tensor, targets: list[tuple[int, _Target]], objective: str,
            layer: str) -> torch.Tensor:
    """The objective of each (batch index, target) on this layer's output, one value per target."""
    idx = torch.tensor([i for i, _ in targets], device=act.device)
    if objective.startswith("direction"):
        sub = act[idx]  # a copy (advanced indexing): later in-place ops cannot change it
        for _, t in targets:
            if t.vector.numel() != sub.shape[1]:
                raise ValueError(f"direction for layer {layer!r} has {t.vector.numel()} entries but the "
                                 f"layer has {sub.shape[1]} channels")
        v = torch.stack([t.vector for _, t in targets]).to(sub)
        v = v.view(*v.shape, *([1] * (sub.dim() - 2)))
        if objective == "direction":
            per_pos = (sub * v).sum(1)
        else:
            per_pos = F.cosine_similarity(sub, v.expand_as(sub), dim=1)
        return per_pos.flatten(1).mean(1)
    ch = torch.tensor([t.channel for _, t in targets], device=act.device)
    bad = [t.channel for _, t in targets if not 0 <= t.channel < act.shape[1]]
    if bad:
        raise IndexError(f"channel {bad[0]} is out of range for layer {layer!r}, which has {act.shape[1]} "
                         f"channels (0..{act.shape[1] - 1})")
    sub = act[idx, ch]
    if sub.dim() == 1:
        return sub
    if objective == "neuron":
        return sub[:, sub.shape[1] // 2, sub.shape[2] // 2] if sub.dim() == 3 else sub[:, sub.shape[1] // 2]
    return sub.flatten(1).mean(1)


class _ObjectiveHooks:
    """Forward hooks that compute every target's objective inside the hook; removed in ``finally``."""

    def __init__(self, model: nn.Module, targets: list[_Target], objective: str) -> None:
        self.by_layer: dict[str, list[tuple[int, _Target]]] = {}
        for i, t in enumerate(targets):
            self.by_layer.setdefault(t.layer, []).append((i, t))
        self.model, self.objective, self.n = model, objective, len(targets)
        self.units = UnitLayout(model)
        self.values: dict[int, torch.Tensor] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> _ObjectiveHooks:
        modules = dict(self.model.named_modules())
        try:
            self.handles.append(self.units.watch(list(self.by_layer)))
            for layer in self.by_layer:
                self.handles.append(modules[layer].register_forward_hook(self._hook(layer)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def _hook(self, layer: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            output = self.units.first(layer, output)  # channels of a token map are its last axis
            values = _values(output, self.by_layer[layer], self.objective, layer)
            for (i, _), v in zip(self.by_layer[layer], values):
                self.values[i] = v
            if len(self.values) == self.n:
                raise StopForward  # every target has its value: skip the rest of the network
        return hook

    def run(self, x: torch.Tensor) -> torch.Tensor:
        self.values = {}
        try:
            self.model(x)
        except StopForward:
            pass
        missing = sorted(layer for layer, pairs in self.by_layer.items() if pairs[0][0] not in self.values)
        if missing:
            raise ValueError(f"target layers {missing} did not run in the model's forward")
        return torch.stack([self.values[i] for i in range(self.n)])


# ------------------------------------------------------------------------------- the loop
@torch.inference_mode(False)  # gradients even inside a caller's inference_mode or no_grad: the
@torch.enable_grad()  # image parameters must be made, and the steps run, with autograd on
def visualize(model: nn.Module, targets: Sequence[Any], size: int | None = None,
              steps: int | Sequence[int] = 512, param: str = "fft", decorrelate: bool = True,
              transforms: Any = "standard", objective: str = "channel", lr: float = 0.05, seed: int = 0,
              device: str | torch.device = "auto", progress: bool = False, preprocess: Any = "auto",
              channels: int | None = None) -> Visualization:
    """Optimise one image per target so that the target unit responds as strongly as it can.

    Args:
        model: any network; it is put in eval mode for the run and restored, its weights are not
            changed and no gradient is left on them.
        targets: ``"layer:channel"`` strings (``"features.3:7"``), ``(layer, channel)`` pairs, or
            ``(layer, direction tensor)`` pairs for the direction objectives.
        size: the image side; default: the model's ``input_shape`` if it has one, else 224.
        steps: the number of Adam steps, or a list of thresholds (an image is kept at each; the run
            lasts the largest).
        param: ``"fft"`` (1/f-scaled spectrum, lucid's default) or ``"pixel"``.
        decorrelate: lucid's colour decorrelation (3-channel inputs only).
        transforms: ``"standard"`` (scale-aware jitter, scale, rotate), ``"none"`` or a callable.
        objective: ``"channel"`` (mean of the channel over positions; a feature for a linear layer),
            ``"neuron"`` (the centre position), ``"direction"`` (dot product with a vector, as lucid)
            or ``"direction_cosine"`` (cosine, as lucent), averaged over positions.
        lr: Adam's learning rate (lucid's 0.05).
        seed: seeds the initial image and every transform draw.
        device: where the model runs (``"auto"``: CUDA when present).
        progress: show a progress bar.
        preprocess: applied to the image before the model: ``"auto"`` (ImageNet normalisation for
            torchvision models, nothing otherwise), ``"imagenet"``, ``"caffe"`` (x·255 − 117, lucid's
            InceptionV1), None or a callable.
        channels: image channels; default: the model's ``input_shape[0]`` if it has one, else 3.

    Returns:
        A :class:`Visualization` with the images, the snapshots at each threshold and the trace.

    Raises:
        IndexError: a target channel is out of range for its layer.
        ValueError: ``size`` or ``channels`` is not a positive int, or ``steps`` not positive.
        VisualizationError: the objective or its gradient became NaN or infinite.
    """
    from .engine import resolve_device

    parsed = _parse_targets(model, targets, objective)
    thresholds = sorted({int(steps)} if isinstance(steps, int) else {int(s) for s in steps})
    if not thresholds or thresholds[0] < 1:
        raise ValueError(f"steps={steps!r}: give a positive number of steps or a list of them")
    shape = getattr(model, "input_shape", None)
    channels = _positive("channels", channels, shape[0] if shape else 3)
    size = _positive("size", size, shape[-1] if shape else 224)
    input_hw = tuple(shape[1:]) if shape else None
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    image = ImageParam(len(parsed), channels, size, param, decorrelate, generator=gen).to(dev)
    transform = _transforms(transforms, size)
    prep = _preprocess(preprocess, model, channels)
    optimizer = torch.optim.Adam(image.parameters(), lr=lr)
    trace = torch.zeros(thresholds[-1], len(parsed))
    snapshots: dict[int, torch.Tensor] = {}
    fork = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    # a callable transform that draws from torch's global generator draws from one seeded here
    # (and the caller's state is restored)
    with preserved(model), torch.random.fork_rng(devices=fork):
        torch.default_generator.manual_seed(seed)  # only the generators fork_rng restores
        if fork:
            torch.cuda.default_generators[fork[0]].manual_seed(seed)
        model.eval().to(dev)
        bar = _bar(thresholds[-1], progress)
        try:
            with _ObjectiveHooks(model, parsed, objective) as hooks:
                for step in range(1, thresholds[-1] + 1):
                    x = transform(image(), gen)
                    if input_hw is not None and tuple(x.shape[-2:]) != input_hw:
                        x = F.interpolate(x, size=input_hw, mode="bilinear", align_corners=False,
                                          antialias=True)
                    values = hooks.run(prep(x))
                    (grad,) = torch.autograd.grad(-values.sum(), [image.raw])
                    if not (torch.isfinite(values).all() and torch.isfinite(grad).all()):
                        raise VisualizationError(
                            f"the objective or its gradient is not finite at step {step} (values "
                            f"{values.detach().cpu().tolist()}); lower lr (now {lr}), check the model for "
                            "NaN-producing layers, or use param='pixel'")
                    image.raw.grad = grad
                    optimizer.step()
                    trace[step - 1] = values.detach().cpu()
                    if step in thresholds:
                        with torch.no_grad():
                            snapshots[step] = image().detach().cpu()
                    bar.update(1)
        finally:
            bar.close()
    return Visualization(images=snapshots[thresholds[-1]], snapshots=snapshots, trace=trace,
                         targets=_as_list(targets))


def _positive(name: str, value: Any, default: int) -> int:
    """``value`` checked to be a positive int; ``default`` when it is None (never for 0)."""
    if value is None:
        return int(default)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r}: {name} must be a positive size, e.g. {name}={default} "
                         f"(or leave it out for {default})")
    return int(value)


def _bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=None if enabled else True, unit="step", desc="visualize", leave=False)


# ------------------------------------------------------------------------------- figure
def plot_visualizations(images: torch.Tensor, labels: Sequence[str] | None = None, columns: int = 8,
                        ax: Any = None) -> Any:
    """A grid of images ``(B, C, H, W)`` in [0, 1] with one label each; returns the figure.

    One-channel images are shown in grey, three-channel ones in colour. ``ax`` (a single axes)
    draws the first image only.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    images = images.detach().cpu().float().clamp(0, 1)
    b = images.shape[0]
    labels = list(labels) if labels is not None else [str(i) for i in range(b)]
    if ax is not None:
        _show(ax, images[0], labels[0])
        return ax.figure
    cols = min(columns, b)
    rows = math.ceil(b / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.9 * rows), squeeze=False,
                             layout="constrained")
    for k, axis in enumerate(axes.flat):
        if k < b:
            _show(axis, images[k], labels[k])
        else:
            axis.axis("off")
    return fig


def _show(ax: Any, img: torch.Tensor, label: str) -> None:
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img[:3].permute(1, 2, 0).numpy())
    ax.set_title(label, fontsize=8)
    ax.axis("off")
