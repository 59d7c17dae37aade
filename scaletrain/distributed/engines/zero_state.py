"""DeepSpeed ZeRO-1/2's partitioned dense-optimizer (AdamW) state to and from checkpoints, through
DeepSpeed's public tensor-fragment API, in the name-keyed layout the other backends write, so a
checkpoint resumes at any world size and under any backend."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from scaletrain.distributed.engines.deepspeed_engine import DeepSpeedEngine


def optimizer_shard(ds: DeepSpeedEngine) -> tuple[dict, dict]:
    """Collective: ZeRO's partitioned AdamW state, per parameter (DeepSpeed's public
    tensor-fragment API), in the name-keyed layout torch.distributed.checkpoint's
    get_optimizer_state_dict gives the other backends, so a checkpoint resumes at any world
    size and under any backend. Each full tensor is assembled on every rank (one parameter at
    a time) and kept by one rank only, so each rank holds and writes about 1/W of the state.
    Returns (flat "optim/state/<name>/<key>" entries for DCP, metadata for trainer.pt)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero = ds.engine.optimizer
    steps = [st["step"] for st in zero.optimizer.state.values() if "step" in st]
    named = list(ds.module.named_parameters())
    rank, world = ds.ctx.rank, ds.ctx.world_size
    mine = _balanced_share([p.numel() for _, p in named], world)
    flat = {}
    if steps:  # nothing before the first step, as torch's lazily built state
        for i, (name, p) in enumerate(named):
            for key in ("exp_avg", "exp_avg_sq"):
                full = safe_get_full_optimizer_state(p, key)  # collective
                if mine[i] == rank:
                    flat[f"optim/state/{name}/{key}"] = full.detach().cpu().view_as(p)
            if mine[i] == rank:
                flat[f"optim/state/{name}/step"] = steps[0].detach().clone().cpu()
    group = {k: v for k, v in zero.param_groups[0].items() if k != "params"}
    return flat, {"kind": "torch", "param_groups": [{**group, "params": [n for n, _ in named]}]}


def load_optimizer_states(ds: DeepSpeedEngine, states) -> None:
    """Inverse of optimizer_shard, at this run's world size, from (parameter name, whole
    state) pairs read one at a time: ZeRO's fp32 master copy is refreshed from the (already
    restored) model weights and each rank writes its own fragment of every state tensor; no
    communication. (Each rank reads every parameter's whole state, one at a time: ZeRO's flat
    fragments do not map onto DCP's row chunks.)"""
    from deepspeed.utils import safe_set_full_optimizer_state

    zero = ds.engine.optimizer
    zero.refresh_fp32_params()  # the master copy follows the restored weights
    params = dict(ds.module.named_parameters())
    built = False
    for name, st in states:
        if not built:  # torch builds its state lazily: build it now, once
            _build_zero_state(ds, st["step"])
            built = True
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(params[name], st[key].to(ds.device).reshape(-1), key)


def _build_zero_state(ds: DeepSpeedEngine, step: torch.Tensor) -> None:
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    zero = ds.engine.optimizer
    for flat in zero.single_partition_of_fp32_groups:
        zero.optimizer.state[flat] = {"step": step.detach().clone().to(torch.float32),
                                      "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    # point each parameter's fragment at the new state, as ZeRO does after its first step
    for params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(params, flat, zero.optimizer.state)


def _balanced_share(sizes: list[int], world: int) -> list[int]:
    """The rank that keeps each tensor: largest first onto the least loaded rank."""
    load, owner = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner[i] = min(range(world), key=load.__getitem__)
        load[owner[i]] += sizes[i]
    return owner
