"""torchvision's ImageNet architectures, fed MNIST-sized input by resizing it.

`alexnet_tv`, `googlenet`, `resnet18` and `vgg16` are torchvision's own classes with
random weights and `num_classes` outputs. `ResizeInput` resizes each batch to the
architecture's native 224 x 224 (bilinear) and repeats a single channel three times, so
the layers keep their published shapes; use them on a GPU. GoogLeNet is built without
auxiliary heads so that it returns logits in train and eval mode alike.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cnnbench.models.registry import register_model


class ResizeInput(nn.Module):
    """Resize (N, C, H, W) to (N, channels, size, size); a no-op when it already is."""

    def __init__(self, net: nn.Module, *, size: int, channels: int) -> None:
        super().__init__()
        self.net, self.size, self.channels = net, size, channels

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True).expand(-1, self.channels, -1, -1)
        return self.net(x)


def _tv(name: str, num_classes: int, **kwargs) -> nn.Module:
    """torchvision.models.<name>, resized input. torchvision is imported here, when one of its
    models is built: importing it takes 1.4 s (it imports torch._dynamo), which every command
    and every study worker paid before."""
    import torchvision.models  # start-up time: here, not at the top (see above)

    build = getattr(torchvision.models, name)
    return ResizeInput(build(weights=None, num_classes=num_classes, **kwargs), size=224, channels=3)


@register_model("alexnet_tv", settings=("dropout",), source="torchvision.models.alexnet, input resized to 3x224x224")
def alexnet_tv(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
               activation: str | None = None, dropout: float | None = None) -> nn.Module:
    return _tv("alexnet", num_classes, dropout=0.5 if dropout is None else dropout)


@register_model("googlenet", settings=("dropout",), source="torchvision.models.googlenet (no aux heads), input resized")
def googlenet(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
              activation: str | None = None, dropout: float | None = None) -> nn.Module:
    return _tv("googlenet", num_classes, aux_logits=False, init_weights=True,
               transform_input=False, dropout=0.2 if dropout is None else dropout)


@register_model("resnet18", settings=(), source="torchvision.models.resnet18, input resized to 3x224x224")
def resnet18(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
             activation: str | None = None, dropout: float | None = None) -> nn.Module:
    return _tv("resnet18", num_classes)


@register_model("vgg16", settings=("dropout",), source="torchvision.models.vgg16 (no batch norm), input resized")
def vgg16(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
          activation: str | None = None, dropout: float | None = None) -> nn.Module:
    return _tv("vgg16", num_classes, dropout=0.5 if dropout is None else dropout)
