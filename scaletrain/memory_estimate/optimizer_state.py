"""The block optimizer's state bytes, per block and per rank, asked of the optimizer itself:
the update rule's `new_state` (on the meta device) for a block's layout, and
scaletrain.optim.layout for which ranks hold which blocks and rows. tests/test_memory_estimate.py
checks the results against the tensors the optimizer really allocates."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

from scaletrain.optim.layout import BlockLayout, fsdp_row_shards
from scaletrain.optim.selection import Block

PROJECTIONS = ("none", "galore", "gradnorm_lorp")


def moment_bytes(shape: Sequence[int], eight_bit: bool = False, dtype_bytes: int = 4) -> int:
    """One Adam moment tensor of `shape`: fp32, or with 8-bit (quant8) for a matrix of at least
    quant8.MIN_NUMEL values one uint8 code per value + one fp32 absmax per chunk of quant8.CHUNK
    values of a row."""
    from scaletrain.optim import quant8
    from scaletrain.optim.update_rules import MomentStore

    numel = math.prod(shape)
    if MomentStore(eight_bit).quantizes(tuple(shape)):  # the rule's own decision
        return numel + 4 * math.prod(quant8.absmax_shape(shape))
    return numel * dtype_bytes


def block_state_bytes(param: str, shape: Sequence[int], *, projection: str = "none", rank: int = 128,
                      eight_bit: bool = False, proj_patterns: Sequence[str] = ("attn", "mlp"),
                      master: bool = False, dtype_bytes: int = 4, block_numel: int | None = None) -> dict[str, int]:
    """State bytes the block optimizer's update rule keeps for one block of `shape` (a parameter,
    or a row chunk of it, or an FSDP row shard) of parameter `param`, by asking the rule itself:
    its `new_state` for such a block, allocated on the meta device (no memory). By key:
      moments      exp_avg + exp_avg_sq (projected shape when projected; 8-bit codes + absmax where
                   quant8 applies)
      projection   the GaLore basis, projected blocks only
      magnitude    gradnorm_lorp: moments of the per-row magnitudes (mag_exp_avg, mag_exp_avg_sq)
      master       bf16 runs (DeepSpeed/single): the block's fp32 master copy, 4 bytes a value
                   (BlockOptimizer keeps it next to the rule's state)
    The per-block 'step' (and 'proj_stale') are Python floats, not tensors: 0 bytes."""
    import torch

    from scaletrain.optim.update_rules import build_rule

    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, not {projection!r}")
    shape = tuple(shape)
    # update_proj_gap, proj_scale and svd change the arithmetic, not the state's layout
    rule = build_rule(projection, rank=rank, update_proj_gap=1, proj_scale=1.0, svd="full",
                      proj_patterns=tuple(proj_patterns), eight_bit=eight_bit)
    dtype = {4: torch.float32, 2: torch.bfloat16}[dtype_bytes]
    with torch.device("meta"):
        block = Block(param, param, None, math.prod(shape) if block_numel is None else block_numel)
        state = rule.new_state(block, torch.empty(shape, dtype=dtype))
    out = {"moments": 0, "projection": 0, "magnitude": 0, "master": 4 * math.prod(shape) if master else 0}
    for key, value in state.items():
        if torch.is_tensor(value):
            kind = "projection" if key == "proj" else "magnitude" if key.startswith("mag_") else "moments"
            out[kind] += value.numel() * value.element_size()
    return out


def _parse_block(name: str) -> tuple[str, tuple[int, int] | None]:
    """('param', rows) from a block name 'param' or 'param[rows a:b]' (partition_blocks' naming)."""
    if name.endswith("]") and "[rows " in name:
        param, rows = name[:-1].split("[rows ")
        a, b = rows.split(":")
        return param, (int(a), int(b))
    return name, None


def block_layout(world_size: int, zero_stage: int, projection: str,
                 param_shapes: dict[str, Sequence[int]] | None = None) -> BlockLayout:
    """The block optimizer's layout (scaletrain.optim.layout) for a hypothetical run, seen from
    rank 0: stage 3 is FSDP2, where plain fp32 Adam keeps row shards of every block's state on
    every rank (fp32 or 8-bit moments) and a projected state lives on its owner."""
    fsdp = zero_stage >= 3
    rows = {p: s[0] for p, s in (param_shapes or {}).items()}
    return BlockLayout(rows, fsdp=fsdp, fsdp_rows=fsdp_row_shards(fsdp, projection),
                       zero_stage=zero_stage, world_size=world_size, rank=0)


def selected_state_bytes(selected: Iterable[tuple[str, Sequence[int]]], *, world_size: int = 1,
                         zero_stage: int = 2, projection: str = "none", rank: int = 128,
                         eight_bit: bool = False, proj_patterns: Sequence[str] = ("attn", "mlp"),
                         master: bool = False,
                         param_shapes: dict[str, Sequence[int]] | None = None) -> list[dict[str, int]]:
    """Exact optimizer-state bytes on each rank for a known selection.

    selected: (block name, block shape) pairs, e.g. [(n, shape of block n) for n in opt.selected];
    a row chunk is named 'param[rows a:b]' and has shape (b - a, n). Ownership as the block
    optimizer realises the ZeRO stage: 0 (or one rank): every rank holds every block; 1, 2: each
    block on its owner (selection.owner_map); 3 (FSDP2): with plain Adam (fp32 or 8-bit) every
    rank holds its Shard(0) rows of every block (param_shapes, the full parameter shapes, is
    needed then); with a projection each whole block's state is on its owner, as at stage 2.
    master: bf16 weights, so each held block also has its fp32 master (not at stage 3).
    Returns, per rank, a dict with 'moments', 'projection', 'magnitude', 'master' and 'total'."""
    items = [(name, tuple(shape)) for name, shape in selected]
    if master and zero_stage >= 3:
        raise ValueError("FSDP2 (zero_stage 3) keeps fp32 shards: no master copies")
    rule = dict(projection=projection, rank=rank, eight_bit=eight_bit, proj_patterns=tuple(proj_patterns),
                master=master)
    per_rank = [{"moments": 0, "projection": 0, "magnitude": 0, "master": 0} for _ in range(world_size)]
    layout = block_layout(world_size, zero_stage, projection, param_shapes)
    row_shards = layout.fsdp_rows and world_size > 1  # (one rank holds every row: whole blocks)
    if row_shards and param_shapes is None:
        raise ValueError("zero_stage 3 (FSDP2 row shards) needs param_shapes")
    blocks = [Block(name, *_parse_block(name), math.prod(shape)) for name, shape in items]
    layout.assign(blocks)
    for b, (_, shape) in zip(blocks, items):
        for r in range(world_size):
            if not layout.holds(b.name, r):
                continue
            local = layout.rows_of_rank(b, r) if row_shards else None
            if local == 0:
                continue  # FSDP2: the block has no rows on this rank
            parts = block_state_bytes(b.param, shape if local is None else (local, *shape[1:]),
                                      block_numel=b.numel, **rule)
            for k, v in parts.items():
                per_rank[r][k] += v
    for d in per_rank:
        d["total"] = d["moments"] + d["projection"] + d["magnitude"] + d["master"]
    return per_rank


def block_shapes(blocks, named_shapes: Iterable[tuple[str, Sequence[int]]]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of partition_blocks' Block objects, for selected_state_bytes."""
    shapes = {n: tuple(s) for n, s in named_shapes}
    out = []
    for b in blocks:
        full = shapes[b.param]
        out.append((b.name, full if b.rows is None else (b.rows[1] - b.rows[0], *full[1:])))
    return out


def fractional_knapsack(items: list[tuple[int, dict[str, float]]], capacity: float) -> dict[str, float]:
    """Largest sum of values (per key, by 'total') of items (cost, values) with total cost <=
    capacity when items may be taken fractionally: an upper bound for whole items."""
    out: dict[str, float] = {}
    left = capacity
    for cost, values in sorted(items, key=lambda it: -it[1]["total"] / max(it[0], 1)):
        if left <= 0:
            break
        frac = min(1.0, left / cost) if cost else 1.0
        for k, v in values.items():
            out[k] = out.get(k, 0.0) + frac * v
        left -= frac * cost
    return out
