"""The non-finite policy's bookkeeping, shared by pretraining and fine-tuning: a step whose
global loss or gradient norm is not finite has been skipped on every rank by the engine; here it
is counted, logged with its step, and too many in a row stop the run."""
from __future__ import annotations

import logging

log = logging.getLogger("scaletrain")


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
