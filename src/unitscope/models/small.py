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


class ShapesCNN(nn.Sequential):
    """A four-conv CNN for 3×64×64 generated shapes (4 classes): three conv-relu-pool stages,
    a last conv-relu, global average pooling and a linear classifier."""

    input_shape = (3, 64, 64)
    num_classes = 4

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__(OrderedDict(
            conv1=nn.Conv2d(3, 16, 5, padding=2), relu1=nn.ReLU(inplace=True), pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(16, 32, 3, padding=1), relu2=nn.ReLU(inplace=True), pool2=nn.MaxPool2d(2),
            conv3=nn.Conv2d(32, 64, 3, padding=1), relu3=nn.ReLU(inplace=True), pool3=nn.MaxPool2d(2),
            conv4=nn.Conv2d(64, 64, 3, padding=1), relu4=nn.ReLU(inplace=True),
            pool4=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
            fc=nn.Linear(64, num_classes),
        ))
