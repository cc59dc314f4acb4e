"""Data sets as tensors on the training device: load, split, batch, augment."""
