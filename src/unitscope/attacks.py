"""Adversarial examples for the coverage studies: FGSM, PGD (L∞) and Carlini-Wagner (L2).

No maintained attack library is a dependency, so the three attacks the studies need are here,
batched, in a few lines each:

* FGSM (Goodfellow et al. 2015): x + ε·sign(∇ₓ loss);
* PGD (Madry et al. 2018): ``steps`` signed-gradient steps of size α from a random start in the
  ε-ball, each projected back onto the ball;
* CW-L2 (Carlini & Wagner 2017): Adam on w with x' = (tanh(w) + 1)/2 mapped to the input
  bounds, minimising ‖x' − x‖² + c·max(Z_y − max_{j≠y} Z_j, −κ); the closest successful x' per
  input is kept (the last iterate where none succeeded).

Every attack clamps to ``bounds`` (the input range; None for no clamp with FGSM and PGD, while CW
works in tanh space and needs finite bounds), works on a batch at once,
takes gradients with respect to the inputs only (the parameters' ``.grad`` stay untouched), runs
the model in eval mode and leaves its mode as it was. The loss is the cross-entropy with the
label (untargeted).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    >>> bool((fgsm(net, x, y, eps=0.1) - x).abs().max() <= 0.1 + 1e-6)
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTACKS = ("fgsm", "pgd", "cw")

Bounds = tuple[float, float] | None


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for m, flag in modes.items():
            m.training = flag


def _clamp(x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    return x if bounds is None else x.clamp(bounds[0], bounds[1])


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _check(x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 0.3,
         bounds: Bounds = (0.0, 1.0)) -> torch.Tensor:
    """Fast gradient sign method: one step of size ``eps`` along the sign of the loss gradient."""
    _check(x, y, eps)
    with _eval(model):
        adv = x + eps * _input_grad(model, x, y).sign()
    return _clamp(adv, bounds).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 0.3, alpha: float = 0.1,
        steps: int = 20, random_start: bool = True, bounds: Bounds = (0.0, 1.0),
        seed: int = 0) -> torch.Tensor:
    """Projected gradient descent in the L∞ ball of radius ``eps`` (seeded random start)."""
    _check(x, y, eps)
    x = x.detach()
    adv = x.clone()
    if random_start:
        g = torch.Generator(device="cpu").manual_seed(seed)
        adv = adv + (torch.rand(x.shape, generator=g) * 2 - 1).to(x) * eps
        adv = _clamp(adv, bounds)
    with _eval(model):
        for _ in range(int(steps)):
            adv = adv + alpha * _input_grad(model, adv, y).sign()
            adv = _clamp(torch.max(torch.min(adv, x + eps), x - eps), bounds)
    return adv.detach()


def cw(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float = 1.0, kappa: float = 0.0,
       steps: int = 50, lr: float = 0.01, bounds: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Carlini-Wagner L2: the closest misclassified x' found by Adam in tanh space (see the module doc)."""
    _check(x, y, 0.0)
    finite = bounds is not None and math.isfinite(bounds[0]) and math.isfinite(bounds[1])
    if not finite or not bounds[0] < bounds[1]:
        raise ValueError(f"cw(bounds={bounds}): CW maps its variable into the input range through tanh, "
                         "so it needs finite bounds with low < high, e.g. bounds=(0.0, 1.0) or the data's "
                         "min and max")
    if not c > 0:
        raise ValueError(f"cw(c={c}): the trade-off constant must be > 0, e.g. c=1.0")
    lo, hi = bounds
    x = x.detach()
    unit = ((x - lo) / (hi - lo)).clamp(1e-6, 1 - 1e-6)
    w = torch.atanh(unit * 2 - 1).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    best = x.clone()
    best_dist = torch.full((x.shape[0],), float("inf"), device=x.device)
    onehot = F.one_hot(y, num_classes=-1).bool()
    with _eval(model), torch.enable_grad():
        for _ in range(int(steps)):
            adv = lo + (torch.tanh(w) + 1) / 2 * (hi - lo)
            logits = model(adv)
            if onehot.shape[1] != logits.shape[1]:
                onehot = F.one_hot(y, num_classes=logits.shape[1]).bool()
            real = logits[onehot]
            other = logits.masked_fill(onehot, float("-inf")).amax(1)
            dist = (adv - x).flatten(1).pow(2).sum(1)
            loss = dist.sum() + c * torch.clamp(real - other, min=-kappa).sum()
            (w.grad,) = torch.autograd.grad(loss, w)  # never into the parameters' .grad
            opt.step()
            with torch.no_grad():
                better = (logits.argmax(1) != y) & (dist < best_dist)
                best[better] = adv.detach()[better]
                best_dist[better] = dist[better]
    with torch.no_grad():
        last = lo + (torch.tanh(w) + 1) / 2 * (hi - lo)
        failed = torch.isinf(best_dist)
        best[failed] = last[failed]
    return best.detach()


def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str = "fgsm", eps: float = 0.3,
           batch_size: int = 256, c: float = 1.0, **options: Any) -> torch.Tensor:
    """Run attack ``method`` (one of :data:`ATTACKS`) on ``x`` in batches.

    ``eps`` is the L∞ radius of FGSM and PGD; CW (L2) takes its trade-off constant ``c`` instead
    (default 1, as the seed's studies used) and ignores ``eps``. ``options`` go to the attack
    (``bounds=(low, high)``: the valid input range, default (0, 1)).
    """
    if method not in ATTACKS:
        raise ValueError(f"unknown attack {method!r}; use one of {', '.join(ATTACKS)}")
    parts = []
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        if method == "fgsm":
            parts.append(fgsm(model, xb, yb, eps, **options))
        elif method == "pgd":
            parts.append(pgd(model, xb, yb, eps, **options))
        else:
            parts.append(cw(model, xb, yb, c=c, **options))
    return torch.cat(parts)
