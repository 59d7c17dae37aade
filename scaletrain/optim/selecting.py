"""What the training loop may ask of an optimizer that trains a changing selection of blocks
(the block optimizer; dense GaLore is one that selects everything). The loop checks
`isinstance(optimizer, SelectsBlocks)` once instead of probing for methods. (The selection's own
arithmetic, blocks, scores and owners, is scaletrain.optim.selection.)"""
from __future__ import annotations

from typing import ContextManager, Protocol, runtime_checkable

import torch


@runtime_checkable
class SelectsBlocks(Protocol):
    def wants_selection(self, step: int) -> bool:
        """Whether a selection pass should run before training step `step` (0-based); a pure query."""

    def selection_pass(self, grad_leaves: dict[str, torch.Tensor] | None = None, *,
                       step: int) -> ContextManager[None]:
        """Inside: run the backward passes whose gradient norms choose the selection for `step`."""

    def record_loss(self, loss: float) -> None:
        """The step's global loss (BlockLLM's patience rule reads it)."""

    def stats(self) -> dict:
        """Per-log figures: selected/always/inactive parameters, wire bytes, selection churn..."""
