"""Backends behind one tiny interface: `train_step(micro_batches) -> mean local loss`.

Each engine owns gradient accumulation, clipping, precision and the optimizer/LR step, all
configured by the DeepSpeed JSON (the single source of truth for those knobs):
  DeepSpeedEngine  `deepspeed.initialize` with our optimizer as the client optimizer
                   (deepspeed_engine.py; its ZeRO-1/2 optimizer state in checkpoints: zero_state.py)
  SingleEngine     one process, plain PyTorch (no DeepSpeed runtime), same numerics (single.py)
  FSDPEngine       FSDP2 (`fully_shard`, ZeRO-3): every parameter sharded across ranks; the
                   model is sharded by `shard_model` before the optimizer is built (fsdp.py)
precision.py: bf16 from the JSON, shared by the engines.

Optimizers that synchronise gradients themselves (the block optimizer only reduces the blocks
it trains) set `syncs_grads`: the engine then neither all-reduces nor clips (the optimizer clips
after its own reduction, so the norm is global).

Non-finite steps: before the optimizer step every rank checks its mean loss and its local
gradients; one all-reduce of that flag decides, identically on all ranks, whether the step is
applied. A skipped step changes no weight, moment, step count or selection and does not advance
the LR schedule; the engine clears the gradients and sets `step_skipped`. The checks, and the
NaN-gradient test hook, are scaletrain.nonfinite's (re-exported here for existing importers).
"""
from __future__ import annotations

from scaletrain.distributed.engines.deepspeed_engine import STAGE_MEANING, DeepSpeedEngine, check_zero_stage
from scaletrain.distributed.engines.fsdp import FSDPEngine, shard_model
from scaletrain.distributed.engines.precision import bf16_enabled, resolve_precision, use_bf16_weights
from scaletrain.distributed.engines.single import SingleEngine
from scaletrain.nonfinite import (NAN_GRAD_ENV, local_gradients, local_shard, nan_grad_steps, poison_gradient,
                                  skipped_update, step_is_finite)

__all__ = [
    "ENGINES", "NAN_GRAD_ENV", "STAGE_MEANING", "DeepSpeedEngine", "FSDPEngine", "SingleEngine", "bf16_enabled",
    "build_engine", "check_zero_stage", "local_gradients", "local_shard", "nan_grad_steps", "poison_gradient",
    "resolve_precision", "shard_model", "skipped_update", "step_is_finite", "use_bf16_weights",
]

ENGINES = {"deepspeed": DeepSpeedEngine, "single": SingleEngine, "fsdp": FSDPEngine}


def build_engine(backend: str, model, optimizer, scheduler, ds_config, ctx, syncs_grads: bool):
    return ENGINES[backend](model, optimizer, scheduler, ds_config, ctx, syncs_grads)
