"""Leaving a model as it was: every module's train/eval flag and the device of its tensors.

Functions that switch a caller's model to eval mode, or move it to a device, restore both when
they return, also after an exception. Flags are restored module by module: a model that keeps
some modules in eval (frozen batch norms) gets exactly those back, which ``model.train(flag)``
would not do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

F = TypeVar("F", bound=Callable[..., Any])


def _device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (else buffers) live; the CPU for a model without tensors."""
    device = _device(model)
    return device if device is not None else torch.device("cpu")


@contextmanager
def preserved(model: nn.Module, device: bool = True) -> Iterator[nn.Module]:
    """Restore every module's ``training`` flag and (with ``device=True``) the model's device on exit.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = net[1].eval()
        >>> with preserved(net):
        ...     _ = net.train()
        >>> net.training, net[0].training, net[1].training
        (True, True, False)
    """
    modes = {m: m.training for m in model.modules()}
    where = _device(model) if device else None
    try:
        yield model
    finally:
        for m, flag in modes.items():
            m.training = flag
        if where is not None and _device(model) != where:
            model.to(where)


@contextmanager
def tf32_allowed(allowed: bool, device: torch.device | str | None = None) -> Iterator[None]:
    """Let CUDA convolutions and float32 matrix products use TF32 (``allowed``) or not; restore after.

    PyTorch convolves in TF32 by default on Ampere and later GPUs: about 1e-3 relative error, and
    results that change with the batch's shape. Sobol' indices of two ranks then differed from one
    process's by 0.009 (0.2 relative) on an H100; with TF32 off they agree to 1e-9. A ``device``
    other than CUDA changes nothing. torch's ``fp32_precision`` settings are used where they exist
    (torch >= 2.9; reading the legacy ``allow_tf32`` flags after a user set them raises), else the
    legacy flags.

    Example:
        >>> import torch
        >>> matmul = torch.backends.cuda.matmul
        >>> before = getattr(matmul, "fp32_precision", None)
        >>> with tf32_allowed(False, "cuda"):
        ...     getattr(matmul, "fp32_precision", "ieee") == "ieee" and not matmul.allow_tf32
        True
        >>> getattr(matmul, "fp32_precision", None) == before
        True
    """
    if device is not None and torch.device(device).type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    settings = [torch.backends.cuda.matmul, getattr(cudnn, "conv", None), getattr(cudnn, "rnn", None)]
    if all(hasattr(s, "fp32_precision") for s in settings):
        # convolutions and RNNs together: cuDNN settings that differ make torch refuse to read
        # the legacy cudnn.allow_tf32 flag. The restore writes the values explicitly, so a later
        # change of torch.backends.fp32_precision no longer reaches them.
        before = [s.fp32_precision for s in settings]
        for s in settings:
            s.fp32_precision = "tf32" if allowed else "ieee"
        try:
            yield
        finally:
            for s, value in zip(settings, before):
                s.fp32_precision = value
        return
    matmul = torch.backends.cuda.matmul
    legacy = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = legacy


def restores_model(fn: F) -> F:
    """Decorate a function whose first argument is a model it may switch to eval or move."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with preserved(model):
            return fn(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
