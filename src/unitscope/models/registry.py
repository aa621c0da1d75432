"""The model registry: ``load_model(name, weights=None)`` and safe weight loading."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..registry import Registry

MODELS: Registry = Registry("model")


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model."""


def load_model(name: str | nn.Module, weights: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model (random initial weights) and optionally load a weights file.

    Args:
        name: a registered name (``unitscope.models.MODELS.names()``), or an ``nn.Module``, which
            is returned as is (after loading ``weights`` into it, if given).
        weights: a file saved with ``torch.save(model.state_dict())`` or a unitscope training
            checkpoint; read with ``weights_only=True`` (no code runs).
        **kwargs: options of the model builder.

    Example:
        >>> import unitscope
        >>> type(unitscope.load_model("digits-cnn")).__name__
        'DigitsCNN'
    """
    model = name if isinstance(name, nn.Module) else MODELS[name](**kwargs)
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict file into ``model`` in place, with errors that say what does not fit."""
    state = read_state_dict(Path(path))
    check_state_dict(model, state, source=str(path))
    model.load_state_dict(state)
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict (or the model part of a training checkpoint) with ``weights_only=True``."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise WeightsError(
            f"cannot read weights file {path} ({type(exc).__name__}: {first_line}): the file is "
            "corrupt, or holds more than tensors; re-export it with "
            "torch.save(model.state_dict(), path)"
        ) from exc
    state = obj
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds no state dict of tensors")
    return state


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise :class:`WeightsError` naming the first key or shape that does not fit ``model``."""
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise WeightsError(f"{source} does not fit {type(model).__name__}: key {key!r} is missing "
                               f"(expected shape {tuple(value.shape)}). Is it for another architecture?")
        if tuple(state[key].shape) != tuple(value.shape):
            raise WeightsError(f"{source} does not fit {type(model).__name__}: {key!r} has shape "
                               f"{tuple(state[key].shape)}, the model expects {tuple(value.shape)}")
    extra = [k for k in state if k not in own]
    if extra:
        raise WeightsError(f"{source} does not fit {type(model).__name__}: unexpected key {extra[0]!r}")


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes and values of ``model``'s state dict."""
    h = hashlib.sha256(type(model).__name__.encode())
    for key, t in model.state_dict().items():
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()


#: input shape (C, H, W) a registered model is meant for (``unitscope layers`` uses it)
INPUT_SHAPES: dict[str, tuple[int, ...]] = {}


def default_input_shape(name: str | nn.Module) -> tuple[int, ...] | None:
    """The input shape a model declares (``model.input_shape``) or its registry entry gives."""
    if isinstance(name, nn.Module):
        return getattr(name, "input_shape", None)
    return INPUT_SHAPES.get(name)


@MODELS.register("digits-cnn")
def digits_cnn(num_classes: int = 10) -> nn.Module:
    """The small CNN for scikit-learn's 8×8 digits (:class:`unitscope.models.small.DigitsCNN`)."""
    from .small import DigitsCNN

    return DigitsCNN(num_classes=num_classes)


@MODELS.register("shapes-cnn")
def shapes_cnn(num_classes: int = 4) -> nn.Module:
    """The small CNN for the generated 3×64×64 shapes (:class:`unitscope.models.small.ShapesCNN`)."""
    from .small import ShapesCNN

    return ShapesCNN(num_classes=num_classes)


INPUT_SHAPES.update({"digits-cnn": (1, 8, 8), "shapes-cnn": (3, 64, 64)})


def _torchvision(arch: str):
    def build(num_classes: int = 1000) -> nn.Module:
        import torchvision

        extra = {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") else {}
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **extra)

    build.__doc__ = (f"torchvision's ``{arch}`` with random weights (never downloaded); pass "
                     "``weights=`` to load a local file.")
    return build


for _arch in ("alexnet", "vgg11", "vgg16", "resnet18", "resnet50", "googlenet", "mobilenet_v2"):
    MODELS.register(_arch)(_torchvision(_arch))
    INPUT_SHAPES[_arch] = (3, 224, 224)
