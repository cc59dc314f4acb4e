"""LeNet-5 as document 003 builds it, and the all-ReLU LeNet of document 000.

Departures from LeCun et al. (1998), as both documents make them: C1 pads the 28x28
MNIST image by 2 instead of taking a 32x32 input, C3 connects every S2 map (the paper's
sparse table has 1,516 parameters, this layer 2,416), S2/S4 are max-pools without
trainable coefficients, C5 is a linear layer on the flattened 16x5x5 maps (the same maps,
the same 48,120 parameters) and the RBF output layer is a plain linear layer.
"""

from __future__ import annotations

from torch import Tensor, nn

from cnnbench.models.layers import activation as make_activation
from cnnbench.models.layers import flat_size
from cnnbench.models.registry import register_model


class LeNet(nn.Module):
    """C1 - S2 - C3 - S4 - C5 - F6 - output, with a chosen activation after each part.

    `pool_act` follows S2 and S4 (document 003 pools first, then applies the
    activation), `c5_act` follows C5 (None: linear, as document 003), `f6_act` follows F6.
    """

    def __init__(self, *, in_channels: int, num_classes: int, image_size: int,
                 pool_act: str, c5_act: str | None, f6_act: str, act_before_pool: bool) -> None:
        super().__init__()
        act = make_activation
        c1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)  # N x 6 x 28 x 28
        c3 = nn.Conv2d(6, 16, kernel_size=5)  # N x 16 x 10 x 10
        if act_before_pool:  # document 000: conv -> ReLU -> pool
            layers = [c1, act(pool_act), nn.MaxPool2d(2), c3, act(pool_act), nn.MaxPool2d(2)]
        else:  # document 003: conv -> pool -> sigmoid
            layers = [c1, nn.MaxPool2d(2), act(pool_act), c3, nn.MaxPool2d(2), act(pool_act)]
        self.features = nn.Sequential(*layers)  # N x 16 x 5 x 5
        n = flat_size(self.features, in_channels, image_size)  # 400 for 28 x 28
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(n, 120),  # C5: N x 120
            act(c5_act) if c5_act else nn.Identity(),
            nn.Linear(120, 84),  # F6: N x 84
            act(f6_act),
            nn.Linear(84, num_classes),  # output: N x 10
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model("lenet5", source="document 003: sigmoid after S2/S4, linear C5, tanh F6")
def lenet5(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
           activation: str | None = None, dropout: float | None = None) -> nn.Module:
    """`activation=None` or "sigmoid" is document 003's network (sigmoid, tanh on F6);
    any other name replaces every sigmoid and tanh, as its ReLU comparison does."""
    pool_act = activation or "sigmoid"
    f6_act = "tanh" if pool_act == "sigmoid" else pool_act
    return LeNet(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                 pool_act=pool_act, c5_act=None, f6_act=f6_act, act_before_pool=False)


@register_model("lenet", source="document 000: ReLU after every conv and hidden linear layer")
def lenet(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
          activation: str | None = None, dropout: float | None = None) -> nn.Module:
    """Document 000's LeNet (61,706 parameters on MNIST): conv -> ReLU -> pool twice, then
    400 -> 120 -> 84 -> 10 with ReLU on both hidden layers. It differs from `lenet5` with
    `activation=relu` only in the ReLU after C5."""
    act = activation or "relu"
    return LeNet(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                 pool_act=act, c5_act=act, f6_act=act, act_before_pool=True)
