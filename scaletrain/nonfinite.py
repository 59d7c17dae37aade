"""Non-finite steps, shared by pretraining and fine-tuning, every engine and the loop.

Detection and skipping (used by the engines): before the optimizer step every rank checks its mean
loss and its local gradients, and one all-reduce of that flag decides, identically on all ranks,
whether the step is applied (step_is_finite); a skipped one goes through the optimizer as an
overflow (skipped_update). Bookkeeping (used by the loop): a skipped step is counted, logged with
its step, and too many in a row stop the run (SkippedSteps). Also the test hook that makes one
rank's gradient NaN at chosen steps (NAN_GRAD_ENV).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os

import torch

from scaletrain.distributed.runtime import DistContext, all_reduce_max

log = logging.getLogger("scaletrain")
# Fault-injection hook for tests: "RANK:STEP[,STEP...]" makes RANK's gradient NaN (its loss stays
# finite) at those steps, numbered as in metrics.jsonl (1 = the first step).
NAN_GRAD_ENV = "SCALETRAIN_TEST_NAN_GRAD"


def nan_grad_steps(rank: int) -> set[int]:
    """The steps at which the test hook NAN_GRAD_ENV poisons this rank's gradient."""
    hook_rank, _, steps = os.environ.get(NAN_GRAD_ENV, "").partition(":")
    if not hook_rank or int(hook_rank) != rank:
        return set()
    return {int(s) for s in steps.split(",") if s}


def poison_gradient(loss: torch.Tensor) -> None:
    """Test hook: every gradient that flows back from `loss` becomes NaN; the loss value does not."""
    loss.register_hook(lambda g: torch.full_like(g, float("nan")))


def local_shard(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # this rank's shard of an FSDP2 DTensor


def step_is_finite(mean_loss: float, local_grads: list[torch.Tensor], ctx: DistContext) -> bool:
    """Collective: True on every rank iff every rank's loss and local gradient norm are finite
    (a norm overflows to inf when a gradient does, and is NaN when one is)."""
    grads = [local_shard(g) for g in local_grads if g is not None]
    norm = torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
    local_bad = not (math.isfinite(mean_loss) and math.isfinite(norm))
    return all_reduce_max(float(local_bad), ctx) == 0.0


def local_gradients(module, optimizer) -> list[torch.Tensor]:
    """The gradients this rank holds before the optimizer step (the block optimizer also keeps
    fp32 accumulations of its own under bf16 weights)."""
    if hasattr(optimizer, "pending_grads"):
        return optimizer.pending_grads()
    return [p.grad for p in module.parameters() if p.grad is not None]


@contextlib.contextmanager
def skipped_update(optimizer):
    """Inside, `optimizer.step()` does nothing and reports `overflow`: the contract DeepSpeed's
    engine honours for fp16 loss scaling (it then clears the gradients, leaves the LR schedule
    where it is and counts a skipped step), reused here for a non-finite step."""
    had_step, had_overflow = "step" in vars(optimizer), hasattr(optimizer, "overflow")
    saved_step, saved_overflow = getattr(optimizer, "step"), getattr(optimizer, "overflow", None)
    optimizer.step = lambda *args, **kwargs: None
    optimizer.overflow = True
    try:
        yield
    finally:
        if had_step:
            optimizer.step = saved_step
        else:
            del optimizer.step
        if had_overflow:
            optimizer.overflow = saved_overflow
        else:
            del optimizer.overflow


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the message names the step and what to try."""


class SkippedSteps:
    """Counts non-finite (skipped) steps; too many in a row raise NonFiniteError."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.total, self.in_a_row = 0, 0

    def record(self, step: int, was_skipped: bool, loss: float) -> None:
        if not was_skipped:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        log.warning("step %d skipped: loss %.4g, or a gradient, not finite on some rank; no update, "
                    "LR schedule held (%d in a row, %d in all)", step, loss, self.in_a_row, self.total)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                f"(train.max_skipped_steps {self.max_in_a_row}); stopping. Try a lower --optim.lr "
                f"(or longer --train.warmup_steps), or --resume an earlier checkpoint "
                f"(--resume <run_dir>/checkpoints/step_N); the last checkpoint holds finite weights.")
