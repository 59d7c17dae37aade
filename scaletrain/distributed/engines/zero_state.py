"""DeepSpeed ZeRO-1/2's partitioned dense-optimizer (AdamW) state to and from checkpoints, in the
name-keyed layout the other backends write, so a checkpoint resumes at any world size and under any
backend: saved through DeepSpeed's public tensor-fragment API, loaded by writing the elements each
rank keeps (zero_fragments.py) straight into the torch optimizer's flat state of its partition."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from scaletrain.distributed.engines.zero_fragments import Fragment, local_fragments

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


def _fragments(ds: DeepSpeedEngine) -> dict[str, Fragment]:
    names = {id(p): n for n, p in ds.module.named_parameters()}
    return local_fragments(ds.engine.optimizer, names)


def state_ranges(ds: DeepSpeedEngine) -> dict[str, tuple[int, int]]:
    """parameter name -> the elements [start, stop) of its flattened state this rank keeps, for
    the parameters with elements in this rank's ZeRO partitions: all a resuming rank reads."""
    return {name: (f.start, f.stop) for name, f in _fragments(ds).items()}


def load_optimizer_states(ds: DeepSpeedEngine, step: torch.Tensor | float | None, fragments) -> None:
    """Inverse of optimizer_shard, at this run's world size: ZeRO's fp32 master copy is refreshed
    from the (already restored) model weights, and each (parameter name, "exp_avg" or
    "exp_avg_sq", elements) of `fragments` (the elements state_ranges names) is written at its
    place in the torch optimizer's flat state of this rank's partition; no communication.
    step None: the checkpoint holds no optimizer state (saved before the first step)."""
    zero = ds.engine.optimizer
    zero.refresh_fp32_params()  # the master copy follows the restored weights
    if step is None:
        return
    flat_states = _flat_states(zero, step)
    where = _fragments(ds)
    for name, key, elements in fragments:
        if key in ("exp_avg", "exp_avg_sq"):
            f = where[name]
            flat_states[f.group][key].narrow(0, f.flat_start, f.numel).copy_(elements.reshape(-1))
    _link_fragments(zero)


def _flat_states(zero, step: torch.Tensor | float) -> list[dict]:
    """The torch optimizer's state of each flat partition, built now if it is not yet (torch
    builds it lazily at the first step); existing moments are kept and written over in place, as
    DeepSpeed's per-parameter views (safe_get_full_optimizer_state) point into them."""
    states = []
    for flat in zero.single_partition_of_fp32_groups:
        st = zero.optimizer.state[flat]
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in st:
                st[key] = torch.zeros_like(flat)
        if torch.is_tensor(st.get("step")):  # keep the optimizer's own step tensor (device, dtype)
            st["step"].fill_(float(step))
        else:
            st["step"] = torch.tensor(float(step), dtype=torch.float32)
        states.append(st)
    return states


def _link_fragments(zero) -> None:
    """Point each parameter's DeepSpeed fragment at the flat state (as ZeRO does after its first
    step), so that a save before the next step reads the loaded state."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    for params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(params, flat, zero.optimizer.state)


def _balanced_share(sizes: list[int], world: int) -> list[int]:
    """The rank that keeps each tensor: largest first onto the least loaded rank."""
    load, owner = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner[i] = min(range(world), key=load.__getitem__)
        load[owner[i]] += sizes[i]
    return owner
