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
    """A four-conv CNN with batch norm for 3×64×64 generated shapes (4 classes).

    conv1 (5×5, stride 2) → 32×32, conv2, max-pool → 16×16, conv3, max-pool → 8×8, conv4, each
    conv followed by batch norm and an in-place ReLU; global average pooling and a linear layer.
    Trained for 6 epochs (Adam 3e-3, batch 64, cosine) it classifies the test split at 99 %.
    """

    input_shape = (3, 64, 64)
    num_classes = 4

    def __init__(self, num_classes: int = 4, width: int = 16) -> None:
        w = width
        super().__init__(OrderedDict(
            conv1=nn.Conv2d(3, w, 5, stride=2, padding=2), bn1=nn.BatchNorm2d(w), relu1=nn.ReLU(inplace=True),
            conv2=nn.Conv2d(w, 2 * w, 3, padding=1), bn2=nn.BatchNorm2d(2 * w), relu2=nn.ReLU(inplace=True),
            pool2=nn.MaxPool2d(2),
            conv3=nn.Conv2d(2 * w, 4 * w, 3, padding=1), bn3=nn.BatchNorm2d(4 * w),
            relu3=nn.ReLU(inplace=True), pool3=nn.MaxPool2d(2),
            conv4=nn.Conv2d(4 * w, 4 * w, 3, padding=1), bn4=nn.BatchNorm2d(4 * w),
            relu4=nn.ReLU(inplace=True),
            pool4=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
            fc=nn.Linear(4 * w, num_classes),
        ))
