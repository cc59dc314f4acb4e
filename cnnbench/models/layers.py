"""Small pieces shared by the architectures: activations by name, flattened sizes, and
channel concatenation as a module (so that wide.py can keep each trial's channels together)."""

from __future__ import annotations

import torch
from torch import nn

# name -> module class; every model's `activation` setting draws from this table
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


@torch.no_grad()
def flat_size(features: nn.Module, in_channels: int, image_size: int) -> int:
    """Number of features `features` yields for one image (sizes the first linear layer)."""
    was_training = features.training
    features.eval()
    out = features(torch.zeros(1, in_channels, image_size, image_size))
    features.train(was_training)
    if out.shape[-1] < 1 or out.numel() == 0:
        raise ValueError(f"input {in_channels}x{image_size}x{image_size} is too small for this model")
    return out.numel()


class Concat(nn.Module):
    """`torch.cat(xs, dim=1)`: branches joined on channels (Inception). A module, not a call
    in `forward`, so that the widening transform (wide.py) can replace it with one that
    joins the branches of each trial separately."""

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, dim=1)


# every batch norm class (torch's common base of them is private)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
