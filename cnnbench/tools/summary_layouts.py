"""The layouts `cnnbench summary --documents` counts, and the counts its claims draw on.

Two reference layouts the registry lacks: LeCun et al.'s 1998 LeNet-5 (its sparse C3
table and RBF output) and CS231n's naive Inception module; `Counts` summarises those and
the registered models the documents describe (`cnnbench.models.summary`), once each, on
the meta device. The documents' claims about them are `summary_claims.CLAIMS`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnbench.models import get_model
from cnnbench.models.meta import on_meta
from cnnbench.models.summary import Summary, summarize


# ---- reference layouts the registry does not hold ----------------------------------------

# LeCun et al. (1998), Table I: the S2 maps each C3 map reads (document 003 describes it)
C3_MAPS = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 0), (5, 0, 1),  # 6 maps on 3 neighbours
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 0), (4, 5, 0, 1), (5, 0, 1, 2),  # 6 on 4 neighbours
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),  # 3 on 4 non-neighbours
    (0, 1, 2, 3, 4, 5),  # 1 on all 6
)


class Subsampling(nn.Module):
    """LeNet-5's S2/S4: the sum of a 2x2 block times a trainable coefficient, plus a trainable bias, per map."""
    def __init__(self, maps: int) -> None:
        super().__init__()
        self.coef = nn.Parameter(torch.ones(maps))
        self.bias = nn.Parameter(torch.zeros(maps))

    def forward(self, x: Tensor) -> Tensor:
        # the paper squashes every layer's weighted sum (a scaled tanh); the counts do not depend on it
        return torch.tanh(F.avg_pool2d(x, 2) * 4 * self.coef[:, None, None] + self.bias[:, None, None])


class SparseC3(nn.Module):
    """C3 of LeCun et al. (1998): map j convolves only the S2 maps C3_MAPS[j] (1,516 parameters)."""
    def __init__(self) -> None:
        super().__init__()
        self.maps = nn.ModuleList(nn.Conv2d(len(m), 1, kernel_size=5) for m in C3_MAPS)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([conv(x[:, list(idx)]) for conv, idx in zip(self.maps, C3_MAPS)], dim=1)


class RBFOutput(nn.Module):
    """Euclidean RBF units: y_i = sum_j (x_j - w_ij)^2, w fixed by hand (84 x 10, not trained)."""
    def __init__(self, features: int = 84, classes: int = 10) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.zeros(classes, features), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return ((x[:, None, :] - self.centres) ** 2).sum(-1)


def lenet5_1998() -> nn.Module:
    """LeNet-5 as LeCun et al. (1998) and document 003's table describe it, on 1 x 32 x 32."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), nn.Tanh(),  # C1: 6 x 28 x 28
        Subsampling(6),  # S2: 6 x 14 x 14
        SparseC3(), nn.Tanh(),  # C3: 16 x 10 x 10
        Subsampling(16),  # S4: 16 x 5 x 5
        nn.Conv2d(16, 120, kernel_size=5), nn.Tanh(),  # C5: 120 x 1 x 1
        nn.Flatten(), nn.Linear(120, 84), nn.Tanh(),  # F6: 84
        RBFOutput(),  # output: 10
    )


class NaiveInception(nn.Module):
    """CS231n lecture 9's naive Inception module on 256 x 28 x 28 (its slide; the document's
    copy lost the image but keeps the input depth 256 and the total, 854M)."""

    def __init__(self, c: int = 256) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, 128, kernel_size=1)
        self.conv3 = nn.Conv2d(c, 192, kernel_size=3, padding=1)
        self.conv5 = nn.Conv2d(c, 96, kernel_size=5, padding=2)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv1(x), self.conv3(x), self.conv5(x), self.pool(x)], dim=1)  # 672 x 28 x 28


# ---- the counts the claims draw on --------------------------------------------------------

def _meta(build: Callable[[], nn.Module]) -> nn.Module:
    with on_meta():
        return build()


class Counts:
    """Summaries of the layouts the documents describe, made once, on the meta device."""
    @functools.cached_property
    def lenet5(self) -> Summary:  # document 003's network, as cnnbench trains it (C1 padded: 28 x 28 out)
        return summarize("lenet5")

    @functools.cached_property
    def lenet(self) -> Summary:  # document 000's ReLU LeNet
        return summarize("lenet")

    @functools.cached_property
    def lenet1998(self) -> Summary:
        return summarize(_meta(lenet5_1998), (1, 32, 32))

    @functools.cached_property
    def lenet1998_trainable(self) -> int:
        return sum(p.numel() for p in _meta(lenet5_1998).parameters() if p.requires_grad)

    @functools.cached_property
    def alexnet(self) -> Summary:  # the paper's network, 1000 classes, at its native 227 x 227
        return summarize("alexnet_paper", num_classes=1000)

    @functools.cached_property
    def alexnet_277(self) -> Summary:  # its convolutional part at document 001's 277 x 277

        return summarize(_meta(lambda: get_model("alexnet_paper", num_classes=1000).net.features), (3, 277, 277))

    @functools.cached_property
    def vgg16(self) -> Summary:
        return summarize("vgg16", num_classes=1000)

    @functools.cached_property
    def vgg16_layers(self) -> list[tuple[str, nn.Module | None]]:
        """Document 004's rows in our terms: the input, then each conv, max-pool and linear layer."""

        net = _meta(lambda: get_model("vgg16", num_classes=1000).net)
        listed = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.Linear))]
        return [("input", None), *listed]

    @functools.cached_property
    def vgg16_listed_values(self) -> int:
        """Values in the outputs of the layers document 004 lists (input included)."""
        return sum(self.vgg16.row(name).activations for name, _ in self.vgg16_layers)

    @functools.cached_property
    def vgg16_relu_values(self) -> int:
        """The same, if every ReLU wrote a tensor of its own instead of working in place."""
        return self.vgg16_listed_values + sum(math.prod(r.shape) for r in self.vgg16.rows if r.type == "ReLU")

    @functools.cached_property
    def vgg16_weights(self) -> int:
        """Weights only (no biases) of the layers document 004 lists, as its params column counts."""
        return sum(m.weight.numel() for _, m in self.vgg16_layers if isinstance(m, (nn.Conv2d, nn.Linear)))

    @functools.cached_property
    def naive_inception(self) -> Summary:
        return summarize(_meta(NaiveInception), (256, 28, 28))

    def under(self, s: Summary, prefix: str, what: str) -> int:
        """Sum of a column over the rows of one module and its children."""
        return sum(getattr(r, what) for r in s.rows if r.name == prefix or r.name.startswith(prefix + "."))

    def connections(self, s: Summary, prefix: str) -> int:
        """LeCun's "connections": multiply-accumulates plus one bias input per output value."""
        outputs = sum(math.prod(r.shape) for r in s.rows
                      if r.type in ("Conv2d", "Linear") and (r.name == prefix or r.name.startswith(prefix + ".")))
        return self.under(s, prefix, "macs") + outputs
