"""Small built-in networks that train in seconds on the bundled data."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


class DigitsCNN(nn.Sequential):
    """A three-conv CNN for 1×8×8 digits: conv-relu ×2, max-pool, conv-relu, global pool, linear.

    The ReLUs are ``inplace=True`` like torchvision's, so capture is exercised on that case.
    """

    input_shape = (1, 8, 8)
    num_classes = 10

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1), relu1=nn.ReLU(inplace=True),
            conv2=nn.Conv2d(16, 32, 3, padding=1), relu2=nn.ReLU(inplace=True),
            pool2=nn.MaxPool2d(2),
            conv3=nn.Conv2d(32, 64, 3, padding=1), relu3=nn.ReLU(inplace=True),
            pool3=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
            fc=nn.Linear(64, num_classes),
        ))
