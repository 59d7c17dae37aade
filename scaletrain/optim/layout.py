"""Where each block lives: which rank owns it, which ranks hold its state, which rows are local.

The one copy of that arithmetic, used by the block optimizer at run time and by
scaletrain.memory_estimate for hypothetical world sizes (so the estimate cannot drift from what
the optimizer does). The ZeRO stage is realised per block:

  replicated   one rank, or stage 0: every rank holds every selected block's state (DDP)
  owner        stages 1 and 2: each block's state on its one owner (selection.owner_map)
  FSDP rows    FSDP2 with plain Adam (fp32 or 8-bit moments, quantized row by row): every rank
               holds its Shard(0) rows of every block
  FSDP owner   FSDP2 with a projected state (the basis needs the whole block): the block's
               state on its owner, its rows gathered there for the update

Under FSDP2 a parameter is torch.chunk'ed by rows: ceil(rows / W) rows per rank, the last ranks
possibly short or empty.
"""
from __future__ import annotations

import math

import torch.distributed as dist

from scaletrain.optim.selection import Block, owner_map


def shard_rows(rows: int, block_rows: tuple[int, int] | None, rank: int, world: int) -> tuple[int, int, int]:
    """(first, end) rows of a block (`block_rows` of a parameter with `rows` rows; None: all of
    them) that fall in `rank`'s Shard(0) chunk, and the chunk's first row (the local tensor's
    offset). first == end where the block has no rows on that rank."""
    a, z = block_rows or (0, rows)
    chunk = math.ceil(rows / world)
    start = min(rank * chunk, rows)
    end = min(start + chunk, rows)
    lo = max(a, start)
    return lo, max(lo, min(z, end)), start


def fsdp_row_shards(fsdp: bool, projection: str) -> bool:
    """Whether every rank keeps its rows of every block's state (FSDP2 with plain Adam; 8-bit
    moments are chunked row by row, so a rank's rows quantize as inside the whole block). A
    projected state needs the whole block, so it lives on the block's owner instead."""
    return fsdp and projection == "none"


class BlockLayout:
    """Ownership and row placement of blocks over the ranks of `group`.

    world_size/rank: fixed values for an estimate; None (the optimizer) reads them from
    torch.distributed at each call, since the optimizer may be built before the process group.
    zero_stage is set by the engine from the ds_config after construction."""

    def __init__(self, param_rows: dict[str, int], *, fsdp: bool, fsdp_rows: bool, group=None,
                 zero_stage: int = 2, world_size: int | None = None, rank: int | None = None):
        self.param_rows = param_rows  # rows (shape[0]) of each parameter, whole (not the local shard)
        self.fsdp, self.fsdp_rows = fsdp, fsdp_rows
        self.group = group
        self.zero_stage = zero_stage
        self._fixed_world, self._fixed_rank = world_size, rank
        self.owners: dict[str, int] = {}

    # ------------------------------------------------------------------ ranks
    def world(self) -> int:
        if self._fixed_world is not None:
            return self._fixed_world
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    def rank(self) -> int:
        if self._fixed_rank is not None:
            return self._fixed_rank
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    def global_rank(self, group_rank: int) -> int:
        """The process-group rank as the collectives' src/dst want it (the default group's)."""
        return dist.get_global_rank(self.group, group_rank) if self.group is not None else group_rank

    # ------------------------------------------------------------------ ownership
    def assign(self, blocks: list[Block]) -> dict[str, int]:
        """Owners of these blocks at the current world size (the same map on every rank)."""
        self.owners = owner_map(blocks, self.world())
        return self.owners

    @property
    def replicated(self) -> bool:
        """Every rank holds every block's whole state (one rank, or stage 0)."""
        return not self.fsdp and (self.zero_stage == 0 or self.world() == 1)

    @property
    def owner_sharded(self) -> bool:
        """Stages 1 and 2 off FSDP: state on owners, weights broadcast from them after the update."""
        return self.world() > 1 and self.zero_stage > 0 and not self.fsdp

    def holds(self, name: str, rank: int | None = None) -> bool:
        """Whether `rank` (default: this one) keeps and updates the block's state: its owner, or
        every rank where nothing is owner-sharded (stage 0, one rank, FSDP rows)."""
        rank = self.rank() if rank is None else rank
        return self.fsdp_rows or self.zero_stage == 0 or self.world() == 1 or self.owners[name] == rank

    def state_moves(self) -> bool:
        """Whether a kept state can change rank on reselection (not where every rank holds its part)."""
        return not (self.fsdp_rows or self.zero_stage == 0)

    # ------------------------------------------------------------------ rows
    def local_rows(self, b: Block, rank: int | None = None) -> tuple[int, int, int]:
        """(first, end) rows of block b held on `rank` (default: this one), and the offset of the
        local tensor: the whole block off FSDP; under FSDP2 its rows in that rank's Shard(0) chunk."""
        rows = self.param_rows[b.param]
        if not self.fsdp:
            a, z = b.rows or (0, rows)
            return a, z, 0
        return shard_rows(rows, b.rows, self.rank() if rank is None else rank, self.world())

    def rows_of_rank(self, b: Block, rank: int) -> int:
        """How many of block b's rows `rank` holds (FSDP2)."""
        lo, hi, _ = shard_rows(self.param_rows[b.param], b.rows, rank, self.world())
        return hi - lo

    def rows_per_rank(self, b: Block) -> list[int]:
        return [self.rows_of_rank(b, r) for r in range(self.world())]
