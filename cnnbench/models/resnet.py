"""Document 002's small residual net for MNIST (from the course of Liu Er), and its
batch-norm variant.

conv 1->16 (5x5), ReLU, max-pool; residual block(16); conv 16->32 (5x5), ReLU,
max-pool; residual block(32); linear 512 -> 10. A block is two 3x3 convolutions
(padding 1) with the activation between them and after the sum: act(x + conv2(act(conv1(x)))).
`resnet` has no batch normalisation, as in the document. `resnet_bn` puts a batch norm
after every convolution, before the activation (and before the sum in a block), as He
et al. (2016) do; its convolutions then have no bias (the norm's shift replaces it).
"""

from __future__ import annotations

from torch import Tensor, nn

from cnnbench.models.layers import activation as make_activation
from cnnbench.models.layers import flat_size
from cnnbench.models.registry import register_model


def _conv(c_in: int, c_out: int, kernel: int, padding: int, norm: bool) -> list[nn.Module]:
    """A convolution, followed by a batch norm when `norm`."""
    conv = nn.Conv2d(c_in, c_out, kernel_size=kernel, padding=padding, bias=not norm)
    return [conv, nn.BatchNorm2d(c_out)] if norm else [conv]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, act: str, norm: bool = False) -> None:
        super().__init__()
        # without norm a bare convolution: document 002's parameter names (conv1.weight)
        self.conv1 = nn.Sequential(*_conv(channels, channels, 3, 1, norm)) if norm else nn.Conv2d(
            channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Sequential(*_conv(channels, channels, 3, 1, norm)) if norm else nn.Conv2d(
            channels, channels, kernel_size=3, padding=1)
        self.act1 = make_activation(act)
        self.act2 = make_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(self.act1(self.conv1(x)))  # N x C x H x W
        return self.act2(x + y)


class ResNet(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, image_size: int, act: str, norm: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv(in_channels, 16, 5, 0, norm),  # N x 16 x 24 x 24
            make_activation(act),
            nn.MaxPool2d(2),  # N x 16 x 12 x 12
            ResidualBlock(16, act, norm),  # N x 16 x 12 x 12
            *_conv(16, 32, 5, 0, norm),  # N x 32 x 8 x 8
            make_activation(act),
            nn.MaxPool2d(2),  # N x 32 x 4 x 4
            ResidualBlock(32, act, norm),  # N x 32 x 4 x 4
        )
        self.fc = nn.Linear(flat_size(self.features, in_channels, image_size), num_classes)  # 512 -> 10

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


@register_model("resnet", source="document 002: conv, residual block(16), conv, residual block(32), fc 512->10")
def resnet(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
           activation: str | None = None, dropout: float | None = None) -> nn.Module:
    return ResNet(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                  act=activation or "relu")


@register_model("resnet_bn", source="document 002's residual net with batch norm after every convolution (He 2016)")
def resnet_bn(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
              activation: str | None = None, dropout: float | None = None) -> nn.Module:
    return ResNet(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                  act=activation or "relu", norm=True)
