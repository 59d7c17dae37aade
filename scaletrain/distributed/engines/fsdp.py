"""FSDP2 (`fully_shard`, ZeRO-3): `shard_model` shards the model before the optimizer is built;
FSDPEngine runs SingleEngine's step while FSDP reduce-scatters the gradients."""
from __future__ import annotations

import torch

from scaletrain.distributed.engines.precision import bf16_enabled
from scaletrain.distributed.engines.single import SingleEngine
from scaletrain.distributed.runtime import DistContext


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

    bf16_weights_by_engine = False  # the MixedPrecisionPolicy of shard_model casts

    def __init__(self, model, optimizer, scheduler, ds_config: dict, ctx: DistContext,
                 syncs_grads: bool):
        super().__init__(model, optimizer, scheduler, ds_config, ctx, syncs_grads)
        self.autocast = False  # FSDP's MixedPrecisionPolicy casts instead

    def _sync_grads(self, last_micro_batch: bool) -> None:
        self.module.set_requires_gradient_sync(last_micro_batch)  # reduce once per step

    def grad_leaves(self) -> dict[str, torch.Tensor]:
        """The unsharded parameters autograd accumulates into (FSDP2 creates them at the first
        all-gather and reuses them), found through the public unshard() one FSDP module at a time,
        so no rank ever holds more than one layer unsharded (at 7B, not the whole model). Inner
        modules come first: the root's listing then shows their parameters sharded again, and
        the unsharded tensors recorded for them are kept."""
        from torch.distributed.fsdp import FSDPModule

        leaves: dict[str, torch.Tensor] = {}
        fsdp_modules = [(n, m) for n, m in self.module.named_modules() if isinstance(m, FSDPModule)]
        for prefix, m in reversed(fsdp_modules):
            m.unshard()
            for name, p in m.named_parameters():
                leaves.setdefault(f"{prefix}.{name}" if prefix else name, p)
            m.reshard()
        return leaves
