"""The training loop, once, for pretraining, fine-tuning and the benchmarks.

    for step in range(start, stop):
        batches = next_batches()          # data; its wait is timed apart (data_wait_s)
        out = step_fn(step, batches)      # Step below, or fine-tuning's zeroth-order step
        for hook in hooks:                # log / eval / checkpoint / figures, each on its schedule
            hook(out)

`Step` is the first-order step: a selection pass when a block optimizer wants one, the engine's
train step (accumulation, clipping, the non-finite check, the optimizer and LR step), the global
loss, the skipped-step count (too many in a row raise NonFiniteError) and the loss handed to the
block optimizer. Sync points (collectives every rank must reach) are marked "sync:".

`closing_run` is the run's try/finally: whatever ends the run, the things registered on it
(metrics writer, progress bar, background checkpoint saver) are closed, then the process group;
a collective that fails because another rank is gone becomes RankLostError naming the step.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch.distributed as dist

from scaletrain.distributed.runtime import (DistContext, all_reduce_mean, is_peer_failure, lost_rank_message,
                                            shutdown)
from scaletrain.models.llama import causal_lm_loss
from scaletrain.nonfinite import SkippedSteps
from scaletrain.optim.selecting import SelectsBlocks

log = logging.getLogger("scaletrain")


class RankLostError(RuntimeError):
    """A collective failed because another rank died or did not answer within collective_timeout_s."""


@dataclass
class Progress:
    step: int = 0  # the step being trained, numbered as in metrics.jsonl; 0 before the first


@dataclass
class StepOut:
    step: int  # numbered as in metrics.jsonl: 1 = the first step
    loss: float  # global mean loss
    skipped: bool = False  # non-finite: no update on any rank
    selected: bool = False  # a selection pass ran before the step
    forwards: int = 0  # forward passes over micro-batches, the selection pass's included
    lr: float = 0.0
    extra: dict = field(default_factory=dict)  # the step function's own figures (ZO: projected gradient)
    seconds: float = 0.0  # the whole step, the wait for data included (set by `run`)
    data_wait_s: float = 0.0  # of which waiting for data (set by `run`)


class Step:
    """The first-order step: (step, micro_batches) -> StepOut. loss_fn(module, micro_batch) -> mean
    loss; poison_at: steps (1-based) whose gradient the NaN test hook poisons (NAN_GRAD_ENV)."""

    def __init__(self, engine, optimizer, ctx: DistContext, loss_fn=causal_lm_loss,
                 max_skipped_steps: int = 10, poison_at: set[int] | frozenset = frozenset()):
        self.engine, self.optimizer, self.ctx, self.loss_fn = engine, optimizer, ctx, loss_fn
        self.selects = isinstance(optimizer, SelectsBlocks)
        self.skipped = SkippedSteps(max_skipped_steps)
        self.poison_at = poison_at

    def selection_pass(self, batches: list, step: int) -> None:
        """One backward with every block trainable, to measure fresh gradient norms for selection."""
        with self.optimizer.selection_pass(self.engine.grad_leaves(), step=step):
            for mb in batches:
                self.loss_fn(self.engine.module, mb.to(self.ctx.device)).backward()

    def __call__(self, step: int, batches: list) -> StepOut:
        selected = self.selects and self.optimizer.wants_selection(step)
        if selected:
            self.selection_pass(batches, step)
        local = self.engine.train_step(batches, loss_fn=self.loss_fn, poison=step + 1 in self.poison_at)
        loss = all_reduce_mean(local, self.ctx)  # sync: the global loss (the engine skipped on every rank alike)
        self.skipped.record(step + 1, self.engine.step_skipped, loss)  # may raise NonFiniteError
        if self.selects and not self.engine.step_skipped:
            self.optimizer.record_loss(loss)  # BlockLLM's patience rule
        return StepOut(step + 1, loss, skipped=self.engine.step_skipped, selected=selected,
                       forwards=len(batches) * (2 if selected else 1), lr=self.engine.lr)


def run(step_fn: Callable[[int, list], StepOut], next_batches: Callable[[], list], start: int, stop: int,
        hooks: tuple[Callable[[StepOut], None], ...] | list = (), progress: Progress | None = None,
        barrier: bool = False) -> StepOut | None:
    """Steps start..stop-1 (0-based); returns the last StepOut (None if none ran).
    barrier: every rank waits for the others before each step's clock starts (benchmarks)."""
    out = None
    for step in range(start, stop):
        if progress is not None:
            progress.step = step + 1
        if barrier and dist.is_initialized():
            dist.barrier()  # sync: the ranks start the step together
        t0 = time.perf_counter()  # the step's time includes waiting for data: a starved GPU shows
        batches = next_batches()
        waited = time.perf_counter() - t0
        out = step_fn(step, batches)
        out.seconds, out.data_wait_s = time.perf_counter() - t0, waited
        for hook in hooks:
            hook(out)
    return out


def due(done: int, every: int, last: int) -> bool:
    """Whether a periodic action (every N steps; 0: only at the end) runs after step `done`."""
    return (every > 0 and done % every == 0) or done == last


@contextlib.contextmanager
def closing_run(ctx: DistContext, progress: Progress) -> Iterator[contextlib.ExitStack]:
    """The run's try/finally; register closers on the ExitStack it yields."""
    finished = False
    try:
        with contextlib.ExitStack() as closing:
            yield closing
        finished = True
    except RuntimeError as e:
        if ctx.world_size > 1 and is_peer_failure(e):
            message = lost_rank_message(ctx, progress.step, e)
            log.error("%s", message)
            raise RankLostError(message) from e
        raise
    finally:
        shutdown(clean=finished)
