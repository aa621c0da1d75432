"""Hand-built networks with known answers, shared by the unit-portrait tests."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

B = 5  # side of the window the hand-built unit sums


def window_sum_model() -> nn.Module:
    """conv channel 0 sums a B×B window (no padding), channel 1 is the constant 1."""
    conv = nn.Conv2d(1, 2, B, bias=True)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0] = 1.0
        conv.bias.copy_(torch.tensor([0.0, 1.0]))
    return nn.Sequential(OrderedDict(conv=conv, relu=nn.ReLU()))
