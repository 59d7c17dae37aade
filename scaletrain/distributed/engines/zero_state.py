"""DeepSpeed ZeRO-1/2's partitioned dense-optimizer (AdamW) state to and from checkpoints, in the
name-keyed layout the other backends write, so a checkpoint resumes at any world size and under any
backend: each rank saves and loads the elements of each parameter it keeps (zero_fragments.py),
straight from and into the torch optimizer's flat state of its partition, without communication."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from scaletrain.checkpoint.pieces import piece_key
from scaletrain.distributed.engines.zero_fragments import Fragment, local_fragments

if TYPE_CHECKING:
    from scaletrain.distributed.engines.deepspeed_engine import DeepSpeedEngine


def optimizer_shard(ds: DeepSpeedEngine) -> tuple[dict, dict]:
    """ZeRO's partitioned AdamW state for DCP, without communication: each rank writes, for each
    parameter with elements in its partition, its fragment of the moments as a 1-D piece
    "optim/state/<name>/<key>@<start>-<stop>" (the elements of the flattened parameter,
    checkpoint/pieces.py), a view of the torch optimizer's flat state; the step (one for all,
    AdamW) as "optim/state/<name>/step" by the rank holding the parameter's first element. Any
    backend reads it back by name at any world size (SavedState assembles the pieces).
    Returns (flat DCP entries, metadata for trainer.pt)."""
    zero = ds.engine.optimizer
    steps = [st["step"] for st in zero.optimizer.state.values() if "step" in st]
    flat = {}
    if steps:  # nothing before the first step, as torch's lazily built state
        for name, f in _fragments(ds).items():
            state = zero.optimizer.state[zero.single_partition_of_fp32_groups[f.group]]
            for key in ("exp_avg", "exp_avg_sq"):
                # a view: DCP's writer copies each piece to the CPU as it writes it (no second
                # copy of the whole state; the background saver snapshots it first)
                piece = state[key].detach().narrow(0, f.flat_start, f.numel)
                flat[piece_key(f"optim/state/{name}/{key}", f.start, f.stop)] = piece
            if f.start == 0:  # exactly one rank holds each parameter's first element
                flat[f"optim/state/{name}/step"] = steps[0].detach().to("cpu", copy=True)
    group = {k: v for k, v in zero.param_groups[0].items() if k != "params"}
    names = [n for n, _ in ds.module.named_parameters()]
    return flat, {"kind": "torch", "param_groups": [{**group, "params": names}]}


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
    DeepSpeed's per-parameter views (its tensor-fragment API) point into them."""
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
    step), so that DeepSpeed's tensor-fragment API sees the loaded state before the next step."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    for params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(params, flat, zero.optimizer.state)

