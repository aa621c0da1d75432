"""Generated RGB images of one coloured shape each, with every generative factor known.

Each image shows one shape (circle, square, triangle or five-pointed star) of a given hue, size,
position and rotation on a grey background. The factors are drawn from a seeded generator and kept
next to the images (``ShapesDataset.factors``), so an analysis can ask which units follow the class,
the hue or the position of the shape.

Images are rendered with vectorised torch code, one class and up to ``chunk`` images at a time: the
pixel grid of a box around each shape is rotated into the shape's frame, an exact signed distance to
the outline is evaluated (closed forms for the circle and square, reflection folding for the triangle
and the star, after Inigo Quilez's 2D distance functions), and a 1-pixel linear ramp across the
outline anti-aliases the edge. Generation is deterministic for a seed and independent of ``chunk``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset

from .registry import SPLITS, DatasetError

#: The shapes, in class-index order.
SHAPE_NAMES = ("circle", "square", "triangle", "star")
#: The columns of ``ShapesDataset.factors``.
FACTOR_NAMES = ("class", "hue", "size", "x", "y", "rotation", "background")
#: Ranges the factors are drawn from (``x`` and ``y`` lie in ``[size, 1 - size]`` of each image).
SIZE_RANGE = (0.15, 0.35)
BACKGROUND_RANGE = (0.0, 0.5)
#: The generator of split ``s`` is seeded with ``2 * seed + SPLIT_OFFSETS[s]``: the splits never share a
#: seed, and no two base seeds give the same split.
SPLIT_OFFSETS = {"train": 0, "test": 1}
DEFAULT_N = {"train": 4000, "test": 1000}

# The star's inner radius as a fraction of its outer radius. Every shape is defined by its circumradius
# (``size``): the circle's radius, the distance from the centre to the square's, triangle's and star's tips.
# Rotation 0 draws the square axis-aligned and the triangle and the star pointing up (image y grows down).
STAR_INNER = 0.45
_RENDER_VERSION = "shapes-v1"


def hsv_to_rgb(hue: torch.Tensor) -> torch.Tensor:
    """RGB of fully saturated, full-value colours of hue ``hue`` in [0, 1).

    Args:
        hue: hues, any shape.

    Returns:
        A tensor of shape ``(*hue.shape, 3)`` in [0, 1].

    Example:
        >>> hsv_to_rgb(torch.tensor([0.0, 1 / 3, 2 / 3])).tolist()
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    n = torch.tensor([5.0, 3.0, 1.0], dtype=hue.dtype, device=hue.device)
    k = torch.remainder(n + 6.0 * hue.unsqueeze(-1), 6.0)
    return 1.0 - torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def sample_factors(n: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``n`` factor rows uniformly: class, hue, size, x, y, rotation, background.

    ``class`` is uniform over the four shapes, ``hue`` over [0, 1), ``size`` (the radius of the circle
    around the shape, as a fraction of the image side) over ``SIZE_RANGE``, ``x`` and ``y`` (the centre,
    as fractions of the image side, from the left and from the top) over ``[size, 1 - size]``,
    ``rotation`` (radians, clockwise on screen) over [0, 2π) and the background grey over
    ``BACKGROUND_RANGE``. Each row comes from its own seven uniforms, so the first ``n`` rows of a
    longer draw equal a draw of ``n``.

    Args:
        n: how many rows.
        generator: the seeded generator to draw from (draws are the same for the same seed).

    Returns:
        A float32 tensor ``(n, 7)`` with columns in the order of ``FACTOR_NAMES``.

    Example:
        >>> f = sample_factors(3, torch.Generator().manual_seed(0))
        >>> f.shape, bool((f[:, 3] >= f[:, 2]).all())
        (torch.Size([3, 7]), True)
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise DatasetError(f"shapes: n must be a non-negative integer, got {n!r}")
    # one row of 7 uniforms per image: the first n rows of a longer draw are the draw of n
    u = torch.rand(n, 7, generator=generator, dtype=torch.float64)
    cls = (u[:, 6] * len(SHAPE_NAMES)).floor().clamp(max=len(SHAPE_NAMES) - 1)
    lo, hi = SIZE_RANGE
    size = lo + (hi - lo) * u[:, 1]
    x = size + (1 - 2 * size) * u[:, 2]
    y = size + (1 - 2 * size) * u[:, 3]
    rotation = 2 * math.pi * u[:, 4]
    bg = BACKGROUND_RANGE[0] + (BACKGROUND_RANGE[1] - BACKGROUND_RANGE[0]) * u[:, 5]
    out = torch.stack([cls, u[:, 0], size, x, y, rotation, bg], dim=1).float()
    # float32 rounding may lift a draw just below 2π onto 2π; keep the documented half-open range
    below_tau = torch.nextafter(torch.tensor(math.tau, dtype=torch.float32), torch.tensor(0.0))
    out[:, 5] = out[:, 5].clamp(max=float(below_tau))
    return out


def _check_factors(factors: torch.Tensor) -> torch.Tensor:
    if not isinstance(factors, torch.Tensor) or factors.ndim != 2 or factors.shape[1] != len(FACTOR_NAMES):
        got = tuple(factors.shape) if isinstance(factors, torch.Tensor) else type(factors).__name__
        raise DatasetError(f"shapes: factors must be a tensor (N, {len(FACTOR_NAMES)}) with columns "
                           f"{', '.join(FACTOR_NAMES)}; got {got}")
    factors = factors.detach().to("cpu", torch.float32).contiguous()
    if not bool(torch.isfinite(factors).all()) or bool((factors[:, 2] <= 0).any()):
        raise DatasetError("shapes: factors must be finite and every 'size' (column 2) positive")
    cls = factors[:, 0]
    bad = (cls != cls.round()) | (cls < 0) | (cls >= len(SHAPE_NAMES))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise DatasetError(f"shapes: factor 'class' of row {i} is {float(cls[i])}; use an integer 0 to "
                           f"{len(SHAPE_NAMES) - 1} ({', '.join(SHAPE_NAMES)})")
    return factors


def _sdf_circle(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return torch.hypot(x, y) - r


def _sdf_square(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    half = r * _SQRT1_2  # circumradius r: the half side is r/√2
    dx, dy = x.abs() - half, y.abs() - half
    return torch.hypot(dx.clamp(min=0), dy.clamp(min=0)) + torch.maximum(dx, dy).clamp(max=0)


def _sdf_triangle(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # exact equilateral triangle (I. Quilez), centroid at 0, apex at -y (up in the image), circumradius r
    k = math.sqrt(3.0)
    half = r * (k / 2)  # half the side
    px = x.abs() - half
    py = -y + half / k
    fold = px + k * py > 0
    px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
    px = px - torch.minimum(torch.maximum(px, -2 * half), torch.zeros_like(px))
    return torch.hypot(px, py) * torch.where(py > 0, -1.0, 1.0)


def _sdf_star(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # exact five-pointed star (I. Quilez): reflections fold the plane onto one tip at -y (up), no trig
    k1x, k1y = 0.809016994375, -0.587785252292
    px, py = x.abs(), -y
    for kx, ky in ((k1x, k1y), (-k1x, k1y)):
        d = (kx * px + ky * py).clamp(min=0) * 2
        px, py = px - d * kx, py - d * ky
    px, py = px.abs(), py - r
    bax, bay = STAR_INNER * -k1y, STAR_INNER * k1x - 1.0
    h = torch.minimum(((px * bax + py * bay) / (bax * bax + bay * bay)).clamp(min=0), r)
    dist = torch.hypot(px - bax * h, py - bay * h)
    return dist * torch.sign(py * bax - px * bay)


_SDF = (_sdf_circle, _sdf_square, _sdf_triangle, _sdf_star)
_SQRT1_2 = math.sqrt(0.5)


def _coverage(f: torch.Tensor, side: int, antialias: bool) -> torch.Tensor:
    """Per-pixel coverage (B, side, side) in [0, 1] of shapes that all have the class of ``f[0]``.

    Only a square box around each shape, big enough for the largest shape of the chunk, is computed;
    pixels outside it are 0. A pixel's value does not depend on the box, hence not on the chunking.
    """
    b = len(f)
    sdf_fn = _SDF[int(f[0, 0])]
    radius, cx, cy, rot = (f[:, i].view(b, 1, 1) for i in (2, 3, 4, 5))
    box = min(side, math.ceil(2 * float(f[:, 2].max()) * side) + 4)
    offs = torch.arange(box)
    x0 = (cx.view(b) * side - box / 2).round().long().clamp(0, side - box)
    y0 = (cy.view(b) * side - box / 2).round().long().clamp(0, side - box)
    cols, rows = x0.view(b, 1) + offs, y0.view(b, 1) + offs  # (B, box) pixel indices
    px = ((cols.float() + 0.5) / side).view(b, 1, box) - cx
    py = ((rows.float() + 0.5) / side).view(b, box, 1) - cy
    c, s = torch.cos(rot), torch.sin(rot)
    qx, qy = c * px + s * py, c * py - s * px  # the pixel in the shape's frame: rotated by -rotation
    sdf = sdf_fn(qx, qy, radius) * side  # in pixels, negative inside
    cover = (0.5 - sdf).clamp(0.0, 1.0) if antialias else (sdf < 0).float()
    full = torch.zeros(b, side * side)
    flat = (rows.view(b, box, 1) * side + cols.view(b, 1, box)).view(b, -1)
    return full.scatter_(1, flat, cover.view(b, -1)).view(b, side, side)


def render_shapes(factors: torch.Tensor, size: int = 64, antialias: bool = True,
                  chunk: int = 256) -> torch.Tensor:
    """Render images from factor rows (as ``sample_factors`` draws them), ``chunk`` images at a time.

    The rows are grouped by class and ordered by size, so each batched step evaluates one shape's
    signed distance over boxes just big enough for its shapes; the result does not depend on ``chunk``.
    Rendering runs on one torch CPU thread (restored afterwards): its many small ops gained little
    from more threads and lost ~10× on a busy machine. 5,000 images of 64×64 take about 0.5 s.

    Args:
        factors: float tensor ``(N, 7)``, columns in the order of ``FACTOR_NAMES``.
        size: the image side in pixels.
        antialias: blend the outline over one pixel (``False``: hard 0/1 inside test).
        chunk: images rendered per batched step (bounds the memory of the intermediate grids).

    Returns:
        float32 images ``(N, 3, size, size)`` in [0, 1].

    Example:
        >>> f = torch.tensor([[0, 0.0, 0.25, 0.5, 0.5, 0.0, 0.2]])  # a red circle in the middle
        >>> img = render_shapes(f, size=32)
        >>> img[0, :, 16, 16].tolist(), [round(v, 3) for v in img[0, :, 0, 0].tolist()]
        ([1.0, 0.0, 0.0], [0.2, 0.2, 0.2])
    """
    factors = _check_factors(factors)
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise DatasetError(f"shapes: size (the image side in pixels) must be an integer >= 8, got {size!r}")
    out = torch.empty(len(factors), 3, size, size)
    order = torch.argsort(factors[:, 0] * 4 + factors[:, 2], stable=True)  # by class, then by size
    cls_sorted = factors[order, 0]
    with _one_thread():
        for k in range(len(SHAPE_NAMES)):
            idx_k = order[cls_sorted == k]
            for start in range(0, len(idx_k), max(1, chunk)):
                idx = idx_k[start:start + max(1, chunk)]
                f = factors[idx]
                cover = _coverage(f, size, antialias).unsqueeze(1)
                colour = hsv_to_rgb(f[:, 1]).view(-1, 3, 1, 1)
                bg = f[:, 6].view(-1, 1, 1, 1)
                out[idx] = torch.lerp(bg.expand(-1, 3, size, size), colour.expand(-1, 3, size, size), cover)
    return out


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch's CPU ops on one intra-op thread for a while, then restore the previous count.

    Rendering is many small ops; on a busy machine each parallel region waits for a descheduled
    worker thread, which made 5,000 images take ~5 s on 2 cores instead of ~0.5 s on one.
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ShapesDataset(Dataset):
    """Images of one shape each, with their generative factors; items are ``(image, label, factors)``.

    ``image`` is float32 ``(3, H, W)`` in [0, 1], ``label`` the int64 class (an index into
    ``classes``), ``factors`` the float32 row ``(7,)`` of ``factors`` in the order of ``factor_names``.

    Memory: the images are rendered on first use (an item, ``pixels``, ``images()`` or ``fingerprint()``)
    and kept as uint8 (a quarter of float32: 61 MB for 5,000 images of 64×64); each item is converted
    to float when read, so pixel values are multiples of 1/255. Touch ``pixels`` before handing the
    dataset to a ``DataLoader`` with workers, or each worker renders its own copy.

    Args:
        factors: float tensor ``(N, 7)`` (``sample_factors`` draws one; any rows with a valid class work).
        size: the image side in pixels.
        antialias: blend each outline over one pixel.
        name: the name the manifest records, e.g. ``"shapes/train"``.

    Example:
        >>> f = torch.tensor([[1, 0.5, 0.3, 0.5, 0.5, 0.0, 0.0]])  # a cyan axis-aligned square
        >>> data = ShapesDataset(f, size=32)
        >>> image, label, factors = data[0]
        >>> image.shape, int(label), data.classes[label], data.factor_names[1], float(factors[1])
        (torch.Size([3, 32, 32]), 1, 'square', 'hue', 0.5)
    """

    factor_names: tuple[str, ...] = FACTOR_NAMES

    def __init__(self, factors: torch.Tensor, size: int = 64, antialias: bool = True,
                 name: str = "shapes") -> None:
        self.factors = _check_factors(factors)
        if not isinstance(size, int) or isinstance(size, bool) or size < 8:
            raise DatasetError(f"shapes: size (the image side in pixels) must be an integer >= 8, "
                               f"got {size!r}")
        self.size, self.antialias, self.name = size, bool(antialias), name
        self.y = self.factors[:, 0].long()
        self.classes: list[str] = list(SHAPE_NAMES)
        self._pixels: torch.Tensor | None = None

    @property
    def pixels(self) -> torch.Tensor:
        """All images as uint8 ``(N, 3, H, W)`` (rendered on first access, then cached)."""
        if self._pixels is None:
            img = render_shapes(self.factors, self.size, self.antialias)
            self._pixels = img.mul_(255.0).round_().to(torch.uint8)
        return self._pixels

    def images(self, index: slice | Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Float32 images in [0, 1] for ``index`` (all of them by default), as the items give them."""
        px = self.pixels if index is None else self.pixels[index]
        return px.float().div_(255.0)

    def factor(self, name: str) -> torch.Tensor:
        """One column of ``factors`` by name, e.g. ``data.factor("hue")``."""
        if name not in self.factor_names:
            raise DatasetError(f"shapes: unknown factor {name!r}; "
                               f"known factors: {', '.join(self.factor_names)}")
        return self.factors[:, self.factor_names.index(name)]

    def __len__(self) -> int:
        return len(self.factors)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.pixels[i].float().div_(255.0), self.y[i], self.factors[i]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension: ``(3, size, size)``."""
        return (3, self.size, self.size)

    def fingerprint(self) -> str:
        """sha256 of the renderer version, the options, the factors and the rendered pixels."""
        h = hashlib.sha256(f"{_RENDER_VERSION}:{self.size}:{self.antialias}".encode())
        for t in (self.factors, self.pixels):
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"ShapesDataset(name={self.name!r}, n={len(self)}, size={self.size})"


def shapes_dataset(split: str = "test", n: int | None = None, size: int = 64, seed: int = 0,
                   antialias: bool = True) -> ShapesDataset:
    """The ``shapes`` dataset of a split: ``n`` generated images with their factors.

    Args:
        split: ``"train"`` (4,000 images by default) or ``"test"`` (1,000).
        n: how many images (default: the split's size above).
        size: the image side in pixels.
        seed: base seed; the split's generator is seeded with ``2 * seed`` (train) or ``2 * seed + 1``
            (test), so the same ``seed`` never gives a split the other's images.
        antialias: blend each outline over one pixel.

    Example:
        >>> data = shapes_dataset("test", n=8, size=32)
        >>> data.name, len(data), data.input_shape, data.factors.shape
        ('shapes/test', 8, (3, 32, 32), torch.Size([8, 7]))
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DatasetError(f"shapes: seed must be a non-negative integer, got {seed!r}")
    n = DEFAULT_N[split] if n is None else n
    gen = torch.Generator().manual_seed(2 * seed + SPLIT_OFFSETS[split])
    return ShapesDataset(sample_factors(n, gen), size=size, antialias=antialias, name=f"shapes/{split}")
