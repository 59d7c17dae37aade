"""SingleEngine: world size 1, plain PyTorch (no DeepSpeed runtime), the same numerics as the
other engines; FSDPEngine (fsdp.py) reuses its step."""
from __future__ import annotations

import contextlib

import torch

from scaletrain.distributed.engines.precision import bf16_enabled, use_bf16_weights
from scaletrain.distributed.runtime import DistContext
from scaletrain.models.llama import causal_lm_loss
from scaletrain.nonfinite import local_gradients, poison_gradient, step_is_finite


def _as_float(norm) -> float:
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP


class SingleEngine:
    """World size 1, no DeepSpeed runtime: accumulation, clipping and bf16 autocast by hand."""

    # bf16 with the block optimizer: this engine casts the weights (FSDP2's mixed-precision policy
    # casts its own instead)
    bf16_weights_by_engine = True

    def __init__(self, model, optimizer, scheduler, ds_config: dict, ctx: DistContext,
                 syncs_grads: bool):
        self.module = model.to(ctx.device)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.clip = 0.0 if syncs_grads else float(ds_config.get("gradient_clipping", 0.0))
        self.syncs_grads = syncs_grads  # the optimizer reduces, clips and reports the norm itself
        # bf16: the block optimizer keeps bf16 weights and fp32 masters of its selected blocks;
        # a dense optimizer keeps fp32 weights and autocasts the compute
        self.autocast = bf16_enabled(ds_config) and not syncs_grads
        if bf16_enabled(ds_config) and syncs_grads and self.bf16_weights_by_engine:
            use_bf16_weights(self.module, optimizer)
        self.device = ctx.device
        self.ctx = ctx
        self.grad_norm: float | None = None
        self.step_skipped = False

    def _autocast(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_step(self, micro_batches: list, loss_fn=causal_lm_loss, poison: bool = False) -> float:
        """loss_fn(module, micro_batch) -> mean loss; the causal-LM loss, or a fine-tuning task's.
        poison: the NaN-gradient test hook (see NAN_GRAD_ENV)."""
        total = 0.0
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            self._sync_grads(last)
            with self._autocast():
                loss = loss_fn(self.module, mb.to(self.device, non_blocking=True))
            if poison and last:
                poison_gradient(loss)
            (loss / len(micro_batches)).backward()
            total += loss.item()
        mean_loss = total / len(micro_batches)
        self.step_skipped = not step_is_finite(mean_loss, local_gradients(self.module, self.optimizer), self.ctx)
        if self.step_skipped:  # no optimizer or LR step: nothing changes but the cleared gradients
            self.optimizer.zero_grad(set_to_none=True)
            self.grad_norm = float("nan")
            return mean_loss
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.clip > 0:
            self.grad_norm = _as_float(torch.nn.utils.clip_grad_norm_(params, self.clip))
        elif not self.syncs_grads:  # (a pass over every gradient and a sync: not twice)
            self.grad_norm = _as_float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_norm = getattr(self.optimizer, "last_grad_norm", self.grad_norm)
        return mean_loss

    def _sync_grads(self, last_micro_batch: bool) -> None:
        pass  # one process: nothing to synchronise

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    zero_partitions_state = False

    def grad_leaves(self) -> dict[str, torch.Tensor] | None:
        return None  # the parameters themselves
