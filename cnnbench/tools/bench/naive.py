"""The naive loop: what a user writes from the documents, the baseline every bench
ratio is against. torchvision MNIST with ToTensor and Normalize, a shuffled DataLoader,
`.to(device)` per batch, `loss.item()` every step, trials one after another."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from cnnbench.config.trial import TrialConfig
from cnnbench.data.tensors import dataset_info
from cnnbench.models import get_model
from cnnbench.train.device import sync


def naive_trial(config: TrialConfig, root: Path, device: torch.device, *, epochs: int = 1,
                max_steps: int | None = None, evaluate: bool = False, warm: int = 10) -> tuple[float, float]:
    """The documents' loop. Returns (training images/s after `warm` untimed steps, total seconds)."""

    start = time.perf_counter()
    info = dataset_info(config.dataset)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])
    cls = getattr(torchvision.datasets, info.torchvision_class)
    train, test = cls(root=str(root), train=True, transform=tf), cls(root=str(root), train=False, transform=tf)
    if max_steps is not None:
        train = Subset(train, range(min(len(train), (max_steps + warm) * config.batch_size)))
    loader = DataLoader(train, batch_size=config.batch_size, shuffle=True)
    torch.manual_seed(config.seed)
    model = get_model(config.model, in_channels=info.channels, num_classes=info.classes, image_size=info.size,
                      activation=config.activation).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    running, seen, t0 = 0.0, 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for i, (x, y) in enumerate(loader):
            if epoch == 0 and i == warm:
                sync(device)
                t0, seen = time.perf_counter(), 0
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            running += loss.item()  # as the documents print the running loss
            seen += x.shape[0]
        if evaluate:
            model.eval()
            correct = 0
            with torch.no_grad():
                for x, y in DataLoader(test, batch_size=config.test_batch_size):
                    x, y = x.to(device), y.to(device)
                    correct += (model(x).argmax(1) == y).sum().item()
    sync(device)
    end = time.perf_counter()
    return seen / (end - t0), end - start


def naive_loop(config: TrialConfig, root: Path, device: torch.device, steps: int) -> float:
    """Training images/s of the naive loop over `steps` timed steps (after its warm-up ones)."""
    return naive_trial(config, root, device, max_steps=steps)[0]
