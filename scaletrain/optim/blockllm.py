"""Block optimizer: BlockLLM's selection of a few parameter blocks, made global across ranks.

Only the selected blocks (parameter tensors, or row chunks of tensors too big for the budget)
require grad, hold Adam state and send gradients; the rest costs no weight-gradient compute,
no memory and no communication. BlockOptimizer, a torch.optim.Optimizer, composes:

  selection       which blocks exist, BlockLLM's score/budget and patience rules, owner_map (pure)
  layout          which rank owns a block, which ranks hold its state, which rows are local
  steps           one strategy per layout: reduce, clip, update, publish
  comm            the collectives (buckets, reduce-to-owner, broadcast, FSDP rows, 2-bit signs)
  update_rules    the per-block update (AdamW, GaLore or GradNormLoRP; fp32 or 8-bit moments)
  masters         bf16 weights with fp32 masters; fp32 gradient accumulation (mixin)
  checkpointing   state save/load/migration, keyed by block name (mixin)

This module owns the selection protocol (`wants_selection`, `selection_pass`, `record_loss`),
the block tables, and `step()`'s order of sync points.

Per step, at the ZeRO stage the ds_config asks for, realised at block granularity (`zero_stage`):
  2 (default): each selected block's gradient is reduced to its owner only (non-owners then drop
     it), the owner clips and updates it with the state only it holds, and broadcasts the values;
  1: gradients of the selected blocks are all-reduced, the state is still on the owner only,
     which updates and broadcasts;
  0: gradients all-reduced, every rank holds every selected block's state and updates it (DDP).
Frozen blocks send nothing at any stage. Under FSDP2 see steps.FsdpRows / steps.FsdpOwner.

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

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from scaletrain.distributed.wire import Wire
from scaletrain.optim.checkpointing import BlockStateIO
from scaletrain.optim.comm import BlockComm
from scaletrain.optim.config import OptimConfig
from scaletrain.optim.layout import BlockLayout, fsdp_row_shards
from scaletrain.optim.masters import MasterWeights
from scaletrain.optim.selection import Block, BlockSelector, always_blocks, partition_blocks, reselection_due
from scaletrain.optim.steps import step_layout
from scaletrain.optim.update_rules import Hyper, build_rule

log = logging.getLogger("scaletrain")

# what the candidate blocks that are not selected do: none (BlockLLM, BAdam: frozen, no gradient)
# or sign (FRUGAL's state-free signSGD on the step's averaged gradient)
INACTIVE_RULES = ("none", "sign")


class BlockOptimizer(MasterWeights, BlockStateIO, torch.optim.Optimizer):
    """AdamW on a globally selected set of blocks; state keyed by block name.

    The trainer calls, per step: `wants_selection(step)`; if True, a forward/backward inside
    `selection_pass(step=step)`; the normal forward/backward; `step()` (averages the selected gradients
    across ranks, clips, updates); `record_loss(global loss)`."""

    state_keyed_by_name = True  # the checkpoint stores our own state_dict

    def __init__(self, named_params, config: OptimConfig, *, max_grad_norm: float = 0.0,
                 select_all: bool = False, process_group=None):
        """config: the optim.* knobs (scaletrain/optim/config.py declares them, their defaults and
        docs, once); max_grad_norm: the ds_config's gradient_clipping; select_all: every candidate
        block trains (the dense GaLore / GradNormLoRP modes); process_group: the ranks to shard over."""
        c = config
        lr, betas, eps, weight_decay = c.lr, (c.beta1, c.beta2), c.eps, c.weight_decay
        density, patience, check_every, reselect_every = c.density, c.patience, c.check_every, c.reselect_every
        frozen_patterns, always_train = tuple(c.frozen_patterns), tuple(c.always_train)
        inactive, inactive_lr_scale, projection, eight_bit = c.inactive, c.inactive_lr_scale, c.projection, c.eight_bit
        max_block_fraction, keep_state_on_reselect, debug_checks = (c.max_block_fraction, c.keep_state_on_reselect,
                                                                    c.debug_checks)
        self.config = config
        named = list(named_params)
        super().__init__([p for _, p in named], dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.params = dict(named)
        # FSDP2 (fully_shard): parameters are DTensors sharded by rows; each rank updates its rows
        # of every selected block (ZeRO-3 for the selected blocks) and FSDP reduces gradients
        fsdp = any(isinstance(p, DTensor) for p in self.params.values())
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
        self.selector = BlockSelector(self.blocks, self.budget, c.selection)
        self.patience, self.check_every, self.reselect_every = patience, check_every, reselect_every
        self.keep_state_on_reselect = keep_state_on_reselect
        self.max_grad_norm, self.debug_checks = max_grad_norm, debug_checks
        self.rule = build_rule(projection, rank=c.rank, update_proj_gap=c.update_proj_gap,
                               proj_scale=c.proj_scale, svd=c.svd, proj_patterns=tuple(c.proj_patterns),
                               eight_bit=eight_bit)
        self.select_all = select_all
        # who owns what and which rows are here; zero_stage: the engine sets the ds_config's stage
        self.layout = BlockLayout({n: (p.shape[0] if p.dim() else 1) for n, p in named}, fsdp=fsdp,
                                  fsdp_rows=fsdp_row_shards(fsdp, projection),
                                  group=process_group, zero_stage=2)
        self.selected: list[str] = []  # every block Adam updates now: the chosen + the always-trained
        self.chosen: list[str] = []    # the candidate blocks the last selection chose
        self.block_state: dict[str, dict] = {}  # only for the blocks this rank owns
        self.losses_since_selection: list[float] = []
        self.selection_history: list[list[str]] = []
        self.last_selection_step = -1
        self.last_grad_norm = 0.0
        self.wire = Wire(process_group)  # every collective goes through it and is counted
        self.comm = BlockComm(self.wire, self.layout)
        self.wire_bytes_last_step = 0  # what step() sent (the selection pass's all-reduce apart)
        self._churn, self._selection_time = 0, 0.0
        self._selecting_at = 0  # the step the running selection pass selects for
        self.master_weights = False  # bf16 weights + fp32 masters of selected blocks (masters.py)
        self._grad32: dict[str, torch.Tensor] = {}  # fp32 accumulated gradients (master_weights)
        self._accum_hooks: list = []
        self._in_selection_pass = False
        for p in self.params.values():  # nothing trains until the first selection
            p.requires_grad_(False)
        if select_all:  # dense GaLore / GradNormLoRP: every candidate block, sharded by owner
            self._apply_selection(sorted(self.block_names))

    # ------------------------------------------------------------------ who am I (see layout)
    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def layer_names(self) -> list[str]:
        return list(dict.fromkeys(b.param for b in self.blocks))

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def group(self):
        return self.layout.group

    @property
    def fsdp(self) -> bool:
        """FSDP2 (fully_shard): parameters are DTensors sharded by rows; FSDP reduces gradients."""
        return self.layout.fsdp

    @property
    def fsdp_rows(self) -> bool:
        """FSDP2 with plain AdamW (fp32 or 8-bit): every rank updates its rows of every block; a
        projected state needs the whole block, so each is gathered to its owner."""
        return self.layout.fsdp_rows

    @property
    def zero_stage(self) -> int:
        return self.layout.zero_stage

    @zero_stage.setter
    def zero_stage(self, stage: int) -> None:
        self.layout.zero_stage = stage

    @property
    def owners(self) -> dict[str, int]:
        return self.layout.owners

    def _world(self) -> int:
        return self.layout.world()

    def _rank(self) -> int:
        return self.layout.rank()

    def _global_rank(self, group_rank: int) -> int:
        return self.layout.global_rank(group_rank)

    def holds(self, name: str) -> bool:
        """Whether this rank keeps (and updates) the block's state: its owner, or all at stage 0."""
        return self.layout.holds(name)

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
        self.layout.assign([self.block_by_name[n] for n in names])
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

    # ------------------------------------------------------------------ this rank's views of a block
    def _block_like(self, b: Block) -> torch.Tensor:
        """A tensor of the whole block's shape (the local view is only a row shard under FSDP)."""
        p = self.params[b.param]
        a, z = b.rows or (0, p.shape[0])
        return torch.empty((z - a, *p.shape[1:]), dtype=p.dtype, device=self.device)

    def _local_rows(self, b: Block) -> tuple[int, int, int]:
        """(first, last) rows of block b held here, and the offset of the local tensor (layout)."""
        return self.layout.local_rows(b)

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

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Reduce each selected gradient (to its owner), clip by the global norm, update, publish
        the new values, as the layout's strategy (steps.py) does it. The sync points, in order:
        the inactive blocks' sign step, the gradient reduction, the global norm's all-reduce, the
        publication of new weights. wire_bytes_last_step: what this step's collectives sent
        (scaletrain.distributed.wire says how each is counted)."""
        loss = closure() if closure is not None else None
        self.wire.take()  # (the selection pass's all-reduce is not this step's)
        group = self.param_groups[0]
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        strategy = step_layout(self)
        blocks = [self.block_by_name[n] for n in self.selected if self._grad(self.block_by_name[n]) is not None]
        # first the inactive blocks' sign step (it needs their gradients before stage 2 drops
        # the tensors they share with chosen row chunks); their squares join the clip norm
        sq_inactive = self._inactive_step(strategy, lr * self.inactive_lr_scale, wd)
        strategy.run(blocks, Hyper(lr, beta1, beta2, eps, wd), sq_inactive)
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
    def _inactive_step(self, strategy, lr: float, wd: float) -> torch.Tensor:
        """signSGD on every candidate block not chosen now (inactive="sign"): w -= lr * sign(g) of
        the gradient averaged over all ranks, no state; the strategy says how it is averaged.
        Returns this rank's share of the squared gradient norm."""
        if self.inactive == "none":
            return torch.zeros(1, dtype=torch.float64, device=self.device)
        blocks = [b for b in self._inactive_blocks() if self._grad(b) is not None]
        sq = strategy.sign_step(blocks, [self._grad(b) for b in blocks], lr, wd)
        self._drop_inactive_grads()
        return sq

    def _drop_inactive_grads(self) -> None:
        """Gradients of tensors no chosen block shares are used up by the sign step."""
        adam = {self.block_by_name[n].param for n in self.selected}
        for b in self.blocks:
            if b.param not in adam:
                self.params[b.param].grad = None

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

