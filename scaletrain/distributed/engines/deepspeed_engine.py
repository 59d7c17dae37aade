"""DeepSpeedEngine: `deepspeed.initialize` with our optimizer and LR schedule as client objects, at
ZeRO stage 0, 1 or 2 (check_zero_stage refuses 3: FSDP2 is scaletrain's ZeRO-3). Its ZeRO-1/2
optimizer state in checkpoints is zero_state.py's."""
from __future__ import annotations

import contextlib
import logging

import torch

from scaletrain.distributed.engines.zero_state import load_optimizer_states as load_zero_states
from scaletrain.distributed.engines.zero_state import optimizer_shard as zero_optimizer_shard
from scaletrain.distributed.engines.zero_state import state_ranges as zero_state_ranges
from scaletrain.distributed.engines.precision import bf16_enabled, use_bf16_weights
from scaletrain.distributed.runtime import DistContext
from scaletrain.models.llama import causal_lm_loss
from scaletrain.nonfinite import local_gradients, poison_gradient, skipped_update, step_is_finite

log = logging.getLogger("scaletrain")


def check_zero_stage(ds_config: dict, backend: str) -> None:
    """ZeRO-3 partitions the parameters themselves, which neither the block optimizer (whole blocks)
    nor our checkpoints (full weights, name-keyed state) handle under DeepSpeed; FSDP2 is our ZeRO-3."""
    from scaletrain.config_fields import ConfigError

    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if backend == "deepspeed" and stage not in (0, 1, 2):
        raise ConfigError(f"deepspeed_config: zero_optimization.stage {stage} is not supported under "
                          f"the DeepSpeed backend (stages 0-2); for sharded parameters (ZeRO-3) use "
                          f"--backend fsdp (e.g. torchrun ... --backend fsdp)")


STAGE_MEANING = {0: "states replicated, gradients all-reduced",
                 1: "each block's state on one owner rank, gradients all-reduced",
                 2: "each block's state and reduced gradient on one owner rank"}


class DeepSpeedEngine:
    """`deepspeed.initialize` with our optimizer and LR schedule as client objects."""

    def __init__(self, model, optimizer, scheduler, ds_config: dict, ctx: DistContext,
                 syncs_grads: bool):
        import deepspeed

        from scaletrain.distributed.runtime import skip_deepspeed_shm_allreduce

        skip_deepspeed_shm_allreduce()  # (when the process group was started without DeepSpeed)
        ds = dict(ds_config)
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if syncs_grads:
            # DeepSpeed's ZeRO flattens parameters into 1-D partitions, destroying the per-tensor
            # structure block selection needs; the engine runs at stage 0 and leaves gradient
            # reduction and clipping to the optimizer (which reduces selected blocks only).
            ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": 0}
            ds["gradient_clipping"] = 0.0
            if bf16_enabled(ds):  # bf16 weights; fp32 masters of the selected blocks, on owners
                ds["bf16"] = {"enabled": False}
                use_bf16_weights(model, optimizer)
                if ctx.is_main:
                    log.info("bf16: bf16 weights on every rank, fp32 master copies of the selected "
                             "blocks on their owners, gradients accumulated and reduced in fp32")
            optimizer.zero_stage = stage  # realised by the owner partition, per block
            if ctx.is_main:
                log.info("block optimizer: DeepSpeed engine runs at ZeRO stage 0; the requested "
                         "stage %d is realised per selected block by the optimizer (%s); it also "
                         "reduces and clips (%.3g) the selected gradients", stage, STAGE_MEANING[min(stage, 2)],
                         float(ds_config.get("gradient_clipping", 0)))
        self.zero_stage = ds["zero_optimization"].get("stage", 0) if "zero_optimization" in ds else 0
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
        if syncs_grads:
            self.engine.enable_backward_allreduce = False
        self.module = self.engine.module
        self.device = ctx.device
        self.ctx = ctx
        self.syncs_grads = syncs_grads
        self.grad_norm: float | None = None
        self.step_skipped = False

    def train_step(self, micro_batches: list, loss_fn=causal_lm_loss, poison: bool = False) -> float:
        """loss_fn(module, micro_batch) -> mean loss (bf16: DeepSpeed casts the model, or the block
        optimizer keeps bf16 weights; no autocast either way). poison: see NAN_GRAD_ENV."""
        total = 0.0
        skipped_before = self.engine.skipped_steps
        finite = True
        for i, mb in enumerate(micro_batches):
            loss = loss_fn(self.engine, mb.to(self.device, non_blocking=True))
            if poison and i == len(micro_batches) - 1:
                poison_gradient(loss)
            self.engine.backward(loss)
            total += loss.item()
            boundary = self.engine.is_gradient_accumulation_boundary()
            if boundary:
                finite = step_is_finite(total / len(micro_batches),
                                        local_gradients(self.module, self.optimizer), self.ctx)
            if boundary and self.zero_stage == 0 and finite:
                # stage 0: gradients are all-reduced now and not yet clipped
                grads = [p.grad for p in self.module.parameters() if p.grad is not None]
                self.grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            # ZeRO 1/2 keep the gradients in their own partitions: only their own overflow path
            # (a non-finite global norm, checked in fp32 and, by default, bf16) clears them
            skip = boundary and not finite and self.zero_stage == 0
            with skipped_update(self.engine.optimizer) if skip else contextlib.nullcontext():
                self.engine.step()
            if skip:  # DeepSpeed clears p.grad; the block optimizer's own accumulations too
                self.optimizer.zero_grad(set_to_none=True)
        self.step_skipped = self.engine.skipped_steps > skipped_before
        if not finite and not self.step_skipped:
            log.warning("DeepSpeed ZeRO-%d applied a step whose loss was not finite (its overflow "
                        "check looks at gradients only)", self.zero_stage)
        if self.step_skipped:
            self.grad_norm = float("nan")
        elif self.syncs_grads:
            self.grad_norm = self.optimizer.last_grad_norm
        elif self.zero_stage > 0:
            norm = self.engine.get_global_grad_norm()
            self.grad_norm = None if norm is None else float(norm)
        return total / len(micro_batches)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def grad_leaves(self) -> dict[str, torch.Tensor] | None:
        return None  # the parameters themselves

    @property
    def zero_partitions_state(self) -> bool:
        """Dense AdamW under ZeRO 1/2: the state lives in DeepSpeed's flat fp32 partitions."""
        return self.zero_stage > 0 and not self.syncs_grads

    def optimizer_shard(self) -> tuple[dict, dict]:
        """ZeRO's partitioned AdamW state, name-keyed, each rank its own pieces of it (no
        communication: zero_state.optimizer_shard)."""
        return zero_optimizer_shard(self)

    def optimizer_state_ranges(self) -> dict[str, tuple[int, int]]:
        """parameter name -> the elements of its flattened state this rank keeps (ZeRO-1/2)."""
        return zero_state_ranges(self)

    def load_optimizer_states(self, step, fragments) -> None:
        """Inverse of optimizer_shard, at this run's world size, from the saved step and this
        rank's fragments of each parameter's state (zero_state.load_optimizer_states)."""
        load_zero_states(self, step, fragments)
