"""Where each parameter's elements live in DeepSpeed ZeRO-1/2's flat fp32 partitions, computed from
the ZeRO optimizer's public attributes only (`bit16_groups`, `round_robin_bit16_groups`,
`partition_size`, `parameter_alignment`, `real_dp_process_group`), so that a rank can read from a
checkpoint just the part of each parameter's state it keeps.

ZeRO-1/2 (deepspeed/runtime/zero/stage_1_and_2.py) concatenates each parameter group, in
`round_robin_bit16_groups[i]` order, into one flat buffer (with `parameter_alignment` on, each
parameter but the last is padded to 16 bytes; the buffer's end is padded for the ranks) and gives
data-parallel rank r the elements [r * partition_size[i], (r + 1) * partition_size[i])."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Fragment:
    """The elements [start, stop) of a flattened parameter that this rank keeps, at
    `flat_start` of its flat partition of parameter group `group`."""
    group: int
    start: int
    stop: int
    flat_start: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


def flat_offsets(params: list[torch.Tensor], parameter_alignment: bool) -> list[int]:
    """Each parameter's first element in its group's flat buffer, as ZeRO lays the buffer out:
    in order, each but the last padded to a 16-byte boundary when parameter_alignment is on."""
    offsets, at = [], 0
    for i, p in enumerate(params):
        offsets.append(at)
        at += p.numel()
        if parameter_alignment and i < len(params) - 1:
            at += -at % (16 // math.gcd(16, p.element_size()))
    return offsets


def _dp_rank(zero, group: int) -> int:
    return dist.get_rank(group=zero.real_dp_process_group[group]) if dist.is_initialized() else 0


def _flat_order(zero, group: int) -> list[torch.Tensor]:
    """The group's parameters in the order ZeRO flattened them (reordered when
    round_robin_gradients is on)."""
    order = getattr(zero, "round_robin_bit16_groups", None)
    if order is None:  # a DeepSpeed without round-robin ordering flattens in bit16_groups order
        assert not getattr(zero, "round_robin_gradients", False)
        return list(zero.bit16_groups[group])
    return list(order[group])


def local_fragments(zero, names: dict[int, str]) -> dict[str, Fragment]:
    """parameter name -> its Fragment on this rank, for the parameters that have elements in this
    rank's partitions (a parameter wholly in other ranks' partitions is left out). `names` maps
    each parameter's id() to its name."""
    found = {}
    for group in range(len(zero.bit16_groups)):
        params = _flat_order(zero, group)
        size = int(zero.partition_size[group])
        first = _dp_rank(zero, group) * size
        for p, at in zip(params, flat_offsets(params, bool(getattr(zero, "parameter_alignment", False)))):
            lo, hi = max(at, first), min(at + p.numel(), first + size)
            if lo < hi:
                found[names[id(p)]] = Fragment(group, lo - at, hi - at, lo - first)
    return found
