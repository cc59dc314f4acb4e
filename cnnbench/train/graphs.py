"""Whole training steps as CUDA graphs: one launch per step instead of hundreds.

A LeNet step on an H100 keeps the GPU busy for a fraction of its wall time: the rest is
the host launching some 60 (one trial) to 190 (16 fused trials) small kernels, one after
another (`cnnbench gpu-check`'s profile). Captured once as a CUDA graph, the whole step
(the batch gathered and normalised on the device, forward, backward, the optimizer
update) is replayed by one call, with the next batch's indices copied into a static
index buffer first. The kernels are the ones the eager step runs, so a graphed trial
computes the same numbers as the eager one.

Capture needs a few warm-up steps first (cuDNN autotuning, lazy allocations): they run
on a side stream and every tensor the step changes is restored afterwards, so the trial
starts exactly where it stood. The graph is captured again at each epoch (the learning
rate of that epoch is part of it). Where a step cannot be captured (not CUDA, an
optimizer or schedule whose per-step state lives on the host, batch augmentation drawn
from its own generator, torch.compile, an engine without `state_tensors`) the loop runs
eagerly, and a failed capture falls back to eager with the reason. Every engine has
`state_tensors` (single.py, fused.py, wide.py), so each can be graphed.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

WARM_STEPS = 3
# one capture at a time in this process: groups side by side (side_by_side.py) capture in
# their own threads, each on its own stream, and `torch.cuda.graph` frees the allocator's
# cache and synchronises the device as it begins; the background writer's copies of
# checkpoints off the device (checkpoint.on_host) take it too, never beside a capture
CAPTURE_LOCK = threading.Lock()


def graph_reason(configs: Sequence[Any], engine: Any, device: torch.device, per_step_lr: bool) -> str:
    """Why the steps of this group cannot be graphed ("" when they can)."""
    c = configs[0]
    setting = getattr(c, "cuda_graphs", None)
    if device.type != "cuda":
        return "not on CUDA"
    if setting is False:
        return "cuda_graphs is off"
    checks = [(c.optimizer != "sgd", f"optimizer {c.optimizer} keeps its step count on the host"),
              (per_step_lr, f"schedule {c.schedule} changes the rate every step"),
              (bool(c.augmentations()), "augmentation draws from its own generator"),
              (c.compile != "none", f"compile={c.compile} (torch.compile manages its own graphs)"),
              (not hasattr(engine, "state_tensors"), f"{type(engine).__name__} cannot restore its state")]
    return next((why for bad, why in checks if bad), "")


class StepGraph:
    """One captured training step of `engine` on full batches of `batch` images, drawn
    by `make_batch(index)` from `streams` index rows (one per distinct seed)."""

    def __init__(self, engine: Any, make_batch: Callable[[Tensor], tuple[Tensor, Tensor]], streams: int,
                 batch: int, device: torch.device) -> None:
        self.engine, self.make_batch = engine, make_batch
        self.index = torch.zeros(streams, batch, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: Tensor | None = None
        self.stream: torch.cuda.Stream | None = None  # the capture's, made at the first capture
        self.warm = False

    def _step(self) -> Tensor:
        x, y = self.make_batch(self.index)
        return self.engine.train_step(x, y, 0)

    def capture(self, first_index: Tensor) -> None:
        """Capture the step with the engine's current learning rates (after begin_epoch);
        the first capture warms up on a side stream and restores every changed tensor."""
        self.index.copy_(first_index)
        self.graph = None
        if not self.warm:
            saved = [t.detach().clone() for t in self.engine.state_tensors()]
            rng = torch.cuda.get_rng_state(self.index.device)
            side = torch.cuda.Stream(self.index.device)
            side.wait_stream(torch.cuda.current_stream(self.index.device))
            try:
                with torch.cuda.stream(side):
                    for _ in range(WARM_STEPS):
                        self._step()
            finally:  # also when a warm-up step failed (out of memory): the trial is untouched
                torch.cuda.current_stream(self.index.device).wait_stream(side)
                with torch.no_grad():
                    for t, s in zip(self.engine.state_tensors(), saved):
                        t.copy_(s)
                torch.cuda.set_rng_state(rng, self.index.device)
            self.warm = True
        graph = torch.cuda.CUDAGraph()
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.index.device)
        # this group's own capture stream (torch.cuda.graph's default one is shared by the
        # process); "thread_local": another group's thread may allocate meanwhile
        with CAPTURE_LOCK, torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            self.loss = self._step()
        self.graph = graph

    def replay(self, index: Tensor) -> Tensor:
        """One step on the batch `index` (streams x batch): the loss tensor, valid until
        the next replay."""
        self.index.copy_(index)
        assert self.graph is not None and self.loss is not None
        self.graph.replay()
        return self.loss
