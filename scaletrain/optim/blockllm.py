"""Block optimizer: BlockLLM's selection of a few parameter blocks, made global across ranks.

Only the selected blocks (parameter tensors, or row chunks of tensors too big for the budget)
require grad, hold Adam state and send gradients; the rest costs no weight-gradient compute,
no memory and no communication. The pieces:

  partition_blocks   which blocks exist (names, sizes, row chunks)
  BlockSelector      BlockLLM's score and budget rule: pure, deterministic
  reselection_due    BlockLLM's patience rule: a pure function of the loss history
  owner_map          ZeRO for selected blocks: each selected block gets exactly one owner rank
  BlockOptimizer     a torch.optim.Optimizer composing them with a per-block update rule
                     (update_rules: AdamW, GaLore or GradNormLoRP; fp32 or 8-bit moments)

Per step, at the ZeRO stage the ds_config asks for, realised at block granularity (`zero_stage`):
  2 (default): each selected block's gradient is reduced to its owner only (non-owners then drop
     it), the owner clips and updates it with the state only it holds, and broadcasts the values;
  1: gradients of the selected blocks are all-reduced, the state is still on the owner only,
     which updates and broadcasts;
  0: gradients all-reduced, every rank holds every selected block's state and updates it (DDP).
Frozen blocks send nothing at any stage.

bf16 (`use_master_weights`, set by the engines when the ds_config enables bf16): the model's
weights are bf16 everywhere; each selected block has an fp32 master copy in its state, on its
owner only, which the update rule steps and the bf16 weight is rounded from. Gradients are
accumulated over micro-batches into fp32 buffers (a post-accumulate-grad hook adds each bf16
gradient and frees it), reduced in fp32, and the new bf16 weights are broadcast (half the bytes).

Selection statistic: in a selection pass every candidate requires grad for one forward/backward;
a post-accumulate-grad hook adds the squared norm of each micro-batch's gradient to a per-block
vector and frees the gradient at once (all gradients are never held together). One all-reduce of
that vector makes it global, so W ranks with A micro-batches each select exactly what one rank
with W*A micro-batches of the same size selects. See DESIGN.md for where this departs from the
official code and why.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from scaletrain.distributed.wire import Wire
from scaletrain.optim.update_rules import Hyper, build_rule

log = logging.getLogger("scaletrain")

BUCKET_BYTES = 32 * 2**20  # gradient all-reduce bucket: bounds the flat buffer's extra memory
# what the candidate blocks that are not selected do: none (BlockLLM, BAdam: frozen, no gradient)
# or sign (FRUGAL's state-free signSGD on the step's averaged gradient)
INACTIVE_RULES = ("none", "sign")


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


class BlockSelector:
    """BlockLLM's rule: score = gradient norm / exp(visit_freq / step), greedy under the budget.

    visit_freq is each block's share of all selections so far (every block starts with one
    visit, and shares are renormalised after each increment, as the official code does)."""

    def __init__(self, blocks: list[Block], budget: int):
        self.blocks = blocks
        self.budget = budget
        self.visits = {b.name: 1.0 / len(blocks) for b in blocks}

    def scores(self, norms: dict[str, float], step: int) -> dict[str, float]:
        return {b.name: norms[b.name] / math.exp(self.visits[b.name] / max(step, 1)) for b in self.blocks}

    def select(self, norms: dict[str, float], step: int) -> list[str]:
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


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """sign(x) as 2-bit codes (bit 0: positive, bit 1: negative), four per byte; len(x) % 4 == 0."""
    codes = (x > 0).to(torch.uint8) | ((x < 0).to(torch.uint8) << 1)
    codes = codes.view(-1, 4)
    return codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)


def unpack_signs(packed: torch.Tensor) -> torch.Tensor:
    """The fp32 signs (+1, -1 or 0) that pack_signs encoded."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(1) >> shifts) & 3
    return ((codes & 1).float() - (codes >> 1).float()).view(-1)


