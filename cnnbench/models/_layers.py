"""Small pieces shared by the architectures: activations by name, flattened sizes."""

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
