"""The one interface between the training loop and the maths of a step: `Engine`.

An engine holds K trials' models and optimizers (K = 1 for `single.SingleEngine`; K
stacked and vmapped for `fused.FusedEngine`; K as one wide model for `wide.WideEngine`)
and does their steps; the loop (loop.py) draws the batches, keeps the schedules and
records, and calls only what is listed here. A trial's state goes out and in in
SingleEngine's format whatever the engine (checkpoints resume on any of them).
`state_tensors` (every tensor a step changes), which a CUDA graph's warm-up restores, is
optional: an engine without it trains eagerly (graphs.graph_reason).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Engine(Protocol):
    """K trials' optimisation steps, as the loop asks for them."""

    k: int  # trials trained together
    eval_images: int | None  # test images per forward pass, at most (loop.evaluate); None: no limit
    # True: trials on several seeds get one batch per stream, (S, B, ...) in the order of the
    # distinct seeds, and the engine gives each trial its stream's (wide.py); False: (K, B, ...)
    per_stream: bool

    def begin_epoch(self, lrs: list[list[float]]) -> None:
        """`lrs[step][k]`: the learning rates, one row for the whole epoch or one per step."""

    def deactivate(self, k: int) -> None:
        """Stop trial k (diverged or pruned): its rate becomes 0, the others go on."""

    def train(self, mode: bool) -> None:
        """Training (dropout on, batch statistics) or evaluation mode."""

    def train_step(self, x: Tensor, y: Tensor, step: int) -> Tensor:
        """One step of every trial on the batch (B, ...) all share, the K batches (K, B, ...)
        or, where `per_stream`, the S streams' (S, B, ...); the K training losses, on the
        device (no host sync)."""

    def eval_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per trial, the summed loss and the count of right answers on one test batch."""

    def trial_state(self, k: int) -> dict[str, Any]:
        """Trial k's model and optimizer state ({"model": ..., "optimizer": ...}), copied."""

    def load_trial_state(self, k: int, state: dict[str, Any]) -> None:
        """Trial k restored from `trial_state`'s format (a checkpoint)."""