class BlockOptimizer(torch.optim.Optimizer):
    """AdamW on a globally selected set of blocks; state keyed by block name.

    The trainer calls, per step: `wants_selection(step)`; if True, a forward/backward inside
    `selection_pass(step=step)`; the normal forward/backward; `step()` (averages the selected gradients
    across ranks, clips, updates); `record_loss(global loss)`."""

    state_keyed_by_name = True  # the checkpoint stores our own state_dict

    def __init__(self, named_params, *, lr: float, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 density=0.05, patience=100, check_every=1000, reselect_every=0,
                 frozen_patterns=("embed", "lm_head"), max_block_fraction=0.5,
                 keep_state_on_reselect=False, max_grad_norm=0.0, debug_checks=False,
                 projection="none", rank=128, update_proj_gap=200, proj_scale=0.25, svd="lowrank",
                 proj_patterns=("attn", "mlp"), eight_bit=False, select_all=False,
                 always_train=(), inactive="none", inactive_lr_scale=1.0,
                 process_group=None):
        named = list(named_params)
        super().__init__([p for _, p in named], dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.params = dict(named)
        # FSDP2 (fully_shard): parameters are DTensors sharded by rows; each rank updates its rows
        # of every selected block (ZeRO-3 for the selected blocks) and FSDP reduces gradients
        self.fsdp = any(isinstance(p, DTensor) for p in self.params.values())
        self.n_params = sum(p.numel() for p in self.params.values())
        if inactive not in INACTIVE_RULES:
            raise ValueError(f"inactive={inactive!r}: choose one of {INACTIVE_RULES}")
        both = [n for n, _ in named if any(p in n for p in frozen_patterns) and any(p in n for p in always_train)]
        if both:
            raise ValueError(f"{both[0]} matches both frozen_patterns and always_train: remove it from one")
        # always-trained tensors (embedding, head, norms) are whole blocks outside the selection
        # budget: Adam every step, state on one owner, like a selected block that never leaves
        self.always_blocks = always_blocks(((n, p.shape) for n, p in named), tuple(always_train))
        always = {b.param for b in self.always_blocks}
        self.blocks, self.budget = partition_blocks(((n, p.shape) for n, p in named if n not in always),
                                                    tuple(frozen_patterns), density, max_block_fraction)
        self.block_by_name = {b.name: b for b in self.blocks + self.always_blocks}
        self.inactive, self.inactive_lr_scale = inactive, inactive_lr_scale
        self.selector = BlockSelector(self.blocks, self.budget)
        self.patience, self.check_every, self.reselect_every = patience, check_every, reselect_every
        self.keep_state_on_reselect = keep_state_on_reselect
        self.max_grad_norm, self.debug_checks = max_grad_norm, debug_checks
        self.group = process_group
        self.rule = build_rule(projection, rank=rank, update_proj_gap=update_proj_gap,
                               proj_scale=proj_scale, svd=svd, proj_patterns=tuple(proj_patterns),
                               eight_bit=eight_bit)
        self.select_all = select_all
        # FSDP2 with plain fp32 AdamW: every rank updates its rows of every block ("rows"); a
        # projected or 8-bit state needs the whole block, so each is gathered to its owner
        self.fsdp_rows = self.fsdp and projection == "none" and not eight_bit
        self.zero_stage = 2  # the engine sets the ds_config's stage (see the module docstring)
        self.selected: list[str] = []  # every block Adam updates now: the chosen + the always-trained
        self.chosen: list[str] = []    # the candidate blocks the last selection chose
        self.owners: dict[str, int] = {}
        self.block_state: dict[str, dict] = {}  # only for the blocks this rank owns
        self.losses_since_selection: list[float] = []
        self.selection_history: list[list[str]] = []
        self.last_selection_step = -1
        self.last_grad_norm = 0.0
        self.wire = Wire(self.group)  # every collective below goes through it and is counted
        self.wire_bytes_last_step = 0  # what step() sent (the selection pass's all-reduce apart)
        self._churn, self._selection_time = 0, 0.0
        self._selecting_at = 0  # the step the running selection pass selects for
        self.master_weights = False  # bf16 weights + fp32 masters of selected blocks (see above)
        self._grad32: dict[str, torch.Tensor] = {}  # fp32 accumulated gradients (master_weights)
        self._accum_hooks: list = []
        self._in_selection_pass = False
        for p in self.params.values():  # nothing trains until the first selection
            p.requires_grad_(False)
        if select_all:  # dense GaLore / GradNormLoRP: every candidate block, sharded by owner
            self._apply_selection(sorted(self.block_names))

    # ------------------------------------------------------------------ who am I
    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def layer_names(self) -> list[str]:
        return list(dict.fromkeys(b.param for b in self.blocks))

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def _world(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    def _rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    def _global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.group is not None else group_rank

    def holds(self, name: str) -> bool:
        """Whether this rank keeps (and updates) the block's state: its owner, or all at stage 0."""
        return self.fsdp_rows or self.zero_stage == 0 or self._world() == 1 or self.owners[name] == self._rank()

    def owned(self) -> list[str]:
        return [n for n in self.selected if self.holds(n)]

    # ------------------------------------------------------------------ selection
    def wants_selection(self, step: int) -> bool:
        if self.select_all:
            return False
        if not self.chosen:
            return True
        if self.reselect_every and step % self.reselect_every == 0:
            return True
        return step % self.check_every == 0 and reselection_due(self.losses_since_selection, self.patience)

    def record_loss(self, loss: float) -> None:
        self.losses_since_selection.append(float(loss))

    # ------------------------------------------------------------------ bf16
    def use_master_weights(self) -> None:
        """The model's weights are (or are about to be cast to) bf16: keep fp32 masters of the
        selected blocks on their owners and accumulate gradients in fp32."""
        if self.fsdp:
            raise ValueError("FSDP2 keeps fp32 parameter shards and casts per layer "
                             "(MixedPrecisionPolicy): master weights are not needed there")
        if self.block_state:
            raise RuntimeError("use_master_weights must be called before the first update")
        self.master_weights = True
        self._hook_trained_params()

    def _hook_trained_params(self) -> None:
        """(Re)register the fp32 accumulation hooks on the parameters that train now."""
        for h in self._accum_hooks:
            h.remove()
        self._accum_hooks, self._grad32 = [], {}
        if not self.master_weights:
            return
        for name in dict.fromkeys(self.block_by_name[n].param for n in self.selected):
            self._accum_hooks.append(self.params[name].register_post_accumulate_grad_hook(self._accumulate(name)))

    def _accumulate(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if self._in_selection_pass:
                return  # the selection pass's own hook measures and frees this gradient
            acc = self._grad32.get(name)
            if acc is None:
                self._grad32[name] = p.grad.float()
            else:
                acc.add_(p.grad)
            p.grad = None
        return hook

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._grad32 = {}

    def pending_grads(self) -> list[torch.Tensor]:
        """This rank's gradients not yet reduced or applied (fp32 accumulations under master weights)."""
        return [p.grad for p in self.params.values() if p.grad is not None] + list(self._grad32.values())

    @contextlib.contextmanager
    def selection_pass(self, grad_leaves: dict[str, torch.Tensor] | None = None, *, step: int):
        """Inside: every candidate parameter requires grad and its gradient is reduced to squared
        block norms as soon as it is accumulated. On exit: one all-reduce, then the new selection.

        grad_leaves: the tensors autograd accumulates into, where they are not the parameters
        themselves (FSDP2's unsharded parameters): hooked there, each rank sees its own
        micro-batch's full gradient before any reduction, as on the other backends, and freeing it
        leaves FSDP nothing to reduce-scatter."""
        self._selecting_at = step
        t0 = time.perf_counter()
        index = {b.name: i for i, b in enumerate(self.blocks)}
        # on the device, read once after the all-reduce: no host sync per parameter and micro-batch
        sq_norms = torch.zeros(len(self.blocks), dtype=torch.float64, device=self.device)
        by_param: dict[str, list[Block]] = {}
        for b in self.blocks:
            by_param.setdefault(b.param, []).append(b)

        def hook_for(blocks: list[Block]):
            def hook(p: torch.Tensor) -> None:
                g = p.grad.detach().float()
                for b in blocks:
                    part = g if b.rows is None else g[b.rows[0]:b.rows[1]]
                    sq_norms[index[b.name]] += part.pow(2).sum().double()
                p.grad = None  # free at once: all gradients never coexist
            return hook

        for b in self.always_blocks:  # not measured, and their gradient must not carry into the step
            self.params[b.param].requires_grad_(False)
        handles = []
        for name, blocks in by_param.items():
            p = self.params[name]
            p.requires_grad_(True)
            p.grad = None
            leaf = p if grad_leaves is None else grad_leaves[name]
            leaf.requires_grad_(True)  # (FSDP2 syncs it from the parameter at each all-gather too)
            handles.append(leaf.register_post_accumulate_grad_hook(hook_for(blocks)))
        self._in_selection_pass = True
        try:
            yield
        finally:
            self._in_selection_pass = False
            for h in handles:
                h.remove()
        if self._world() > 1:  # the one collective of a selection (on the device: nccl has no CPU)
            self.wire.all_reduce(sq_norms)
        norms = dict(zip(self.block_names, sq_norms.sqrt().tolist()))
        bad = [n for n, v in norms.items() if not math.isfinite(v)]  # the same on every rank (reduced)
        if bad and self.chosen:
            log.warning("selection at step %d skipped: gradient norm not finite for %d block(s) (e.g. %s); "
                        "the current selection stays", self._selecting_at, len(bad), bad[0])
        else:
            for n in bad:  # the first selection must choose something: a non-finite norm ranks last
                norms[n] = 0.0
            self._apply_selection(self.selector.select(norms, self._selecting_at))
        self._selection_time = time.perf_counter() - t0

    def _apply_selection(self, chosen: list[str]) -> None:
        old, new = set(self.chosen), set(chosen)
        self._churn = len(old ^ new)
        old_owners = self.owners
        always = [b.name for b in self.always_blocks]
        names = sorted(always + list(chosen))
        self.owners = owner_map([self.block_by_name[n] for n in names], self._world())
        keep = (old & new if self.keep_state_on_reselect else set()) | (set(always) if self.selected else set())
        self._move_state(sorted(keep), old_owners)
        self.chosen, self.selected = list(chosen), names
        self.selection_history.append(list(chosen))
        self.last_selection_step = self._selecting_at
        self.losses_since_selection = []  # BlockLLM clears the history on every reselection
        self._set_requires_grad()
        self._hook_trained_params()
        if self.debug_checks:
            self.assert_same_selection_on_all_ranks()

    def _set_requires_grad(self) -> None:
        """Gradients exist for the blocks Adam updates and, with a sign rule, for every candidate."""
        trained = {self.block_by_name[n].param for n in self.selected}
        if self.inactive != "none":
            trained |= {b.param for b in self.blocks}
        for name, p in self.params.items():
            p.requires_grad_(name in trained)
            p.grad = None

    def _inactive_blocks(self) -> list[Block]:
        """Candidate blocks not chosen now: the ones the inactive rule updates (sign) or skips."""
        chosen = set(self.chosen)
        return [b for b in self.blocks if b.name not in chosen]

    def _move_state(self, kept: list[str], old_owners: dict[str, int]) -> None:
        """Keep the state of blocks that stay selected; send it to the new owner where it moved,
        drop everything else. Every rank walks the moves in the same order, so sends and
        receives pair up without deadlock. The receiver allocates the rule's state layout for the
        block (fixed keys and shapes) and receives the tensors in key order, then the numbers."""
        rank = self._rank()
        moved = {}
        for name in kept:
            src, dst = old_owners[name], self.owners[name]
            if self.fsdp_rows or self.zero_stage == 0 or src == dst or rank not in (src, dst):
                continue  # (FSDP, stage 0: every rank already holds its part of every kept state)
            peer = self._global_rank(dst if rank == src else src)
            block = self.block_by_name[name]
            st = self.block_state.get(name) if rank == src else None  # (none yet: never updated)
            st = st or self._new_state(block, self._block_like(block))
            numbers = torch.tensor([float(st[k]) for k in sorted(st) if not torch.is_tensor(st[k])],
                                   dtype=torch.float64, device=self.device)
            for key in sorted(k for k in st if torch.is_tensor(st[k])):
                (self.wire.send if rank == src else self.wire.recv)(st[key], peer)
            (self.wire.send if rank == src else self.wire.recv)(numbers, peer)
            if rank == dst:
                for key, value in zip(sorted(k for k in st if not torch.is_tensor(st[k])), numbers.tolist()):
                    st[key] = value
                moved[name] = st
        self.block_state = {n: s for n, s in self.block_state.items() if n in kept and self.holds(n)}
        self.block_state.update(moved)
        for st in self.block_state.values():
            if "proj_stale" in st:
                st["proj_stale"] = 1.0  # GaLore's basis is refit when a block is (re)selected

    def assert_same_selection_on_all_ranks(self) -> None:
        if self._world() == 1:
            return
        digest = int.from_bytes(hashlib.sha256("\n".join(self.selected).encode()).digest()[:7], "big")
        lo = torch.tensor([digest], dtype=torch.int64, device=self.device)
        hi = lo.clone()
        self.wire.all_reduce(lo, op=dist.ReduceOp.MIN)
        self.wire.all_reduce(hi, op=dist.ReduceOp.MAX)
        if lo.item() != hi.item():
            raise RuntimeError("ranks selected different blocks: selection is not deterministic")

    # ------------------------------------------------------------------ update
    def _block_like(self, b: Block) -> torch.Tensor:
        """A tensor of the whole block's shape (the local view is only a row shard under FSDP)."""
        p = self.params[b.param]
        a, z = b.rows or (0, p.shape[0])
        return torch.empty((z - a, *p.shape[1:]), dtype=p.dtype, device=self.device)

    def _local_rows(self, b: Block) -> tuple[int, int, int]:
        """(first, last) rows of block b held here, and the offset of the local tensor: the whole
        block off FSDP; under FSDP2 the block's rows that fall in this rank's Shard(0) chunk
        (torch.chunk sizes: ceil(rows / W) per rank)."""
        rows = self.params[b.param].shape[0]
        a, z = b.rows or (0, rows)
        if not self.fsdp:
            return a, z, 0
        chunk = math.ceil(rows / self._world())
        start = min(self._rank() * chunk, rows)
        end = min(start + chunk, rows)
        lo = max(a, start)
        return lo, max(lo, min(z, end)), start  # empty where the block has no rows here

    def _local(self, b: Block, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, DTensor):
            t = t.to_local()  # aliases the shard: in-place updates reach the parameter
        lo, hi, offset = self._local_rows(b)
        if b.rows is None and not self.fsdp:
            return t
        return t[lo - offset:hi - offset]

    def _grad(self, b: Block) -> torch.Tensor | None:
        g = self._grad32.get(b.param)  # fp32 accumulator (master_weights), else the gradient itself
        g = self.params[b.param].grad if g is None else g
        return None if g is None else self._local(b, g)

    def _weight(self, b: Block) -> torch.Tensor:
        return self._local(b, self.params[b.param].data)  # a view: updates land in place

    @staticmethod
    def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        buckets, current, size = [], [], 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > BUCKET_BYTES:
                buckets.append(current)
                current, size = [], 0
            current.append(t)
            size += nbytes
        return buckets + ([current] if current else [])

    def _reduce_to_owner(self, grads: list[torch.Tensor], owner: int) -> None:
        """Sum gradients onto their owner, which divides by the world size."""
        for bucket in self._buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            self.wire.reduce(flat, self._global_rank(owner))
            if self._rank() == owner:
                flat /= self._world()
                _unflatten_into(flat, bucket)

    def _all_reduce(self, grads: list[torch.Tensor]) -> None:
        """Average gradients on every rank (stages 0 and 1)."""
        for bucket in self._buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            self.wire.all_reduce(flat)
            flat /= self._world()
            _unflatten_into(flat, bucket)

    def _drop_unowned_grads(self, mine: list[Block]) -> None:
        """Stage 2: once reduced to its owner, a gradient no other rank needs is released."""
        keep = {b.param for b in mine}
        for b in (self.block_by_name[n] for n in self.selected):
            if b.param not in keep:
                self.params[b.param].grad = None
                self._grad32.pop(b.param, None)

    def _broadcast_from_owner(self, weights: list[torch.Tensor], owner: int) -> None:
        for bucket in self._buckets(weights):
            flat = torch.cat([w.reshape(-1) for w in bucket])
            self.wire.broadcast(flat, self._global_rank(owner))
            if self._rank() != owner:
                _unflatten_into(flat, bucket)

    @torch.no_grad()
    def step(self, closure=None):
        """Reduce each selected gradient to its owner, clip by the global norm, update on the
        owner, broadcast the new values. wire_bytes_last_step: what this step's collectives sent
        (scaletrain.distributed.wire says how each is counted)."""
        loss = closure() if closure is not None else None
        self.wire.take()  # (the selection pass's all-reduce is not this step's)
        group = self.param_groups[0]
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        world, rank = self._world(), self._rank()
        blocks = [self.block_by_name[n] for n in self.selected if self._grad(self.block_by_name[n]) is not None]
        by_owner = {r: [b for b in blocks if self.owners[b.name] == r] for r in range(world)}
        sharded = world > 1 and self.zero_stage > 0 and not self.fsdp
        # first the inactive blocks' sign step (it needs their gradients before stage 2 drops
        # the tensors they share with chosen row chunks); their squares join the clip norm
        sq_inactive = self._inactive_step(lr * self.inactive_lr_scale, wd, sharded)
        if self.fsdp and not self.fsdp_rows:
            self._fsdp_owner_step(blocks, Hyper(lr, beta1, beta2, eps, wd), sq_inactive)
            self.wire_bytes_last_step = self.wire.take()
            return loss
        if self.fsdp:
            pass  # FSDP reduce-scattered (averaged) the selected gradients in backward
        elif world > 1 and self.zero_stage == 2:
            for owner, owned in by_owner.items():
                self._reduce_to_owner([self._grad(b) for b in owned], owner)
            self._drop_unowned_grads(by_owner[rank])
        elif world > 1:
            self._all_reduce([self._grad(b) for b in blocks])
        mine = by_owner[rank] if sharded else blocks
        grads = [self._grad(b) for b in mine]
        # per-block fp32 squares summed in fp64: exact for any grouping of blocks over ranks, so the
        # clip coefficient does not depend on the world size (bf16 weights would amplify its last bit)
        sq = (torch.stack([g.pow(2).sum() for g in grads]).double().sum() if grads
              else torch.zeros((), dtype=torch.float64, device=self.device)).reshape(1) + sq_inactive
        if sharded or (self.fsdp and world > 1):
            self.wire.all_reduce(sq)  # the global norm over all selected blocks
        norm = sq.sqrt().float()[0]
        self.last_grad_norm = float(norm)
        if self.max_grad_norm > 0:
            coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)  # as torch's clip_grad_norm_
            for g in grads:
                g.mul_(coef)
        self._update_blocks(mine, grads, Hyper(lr, beta1, beta2, eps, wd))
        if sharded:
            for owner, owned in by_owner.items():
                self._broadcast_from_owner([self._weight(b) for b in owned], owner)
        self.wire_bytes_last_step = self.wire.take()
        self._grad32 = {}  # consumed (DeepSpeed's engine clears p.grad itself, not through zero_grad)
        return loss

    def _update_blocks(self, blocks: list[Block], grads: list[torch.Tensor], hyper: Hyper) -> None:
        """The rule's update on this rank's blocks, all at once (multi-tensor where the rule can);
        with master weights the fp32 masters are updated, then rounded into the bf16 weights."""
        live = [(b, g) for b, g in zip(blocks, grads) if g.numel()]  # FSDP: a block may have no local rows
        if not live:
            return
        blocks, grads = [b for b, _ in live], [g for _, g in live]
        weights = [self._weight(b) for b in blocks]
        for b, w in zip(blocks, weights):
            if b.name not in self.block_state:
                self.block_state[b.name] = self._new_state(b, w)
        states = [self.block_state[b.name] for b in blocks]
        if self.master_weights:
            self.rule.update_blocks(blocks, [st["master"] for st in states], grads, states, hyper)
            torch._foreach_copy_(weights, [st["master"] for st in states])  # round to bf16
        else:
            self.rule.update_blocks(blocks, weights, grads, states, hyper)

    # ------------------------------------------------------------------ inactive blocks
    def _inactive_step(self, lr: float, wd: float, sharded: bool) -> torch.Tensor:
        """signSGD on every candidate block not chosen now (inactive="sign"): w -= lr * sign(g) of
        the gradient averaged over all ranks, no state. Returns this rank's share of the squared
        gradient norm.

        Sharded stages (1, 2) reduce-scatter the gradients (each rank averages 1/W of them), take
        the signs there and all-gather them at 2 bits a value: about half a DDP all-reduce's
        bytes, and every rank applies the same signs, so W ranks equal one. Stage 0 all-reduces;
        FSDP2 has already reduce-scattered the rows each rank updates."""
        zero = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.inactive == "none":
            return zero
        blocks = [b for b in self._inactive_blocks() if self._grad(b) is not None]
        grads = [self._grad(b) for b in blocks]
        if sharded:
            sq = self._sign_step_sharded(blocks, grads, lr, wd)
            self._drop_inactive_grads()
            return sq
        if self._world() > 1 and not self.fsdp:
            self._all_reduce(grads)
        sq = sum((g.double().pow(2).sum() for g in grads), zero)
        self._apply_signs([self._weight(b) for b in blocks], torch._foreach_sign(grads), lr, wd)
        self._drop_inactive_grads()
        return sq

    def _sign_step_sharded(self, blocks, grads, lr: float, wd: float) -> torch.Tensor:
        world = self._world()
        sq = torch.zeros(1, dtype=torch.float64, device=self.device)
        start = 0
        for bucket in self._buckets(grads):
            n = sum(g.numel() for g in bucket)
            padded = math.ceil(n / (4 * world)) * 4 * world  # whole bytes of 2-bit codes per rank
            flat = torch.zeros(padded, dtype=torch.float32, device=self.device)
            torch.cat([g.reshape(-1).float() for g in bucket], out=flat[:n])
            shard = torch.empty(padded // world, dtype=torch.float32, device=self.device)
            self.wire.reduce_scatter_tensor(shard, flat)
            shard /= world
            sq += shard.double().pow(2).sum()
            packed = torch.empty(padded // 4, dtype=torch.uint8, device=self.device)
            self.wire.all_gather_into_tensor(packed, pack_signs(shard))
            signs = unpack_signs(packed)[:n].split([g.numel() for g in bucket])
            self._apply_signs([self._weight(b) for b in blocks[start:start + len(bucket)]],
                              [s.view_as(g) for s, g in zip(signs, bucket)], lr, wd)
            start += len(bucket)
        return sq

    @staticmethod
    def _apply_signs(weights: list[torch.Tensor], signs: list[torch.Tensor], lr: float, wd: float) -> None:
        """w -= lr * sign, multi-tensor; decoupled weight decay first, as the Adam blocks' AdamW."""
        if not weights:
            return
        signs = [s if s.dtype == w.dtype else s.to(w.dtype) for s, w in zip(signs, weights)]
        if wd:
            torch._foreach_mul_(weights, 1 - lr * wd)
        torch._foreach_add_(weights, signs, alpha=-lr)

    def _drop_inactive_grads(self) -> None:
        """Gradients of tensors no chosen block shares are used up by the sign step."""
        adam = {self.block_by_name[n].param for n in self.selected}
        for b in self.blocks:
            if b.param not in adam:
                self.params[b.param].grad = None

    def _new_state(self, b: Block, weight: torch.Tensor) -> dict:
        """The rule's state for a block; with master weights, on an fp32 copy of the weight,
        which is kept in the state as "master" (saved, moved and resharded like the moments)."""
        if not self.master_weights:
            return self.rule.new_state(b, weight)
        master = weight.detach().float().clone()
        st = self.rule.new_state(b, master)
        st["master"] = master
        return st

    # ------------------------------------------------------------------ introspection
    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.block_state.values()
                   for t in s.values() if torch.is_tensor(t))

    def always_state_bytes(self) -> int:
        """The part of state_bytes() that belongs to the always-trained tensors (reported apart)."""
        always = {b.name for b in self.always_blocks}
        return sum(t.numel() * t.element_size() for n, s in self.block_state.items() if n in always
                   for t in s.values() if torch.is_tensor(t))

    def stats(self) -> dict:
        selected = sum(self.block_by_name[n].numel for n in self.chosen)
        inactive = sum(b.numel for b in self._inactive_blocks()) if self.inactive != "none" else 0
        return {"selected_params": selected, "selected_fraction": selected / self.n_params,
                "always_params": sum(b.numel for b in self.always_blocks), "inactive_params": inactive,
                "always_state_bytes": self.always_state_bytes(),
                "selected_blocks": len(self.chosen), "selection_churn": self._churn,
                "selection_time_s": self._selection_time, "optim_state_bytes": self.state_bytes(),
                "wire_bytes": self.wire_bytes_last_step, "grad_norm": self.last_grad_norm,
                "owner_imbalance": self.owner_imbalance()}

    def owner_imbalance(self) -> float:
        """Largest per-rank owned parameter count over the mean (1.0 = perfectly balanced)."""
        load = [0] * self._world()
        for n in self.selected:
            load[self.owners[n]] += self.block_by_name[n].numel
        return max(load) / (sum(load) / len(load)) if sum(load) else 1.0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Tensors and plain numbers/strings only, keyed by block name (weights_only loadable).
        Under FSDP2 this is collective: the row shards of each block's state are gathered and
        rank 0 returns them whole (the other ranks none), so any backend and size can resume.
        (Checkpoints use checkpoint_blocks/checkpoint_meta instead: no gather.)"""
        blocks = self._gathered_fsdp_state() if self.fsdp_rows else {n: dict(s) for n, s in self.block_state.items()}
        return {"blocks": blocks, **self.checkpoint_meta()}

    def checkpoint_meta(self) -> dict:
        """The global part of the state (the same on every rank): selection, visits, LR."""
        return {
            "selected": list(self.selected),
            "chosen": list(self.chosen),
            "owners": dict(self.owners),  # at the saving world size; recomputed on load
            "visits": dict(self.selector.visits),
            "losses_since_selection": list(self.losses_since_selection),
            "selection_history": [list(h) for h in self.selection_history],
            "last_selection_step": self.last_selection_step,
            "lr": self.param_groups[0]["lr"],
        }

    def checkpoint_blocks(self) -> dict:
        """This rank's part of the block state as flat `blocks/<name>/<key>` entries, no
        communication but one small all-reduce under FSDP2: each block by its owner (every rank
        at stage 0 or world 1: replicated, written once by DCP); under FSDP2 rows, each rank's
        rows as `<key>@<first>-<end>` (rows of the parameter) plus the block's step."""
        if not self.fsdp_rows:
            return {f"blocks/{n}/{k}": v for n, st in self.block_state.items() for k, v in st.items()}
        names = sorted(self.selected)
        steps = torch.tensor([float(self.block_state[n]["step"]) if n in self.block_state else 0.0
                              for n in names], dtype=torch.float64, device=self.device)
        if self._world() > 1:
            self.wire.all_reduce(steps, op=dist.ReduceOp.MAX)  # 0 where a rank has no rows
        out = {}
        for name, step in zip(names, steps.tolist()):
            b = self.block_by_name[name]
            out[f"blocks/{name}/step"] = step
            lo, hi, _ = self._local_rows(b)
            if hi > lo:
                st = self.block_state.get(name) or self.rule.new_state(b, self._weight(b))
                out.update({f"blocks/{name}/{k}@{lo}-{hi}": v for k, v in st.items() if torch.is_tensor(v)})
        return out

    def load_checkpoint(self, meta: dict, saved, prefix: str) -> None:
        """Load from a checkpoint (`saved.keys`, `saved.read(targets)`, `saved.empty(key)`) the
        blocks this rank holds at the current world size and backend, reading only those (their
        rows only, where FSDP2 row pieces were saved)."""
        self._load_selection(meta)
        by_block: dict[str, list[str]] = {}  # block name -> its saved keys (`<key>` or `<key>@<rows>`)
        for k in saved.keys:
            if k.startswith(f"{prefix}blocks/"):
                name, key = k[len(prefix) + 7:].rsplit("/", 1)
                by_block.setdefault(name, []).append(key)
        self._install_blocks({n: self._read_block(n, saved, f"{prefix}blocks/{n}/", by_block[n])
                              for n in self.owned() if n in by_block})

    def _read_block(self, name: str, saved, prefix: str, keys: list[str]) -> dict:
        b = self.block_by_name[name]
        a, z = b.rows or (0, self.params[b.param].shape[0])
        lo, hi = self._local_rows(b)[:2] if self.fsdp_rows else (a, z)
        pieces = {}  # state key -> [(first, end, saved key)] of the saved row pieces we need
        for k in keys:
            if "@" in k:
                key, rows = k.split("@")
                first, end = map(int, rows.split("-"))
                pieces.setdefault(key, [])
                if first < hi and end > lo:
                    pieces[key].append((first, end, k))
        whole = [k for k in keys if "@" not in k]
        got = saved.read({prefix + k: None for k in whole + [p[2] for ps in pieces.values() for p in ps]})
        state = {k: got[prefix + k] for k in whole}
        if self.fsdp_rows:  # a whole block saved by an owner: this rank's rows of it
            state = {k: (v[lo - a:hi - a] if torch.is_tensor(v) else v) for k, v in state.items()}
        for key, ps in pieces.items():
            ps.sort()
            parts = [got[prefix + k][max(lo, f) - f:min(hi, e) - f] for f, e, k in ps]
            first_key = next(k for k in keys if k.startswith(key + "@"))
            parts = parts or [saved.empty(prefix + first_key)[:0]]  # no rows here
            state[key] = torch.cat(parts).clone()
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in state.items()}

    def _fsdp_owner_step(self, blocks: list[Block], hyper: Hyper, sq_inactive: torch.Tensor) -> None:
        """FSDP2 with projected or 8-bit states: FSDP reduce-scattered the gradient rows; each
        block's rows of gradient and weight are gathered to its owner, which runs the rule on
        the whole block and scatters the new rows back."""
        rank = self._rank()
        sq = sum((self._grad(b).double().pow(2).sum() for b in blocks),
                 torch.zeros((), dtype=torch.float64, device=self.device)).reshape(1) + sq_inactive
        self.wire.all_reduce(sq)  # the global norm, from the local rows
        norm = float(sq.sqrt())
        self.last_grad_norm = norm
        coef = min(1.0, self.max_grad_norm / (norm + 1e-6)) if self.max_grad_norm > 0 else 1.0
        for b in blocks:
            owner = self.owners[b.name]
            grad = self._gather_rows(b, self._grad(b), owner)
            weight = self._gather_rows(b, self._weight(b), owner)
            if rank == owner:
                if coef < 1.0:
                    grad.mul_(coef)
                if b.name not in self.block_state:
                    self.block_state[b.name] = self.rule.new_state(b, weight)
                self.rule.update(b, weight, grad, self.block_state[b.name], hyper)
            self._scatter_rows(b, weight, self._weight(b), owner)

    def _gather_rows(self, b: Block, local: torch.Tensor, owner: int) -> torch.Tensor | None:
        rows = [self._rows_of_rank(b, r) for r in range(self._world())]
        padded = torch.zeros((max(rows), *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in rows] if self._rank() == owner else None
        self.wire.gather(padded, parts, dst=self._global_rank(owner))
        return torch.cat([part[:n] for part, n in zip(parts, rows)]) if parts is not None else None

    def _scatter_rows(self, b: Block, full: torch.Tensor | None, local: torch.Tensor, owner: int) -> None:
        rows = [self._rows_of_rank(b, r) for r in range(self._world())]
        buf = torch.empty((max(rows), *local.shape[1:]), dtype=local.dtype, device=local.device)
        chunks = None
        if self._rank() == owner:
            chunks, start = [], 0
            for n in rows:
                chunk = torch.zeros_like(buf)
                chunk[:n] = full[start:start + n]
                chunks.append(chunk)
                start += n
        self.wire.scatter(buf, chunks, src=self._global_rank(owner))
        local.copy_(buf[: local.shape[0]])

    def _rows_of_rank(self, b: Block, rank: int) -> int:
        rows = self.params[b.param].shape[0]
        a, z = b.rows or (0, rows)
        chunk = math.ceil(rows / self._world())
        start, end = min(rank * chunk, rows), min(rank * chunk + chunk, rows)
        return max(0, min(z, end) - max(a, start))

    def _gathered_fsdp_state(self) -> dict:
        """Each selected block's state with its row shards concatenated (FSDP2, collective)."""
        world, full = self._world(), {}
        for name in sorted(self.selected):
            b = self.block_by_name[name]
            st = self.block_state.get(name) or self.rule.new_state(b, self._weight(b))  # no rows here
            step = torch.tensor([float(st["step"])], dtype=torch.float64, device=self.device)
            self.wire.all_reduce(step, op=dist.ReduceOp.MAX)  # 0 where a rank has no rows
            rows = [self._rows_of_rank(b, r) for r in range(world)]
            out = {"step": step.item()}
            for key in sorted(k for k in st if torch.is_tensor(st[k])):
                local = st[key]
                padded = torch.zeros((max(rows), *local.shape[1:]), dtype=local.dtype, device=local.device)
                padded[: local.shape[0]] = local
                parts = [torch.empty_like(padded) for _ in range(world)]
                self.wire.all_gather(parts, padded)
                out[key] = torch.cat([part[:n] for part, n in zip(parts, rows)]).cpu()
            if self._rank() == 0:
                full[name] = out
        return full

    def _local_state(self, b: Block, st: dict) -> dict:
        """This rank's rows of a whole saved state (FSDP2), or the state itself, on this rank's
        device (a checkpoint is loaded onto the CPU, whatever device saved it)."""
        if not self.fsdp_rows:
            return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in st.items()}
        lo, hi, _ = self._local_rows(b)
        a = b.rows[0] if b.rows else 0
        return {k: (v[lo - a:hi - a].clone().to(self.device) if torch.is_tensor(v) else v) for k, v in st.items()}

    def load_state_dict(self, state: dict) -> None:
        self._load_selection(state)
        self._install_blocks({n: self._local_state(self.block_by_name[n], state["blocks"][n])
                              for n in self.owned() if n in state["blocks"]})

    def _load_selection(self, state: dict) -> None:
        """Selection, visits, losses and LR from a saved state; owners for this world size."""
        unknown = set(state.get("chosen", state["selected"])) - {b.name for b in self.blocks}
        if unknown:
            raise ValueError(f"saved selection has blocks this model/config does not: {sorted(unknown)[:3]}"
                             " (a different model.preset, optim.density or optim.frozen_patterns?)")
        self.selector.visits = dict(state["visits"])
        self.losses_since_selection = list(state["losses_since_selection"])
        self.selection_history = [list(h) for h in state["selection_history"]]
        self.last_selection_step = state["last_selection_step"]
        self.param_groups[0]["lr"] = state["lr"]
        always = sorted(b.name for b in self.always_blocks)
        self.chosen = list(state.get("chosen", state["selected"]))  # (saved before always-trained tensors existed)
        self.selected = sorted(always + self.chosen)
        self.owners = owner_map([self.block_by_name[n] for n in self.selected], self._world())

    def _install_blocks(self, blocks: dict) -> None:
        """The loaded states of the blocks this rank holds (local rows under FSDP2, on its device)."""
        missing = [n for n in self.owned() if n not in blocks]
        if missing:
            raise ValueError(f"saved optimizer state lacks blocks this rank now owns: {missing[:3]}")
        self.block_state = blocks
        self._set_requires_grad()
        self._adopt_masters()
        self._hook_trained_params()

    @torch.no_grad()
    def _adopt_masters(self) -> None:
        """A state saved by a bf16 run in an fp32 run: the fp32 master is the exact weight, so it
        replaces the (restored, bf16-rounded) weight. A state saved in fp32 and loaded in a bf16
        run: the master starts from the restored bf16 weight, as at a block's first update."""
        for name, st in self.block_state.items():
            weight = self._weight(self.block_by_name[name])
            if "master" in st and not self.master_weights:
                weight.copy_(st.pop("master"))
            elif self.master_weights and "master" not in st:
                st["master"] = weight.detach().float().clone()
            elif self.master_weights:
                st["master"] = st["master"].to(device=weight.device, dtype=torch.float32)

    def load_state_dict_shards(self, shards: list[dict]) -> None:
        """Merge the per-rank saved states (each holds the blocks its rank owned) and load the
        ones this rank owns under the current world size (any world size can resume)."""
        merged = dict(shards[0])
        merged["blocks"] = {n: s for shard in shards for n, s in shard["blocks"].items()}
        self.load_state_dict(merged)
