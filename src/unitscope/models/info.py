"""What a model is made of: one row per module with its type, output shape and parameters."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from .modes import preserved


def layer_info(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> pd.DataFrame:
    """A table of ``model``'s modules: name, type, input and output shape, channels, parameters.

    Output shapes come from one forward of a zero batch of ``input_shape`` (channels, height,
    width), or of ``model.input_shape`` when the model declares it; without either they are empty.

    Example:
        >>> import unitscope
        >>> from unitscope.models.info import layer_info
        >>> info = layer_info(unitscope.load_model("digits-cnn"))
        >>> info.set_index("name").loc["conv2", "output_shape"]
        '(32, 8, 8)'
    """
    input_shape = input_shape or getattr(model, "input_shape", None)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    if input_shape is not None:
        handles = []

        def make(name: str):
            def hook(module: nn.Module, args: tuple, output: object) -> None:
                if name not in shapes and isinstance(output, torch.Tensor) and args \
                        and isinstance(args[0], torch.Tensor):
                    shapes[name] = (tuple(args[0].shape[1:]), tuple(output.shape[1:]))
            return hook

        try:
            for name, module in model.named_modules():
                if name:
                    handles.append(module.register_forward_hook(make(name)))
            param = next(model.parameters(), None)
            x = torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu")
            with preserved(model), torch.inference_mode():
                model.eval()
                model(x)
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
            "channels": shape[1][0] if shape and shape[1] else None,
            "parameters": sum(p.numel() for p in module.parameters(recurse=False)),
            "leaf": not any(True for _ in module.children()),
        })
    return pd.DataFrame(rows)
