"""Document 002's small GoogLeNet-style net for MNIST (from the course of Liu Er).

conv 1->10 (5x5), max-pool, ReLU; Inception(10) -> 88 channels; conv 88->20 (5x5),
max-pool, ReLU; Inception(20) -> 88 channels; linear 1408 -> 10. The Inception block
has four branches: 1x1 (16), 1x1 -> 5x5 (24), 1x1 -> 3x3 -> 3x3 (24) and
3x3 average pool -> 1x1 (24), concatenated on channels: 16 + 24 + 24 + 24 = 88.
As in the document, the branches have no activation inside them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cnnbench.models.layers import Concat, flat_size
from cnnbench.models.layers import activation as make_activation
from cnnbench.models.registry import register_model


class InceptionBlock(nn.Module):
    out_channels = 88

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch1x1 = nn.Conv2d(in_channels, 16, kernel_size=1)
        self.branch5x5_1 = nn.Conv2d(in_channels, 16, kernel_size=1)
        self.branch5x5_2 = nn.Conv2d(16, 24, kernel_size=5, padding=2)
        self.branch3x3_1 = nn.Conv2d(in_channels, 16, kernel_size=1)
        self.branch3x3_2 = nn.Conv2d(16, 24, kernel_size=3, padding=1)
        self.branch3x3_3 = nn.Conv2d(24, 24, kernel_size=3, padding=1)
        self.branch_pool = nn.Conv2d(in_channels, 24, kernel_size=1)
        self.concat = Concat()

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)  # N x 16 x H x W
        b5 = self.branch5x5_2(self.branch5x5_1(x))  # N x 24 x H x W
        b3 = self.branch3x3_3(self.branch3x3_2(self.branch3x3_1(x)))  # N x 24 x H x W
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))  # N x 24 x H x W
        return self.concat([b1, b5, b3, bp])  # N x 88 x H x W


class InceptionNet(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, image_size: int, act: str) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 10, kernel_size=5),  # N x 10 x 24 x 24
            nn.MaxPool2d(2),  # N x 10 x 12 x 12
            make_activation(act),
            InceptionBlock(10),  # N x 88 x 12 x 12
            nn.Conv2d(InceptionBlock.out_channels, 20, kernel_size=5),  # N x 20 x 8 x 8
            nn.MaxPool2d(2),  # N x 20 x 4 x 4
            make_activation(act),
            InceptionBlock(20),  # N x 88 x 4 x 4
        )
        self.fc = nn.Linear(flat_size(self.features, in_channels, image_size), num_classes)  # 1408 -> 10

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


@register_model("inception", source="document 002: conv, Inception(10), conv, Inception(20), fc 1408->10")
def inception(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
              activation: str | None = None, dropout: float | None = None) -> nn.Module:
    return InceptionNet(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                        act=activation or "relu")
