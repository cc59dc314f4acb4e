"""AlexNet (Krizhevsky et al., 2012): the paper's layout and a copy sized for MNIST on a CPU.

Both are thin calls of `_alexnet`: five convolutions with ReLU, overlapping 3x3/stride-2
max-pools after conv1, conv2 and conv5, three linear layers with dropout 0.5 before the
first two (document 001, and torchvision's `AlexNet`).

`alexnet` changes, from the paper, and why:
- input 1 x 28 x 28 instead of 3 x 227 x 227 (MNIST); conv1 is 5x5 stride 1 padding 2,
  since an 11x11 stride-4 filter would leave a 5x5 map that the three pools cannot halve;
- widths divided by about six (96-256-384-384-256 -> 16-32-48-48-32) and the hidden
  linear layers 4096 -> 256, so that a 10-epoch MNIST run takes minutes on 2 CPU cores
  (4.3 M multiply-adds per image by `cnnbench summary`, against 0.42 M for LeNet-5 and
  1.1 G for the paper);
- no local response normalisation (document 004: "not common anymore") and no split of
  the filters over two GPUs.
`alexnet_paper` keeps the paper's sizes (with LRN, filters in one group), for
`cnnbench summary` (conv1: 55 x 55 x 96) and GPU runs on resized input.
"""

from __future__ import annotations

from torch import Tensor, nn

from cnnbench.models.layers import activation as make_activation
from cnnbench.models.layers import flat_size
from cnnbench.models.registry import register_model
from cnnbench.models.tv import ResizeInput


class AlexNet(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, image_size: int, widths: tuple[int, ...],
                 conv1: tuple[int, int, int], hidden: int, lrn: bool, act: str, dropout: float) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = widths
        k, stride, pad = conv1

        def norm() -> list[nn.Module]:
            return [nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)] if lrn else []

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=k, stride=stride, padding=pad),  # paper: N x 96 x 55 x 55
            make_activation(act), *norm(),
            nn.MaxPool2d(kernel_size=3, stride=2),  # paper: N x 96 x 27 x 27
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),  # paper: N x 256 x 27 x 27
            make_activation(act), *norm(),
            nn.MaxPool2d(kernel_size=3, stride=2),  # paper: N x 256 x 13 x 13
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),  # paper: N x 384 x 13 x 13
            make_activation(act),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),  # paper: N x 384 x 13 x 13
            make_activation(act),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),  # paper: N x 256 x 13 x 13
            make_activation(act),
            nn.MaxPool2d(kernel_size=3, stride=2),  # paper: N x 256 x 6 x 6
        )
        n = flat_size(self.features, in_channels, image_size)  # paper: 9216
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(n, hidden),  # FC6
            make_activation(act),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),  # FC7
            make_activation(act),
            nn.Linear(hidden, num_classes),  # FC8
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _alexnet(*, in_channels: int, num_classes: int, image_size: int, activation: str | None,
             dropout: float | None, **layout) -> AlexNet:
    return AlexNet(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                   act=activation or "relu", dropout=0.5 if dropout is None else dropout, **layout)


@register_model("alexnet", settings=("activation", "dropout"),
                source="document 001's layer pattern, sized for 28x28 MNIST on a CPU")
def alexnet(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
            activation: str | None = None, dropout: float | None = None) -> nn.Module:
    return _alexnet(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                    activation=activation, dropout=dropout, widths=(16, 32, 48, 48, 32),
                    conv1=(5, 1, 2), hidden=256, lrn=False)


@register_model("alexnet_paper", settings=("activation", "dropout"),
                source="Krizhevsky et al. 2012 / documents 001 and 004: 227x227 input, LRN")
def alexnet_paper(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                  activation: str | None = None, dropout: float | None = None) -> nn.Module:
    """The paper's network on 3 x 227 x 227 input; other inputs are resized and their
    channels repeated (an MNIST digit becomes a 227 x 227 grey RGB image)."""
    net = _alexnet(in_channels=3, num_classes=num_classes, image_size=227, activation=activation,
                   dropout=dropout, widths=(96, 256, 384, 384, 256), conv1=(11, 4, 0), hidden=4096, lrn=True)
    return ResizeInput(net, size=227, channels=3)
