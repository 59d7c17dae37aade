"""Which blocks exist and which are trained: BlockLLM's selection, pure and deterministic.

  Block              a parameter tensor, or a row chunk of one, as the optimizer trains it
  partition_blocks   the candidate blocks and the parameter budget (density x candidates)
  always_blocks      the always-trained tensors (embedding, head, norms) as blocks
  BlockSelector      BlockLLM's score and budget rule
  owner_map          ZeRO for blocks: each block gets exactly one owner rank
  reselection_due    BlockLLM's patience rule: a pure function of the loss history

No tensors, no communication: every rank computes the same result from the same inputs, which
is what lets W ranks select exactly what one rank selects. (`selecting.SelectsBlocks` is the
protocol the training loop sees; this module is the arithmetic behind it.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass(frozen=True)
class Block:
    name: str                        # parameter name, or 'param[rows a:b]' for a row chunk
    param: str                       # the parameter it belongs to
    rows: tuple[int, int] | None     # row range of a chunk; None for a whole tensor
    numel: int


def partition_blocks(named_shapes: Iterable[tuple[str, torch.Size]], frozen_patterns: tuple[str, ...],
                     density: float, max_block_fraction: float) -> tuple[list[Block], int]:
    """Candidate blocks and the parameter budget (density x candidate parameters).

    Whole tensors are blocks, as in BlockLLM. A 2-D tensor larger than the whole budget could
    never be selected, so it competes as row chunks of at most max_block_fraction x budget."""
    candidates = [(n, s) for n, s in named_shapes if not any(p in n for p in frozen_patterns)]
    budget = int(density * sum(math.prod(s) for _, s in candidates))
    blocks = []
    for name, shape in candidates:
        numel = math.prod(shape)
        if numel <= budget or len(shape) != 2:
            blocks.append(Block(name, name, None, numel))
            continue
        rows = max(1, int(max_block_fraction * budget) // shape[1])
        for start in range(0, shape[0], rows):
            end = min(start + rows, shape[0])
            blocks.append(Block(f"{name}[rows {start}:{end}]", name, (start, end), (end - start) * shape[1]))
    return blocks, budget


ALWAYS_ROW_CHUNKS = 8  # an always-trained matrix is this many row blocks, so owners share it


def always_blocks(named_shapes: Iterable[tuple[str, torch.Size]], patterns: tuple[str, ...]) -> list[Block]:
    """The always-trained tensors as blocks: 1-D ones whole, a matrix as ALWAYS_ROW_CHUNKS row
    chunks (the embedding and head of a large vocabulary would otherwise load one owner rank with
    most of the state; the chunking does not depend on the world size, so states reshard by name)."""
    blocks = []
    for name, shape in named_shapes:
        if not any(p in name for p in patterns):
            continue
        numel = math.prod(shape)
        if len(shape) != 2 or shape[0] < ALWAYS_ROW_CHUNKS:
            blocks.append(Block(name, name, None, numel))
            continue
        rows = math.ceil(shape[0] / ALWAYS_ROW_CHUNKS)
        for start in range(0, shape[0], rows):
            end = min(start + rows, shape[0])
            blocks.append(Block(f"{name}[rows {start}:{end}]", name, (start, end), (end - start) * shape[1]))
    return blocks


SELECTION_POLICIES = ("greedy", "sample")
IMPORTANCE_DECAY = 0.5  # "sample": weight of the previous average at each selection pass


class BlockSelector:
    """BlockLLM's rule: score = gradient norm / exp(visit_freq / step), greedy under the budget;
    or ("sample") importance sampling as MISA: blocks drawn without replacement with probability
    proportional to a moving average of their gradient norms over selection passes (Efraimidis-
    Spirakis keys u^(1/w) from a generator seeded by the step: every rank draws the same), then
    the same budget fill in the order drawn.

    visit_freq is each block's share of all selections so far (every block starts with one
    visit, and shares are renormalised after each increment, as the official code does)."""

    def __init__(self, blocks: list[Block], budget: int, policy: str = "greedy"):
        if policy not in SELECTION_POLICIES:
            raise ValueError(f"selection={policy!r}: choose one of {SELECTION_POLICIES}")
        self.blocks = blocks
        self.budget = budget
        self.policy = policy
        self.visits = {b.name: 1.0 / len(blocks) for b in blocks}
        self.importance: dict[str, float] = {}  # "sample": moving average of each block's norm

    def scores(self, norms: dict[str, float], step: int) -> dict[str, float]:
        return {b.name: norms[b.name] / math.exp(self.visits[b.name] / max(step, 1)) for b in self.blocks}

    def sampled_order(self, norms: dict[str, float], step: int) -> list[Block]:
        """The blocks in the order an importance-weighted draw without replacement takes them."""
        decay = IMPORTANCE_DECAY if self.importance else 0.0
        self.importance = {b.name: decay * self.importance.get(b.name, 0.0) + (1 - decay) * norms[b.name]
                           for b in self.blocks}
        u = torch.rand(len(self.blocks), dtype=torch.float64,
                       generator=torch.Generator().manual_seed(step)).tolist()
        # key = log(u) / w (the log of u^(1/w)): larger first; a zero-weight block comes last
        keys = {b.name: math.log(max(x, 1e-300)) / self.importance[b.name] if self.importance[b.name] > 0
                else -math.inf for b, x in zip(self.blocks, u)}
        return sorted(self.blocks, key=lambda b: (-keys[b.name], b.name))

    def select(self, norms: dict[str, float], step: int) -> list[str]:
        if self.policy == "sample":
            ranked = self.sampled_order(norms, step)
        else:
            scores = self.scores(norms, step)
            ranked = sorted(self.blocks, key=lambda b: (-scores[b.name], b.name))  # ties by name
        chosen, used = [], 0
        for b in ranked:  # a block that would overflow is skipped and smaller ones still fill in
            if used + b.numel <= self.budget:
                chosen.append(b.name)
                used += b.numel
        if not chosen:  # budget smaller than every block: train the best one rather than nothing
            chosen = [ranked[0].name]
        for name in chosen:
            self.visits[name] += 1
            total = sum(self.visits.values())
            self.visits = {k: v / total for k, v in self.visits.items()}
        return sorted(chosen)


def owner_map(blocks: list[Block], world_size: int) -> dict[str, int]:
    """Largest block first onto the least-loaded rank (ties: block name, then lowest rank).
    Deterministic, so every rank computes the same map from the same selection."""
    load = [0] * world_size
    owners = {}
    for b in sorted(blocks, key=lambda b: (-b.numel, b.name)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[b.name] = rank
        load[rank] += b.numel
    return owners


def reselection_due(losses_since_selection: list[float], patience: int) -> bool:
    """BlockLLM's trigger: more than `patience` losses recorded since the last selection, and the
    mean of the last `patience` is above the mean of all of them (recent loss stopped improving)."""
    if len(losses_since_selection) <= patience:
        return False
    mean_all = sum(losses_since_selection) / len(losses_since_selection)
    mean_recent = sum(losses_since_selection[-patience:]) / patience
    return mean_all < mean_recent
