"""Backends behind one tiny interface: `train_step(micro_batches) -> mean local loss`.

Each engine owns gradient accumulation, clipping, precision and the optimizer/LR step, all
configured by the DeepSpeed JSON (the single source of truth for those knobs):
  DeepSpeedEngine  `deepspeed.initialize` with our optimizer as the client optimizer
  SingleEngine     one process, plain PyTorch (no DeepSpeed runtime), same numerics
  FSDPEngine       FSDP2 (`fully_shard`, ZeRO-3): every parameter sharded across ranks; the
                   model is sharded by `shard_model` before the optimizer is built

Optimizers that synchronise gradients themselves (the block optimizer only reduces the blocks
it trains) set `syncs_grads`: the engine then neither all-reduces nor clips (the optimizer clips
after its own reduction, so the norm is global).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from scaletrain.dist.runtime import DistContext
from scaletrain.models.llama import causal_lm_loss

log = logging.getLogger("scaletrain")


def resolve_precision(ds_config: dict[str, Any]) -> dict[str, Any]:
    """bf16.enabled 'auto' (as in the HF integration) means: on where the device supports it."""
    ds = dict(ds_config)
    bf16 = dict(ds.get("bf16", {}))
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    ds["bf16"] = bf16
    return ds


def bf16_enabled(ds_config: dict[str, Any]) -> bool:
    return bool(ds_config.get("bf16", {}).get("enabled", False))


def _as_float(norm) -> float:
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP


class SingleEngine:
    """World size 1, no DeepSpeed runtime: accumulation, clipping and bf16 autocast by hand."""

    def __init__(self, model, optimizer, scheduler, ds_config: dict, ctx: DistContext,
                 syncs_grads: bool):
        self.module = model.to(ctx.device)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.clip = 0.0 if syncs_grads else float(ds_config.get("gradient_clipping", 0.0))
        self.autocast = bf16_enabled(ds_config)
        self.device = ctx.device
        self.grad_norm: float | None = None

    def _autocast(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_step(self, micro_batches: list[torch.Tensor]) -> float:
        total = 0.0
        for i, mb in enumerate(micro_batches):
            self._sync_grads(i == len(micro_batches) - 1)
            with self._autocast():
                loss = causal_lm_loss(self.module, mb.to(self.device))
            (loss / len(micro_batches)).backward()
            total += loss.item()
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.clip > 0:
            self.grad_norm = _as_float(torch.nn.utils.clip_grad_norm_(params, self.clip))
        else:
            self.grad_norm = _as_float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_norm = getattr(self.optimizer, "last_grad_norm", self.grad_norm)
        return total / len(micro_batches)

    def _sync_grads(self, last_micro_batch: bool) -> None:
        pass  # one process: nothing to synchronise

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    owns_optimizer_checkpoint = False


def shard_model(model, ds_config: dict, ctx: DistContext):
    """FSDP2: shard each decoder layer, then the root (embedding, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(ctx.device)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if bf16_enabled(ds_config) else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


class FSDPEngine(SingleEngine):
    """FSDP2: the same step as SingleEngine; FSDP reduce-scatters (averages) gradients across ranks
    in backward, so parameters, gradients and AdamW state are all sharded (ZeRO-3)."""

    def __init__(self, model, optimizer, scheduler, ds_config: dict, ctx: DistContext,
                 syncs_grads: bool):
        if syncs_grads:
            raise NotImplementedError("the block optimizer does not run under --backend fsdp yet; "
                                      "use --backend deepspeed")
        super().__init__(model, optimizer, scheduler, ds_config, ctx, syncs_grads)
        self.autocast = False  # FSDP's MixedPrecisionPolicy casts instead

    def _sync_grads(self, last_micro_batch: bool) -> None:
        self.module.set_requires_gradient_sync(last_micro_batch)  # reduce once per step


class DeepSpeedEngine:
    """`deepspeed.initialize` with our optimizer and LR schedule as client objects."""

    def __init__(self, model, optimizer, scheduler, ds_config: dict, ctx: DistContext,
                 syncs_grads: bool):
        import deepspeed

        ds = dict(ds_config)
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        self.autocast = False
        if syncs_grads:
            # DeepSpeed's ZeRO flattens parameters into 1-D partitions, destroying the per-tensor
            # structure block selection needs; the engine runs at stage 0 and leaves gradient
            # reduction and clipping to the optimizer (which reduces selected blocks only).
            ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": 0}
            ds["gradient_clipping"] = 0.0
            if bf16_enabled(ds):  # keep fp32 weights (the master copy) and compute in bf16
                ds["bf16"] = {"enabled": False}
                self.autocast = True
            if ctx.is_main:
                log.info("block optimizer: DeepSpeed engine runs at ZeRO stage 0 (requested %d); "
                         "gradient reduction and clipping (%.3g) are done by the optimizer over "
                         "the selected blocks", stage, float(ds_config.get("gradient_clipping", 0)))
        self.zero_stage = ds["zero_optimization"].get("stage", 0) if "zero_optimization" in ds else 0
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
        if syncs_grads:
            self.engine.enable_backward_allreduce = False
        self.module = self.engine.module
        self.device = ctx.device
        self.syncs_grads = syncs_grads
        self.grad_norm: float | None = None

    def train_step(self, micro_batches: list[torch.Tensor]) -> float:
        total = 0.0
        for mb in micro_batches:
            with (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast
                  else contextlib.nullcontext()):
                loss = causal_lm_loss(self.engine, mb.to(self.device))
            self.engine.backward(loss)
            if self.engine.is_gradient_accumulation_boundary() and self.zero_stage == 0:
                # stage 0: gradients are all-reduced now and not yet clipped
                grads = [p.grad for p in self.module.parameters() if p.grad is not None]
                self.grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            self.engine.step()
            total += loss.item()
        if self.syncs_grads:
            self.grad_norm = self.optimizer.last_grad_norm
        elif self.zero_stage > 0:
            norm = self.engine.get_global_grad_norm()
            self.grad_norm = None if norm is None else float(norm)
        return total / len(micro_batches)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def owns_optimizer_checkpoint(self) -> bool:
        """Dense AdamW under ZeRO 1/2: the state is DeepSpeed's flat partitions, which only
        DeepSpeed's own checkpoint format can save (resume at the same world size)."""
        return self.zero_stage > 0 and not self.syncs_grads

    def save_engine_state(self, directory) -> None:
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="zero", save_latest=False)

    def load_engine_state(self, directory) -> None:
        self.engine.load_checkpoint(str(directory / "deepspeed"), tag="zero",
                                    load_optimizer_states=True, load_lr_scheduler_states=False)


ENGINES = {"deepspeed": DeepSpeedEngine, "single": SingleEngine, "fsdp": FSDPEngine}


def build_engine(backend: str, model, optimizer, scheduler, ds_config, ctx, syncs_grads: bool):
    return ENGINES[backend](model, optimizer, scheduler, ds_config, ctx, syncs_grads)
