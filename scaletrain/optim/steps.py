"""One optimizer step per layout: reduce, clip, update, publish.

  Replicated   one rank, or stage 0 (DDP): all-reduce the selected gradients; every rank updates
               every block
  Owner        stages 1 and 2: reduce to the owner (stage 2; stage 1 all-reduces), the owner
               updates, then broadcasts the new values
  FsdpRows     FSDP2 with plain Adam (fp32 or 8-bit): FSDP already reduce-scattered the rows;
               every rank updates its rows of every block, nothing to publish
  FsdpOwner    FSDP2 with projected states: each block's rows are gathered to its owner, which
               updates the whole block and scatters the rows back

The sync points of a step, in order: (1) the inactive blocks' sign step (before any gradient is
dropped, since inactive blocks can share a tensor with chosen row chunks), (2) the gradient
reduction, (3) the all-reduce of the squared global norm, (4) the publication of new weights.
Each layout also says how the inactive blocks' gradients are averaged (`sign_step`).

Clipping: each block's norm accumulated in fp64 (one multi-tensor kernel for all blocks: a
per-block loop is launch-bound on a GPU), squared and summed in fp64, so the clip coefficient does
not depend on how blocks are grouped over ranks (bf16 weights would amplify its last bit).
FsdpOwner keeps its own fp64 squares and Python-float coefficient: its numerics
predate the others' and checkpoints/tests pin them.
"""
from __future__ import annotations

import torch

from scaletrain.optim.update_rules import Hyper


def squared_norm(grads: list[torch.Tensor], device) -> torch.Tensor:
    """Sum of the squared norms of `grads`, shape [1], fp64: per-tensor norms accumulated in fp64
    by one multi-tensor kernel, then squared and summed."""
    if not grads:
        return torch.zeros(1, dtype=torch.float64, device=device)
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).pow(2).sum().reshape(1)


def apply_signs(weights: list[torch.Tensor], signs: list[torch.Tensor], lr: float, wd: float) -> None:
    """w -= lr * sign, multi-tensor; decoupled weight decay first, as the Adam blocks' AdamW."""
    if not weights:
        return
    signs = [s if s.dtype == w.dtype else s.to(w.dtype) for s, w in zip(signs, weights)]
    if wd:
        torch._foreach_mul_(weights, 1 - lr * wd)
    torch._foreach_add_(weights, signs, alpha=-lr)


class StepLayout:
    """The shared shape of a step; subclasses say how gradients are reduced and weights published.

    `opt` is the BlockOptimizer: the strategy reads its gradients and weights (`_grad`,
    `_weight`), its layout and collectives, and runs its update (`_update_blocks`)."""

    reduces_norm = False  # whether the squared norm is all-reduced (ranks hold different blocks/rows)

    def __init__(self, opt):
        self.opt, self.layout, self.comm = opt, opt.layout, opt.comm

    def run(self, blocks: list, hyper: Hyper, sq_inactive: torch.Tensor) -> None:
        mine = self.reduce(blocks)                          # sync: gradients
        grads = [self.opt._grad(b) for b in mine]
        self.clip(grads, sq_inactive)                       # sync: global norm
        self.opt._update_blocks(mine, grads, hyper)
        self.publish(mine, blocks)                          # sync: new weights

    def reduce(self, blocks: list) -> list:
        """Average the gradients as this layout needs; returns the blocks this rank updates."""
        return blocks

    def clip(self, grads: list[torch.Tensor], sq_inactive: torch.Tensor) -> None:
        """Record the global gradient norm and clip to max_grad_norm (as torch's clip_grad_norm_)."""
        opt = self.opt
        sq = squared_norm(grads, opt.device) + sq_inactive
        if self.reduces_norm:
            opt.wire.all_reduce(sq)  # the global norm over all selected blocks
        norm = sq.sqrt().float()[0]
        opt.last_grad_norm = float(norm)
        if opt.max_grad_norm > 0:
            coef = torch.clamp(opt.max_grad_norm / (norm + 1e-6), max=1.0)
            if grads:
                torch._foreach_mul_(grads, coef)

    def publish(self, mine: list, blocks: list) -> None:
        """Make the new weights visible on every rank that did not compute them."""

    def average(self, grads: list[torch.Tensor]) -> None:
        """Average gradients that every rank needs in full (the inactive blocks' sign step)."""
        if self.layout.world() > 1:
            self.comm.all_reduce_mean(grads)

    def sign_step(self, blocks: list, grads: list[torch.Tensor], lr: float, wd: float) -> torch.Tensor:
        """signSGD on the inactive blocks with the gradients averaged over all ranks; returns this
        rank's share of their squared norm."""
        self.average(grads)
        sq = squared_norm(grads, self.opt.device)
        apply_signs([self.opt._weight(b) for b in blocks], torch._foreach_sign(grads), lr, wd)
        return sq

    def sharded_sign_step(self, blocks: list, grads: list[torch.Tensor], lr: float, wd: float) -> torch.Tensor:
        """sign_step over ranks by reduce-scatter + 2-bit sign all-gather (comm.sharded_signs):
        about half a DDP all-reduce's bytes, and every rank applies the same signs, so W ranks
        equal one. Returns this rank's squared norm of its averaged shards."""
        sq = torch.zeros(1, dtype=torch.float64, device=self.opt.device)
        for start, signs, sq_part in self.comm.sharded_signs(grads):
            sq += sq_part
            apply_signs([self.opt._weight(b) for b in blocks[start:start + len(signs)]], signs, lr, wd)
        return sq


class Replicated(StepLayout):
    """One rank, or stage 0: every rank averages every gradient and updates every block. The
    inactive blocks need only the signs of their averaged gradients, so over several ranks they
    take the sharded sign step, as the owner layouts do, not an all-reduce."""

    def reduce(self, blocks: list) -> list:
        self.average([self.opt._grad(b) for b in blocks])
        return blocks

    def sign_step(self, blocks: list, grads: list[torch.Tensor], lr: float, wd: float) -> torch.Tensor:
        if self.layout.world() == 1:
            return super().sign_step(blocks, grads, lr, wd)
        sq = self.sharded_sign_step(blocks, grads, lr, wd)
        self.opt.wire.all_reduce(sq)  # the shards' squares: every rank clips its full gradients
        return sq


class Owner(StepLayout):
    """Stages 1 and 2: each block is updated by its owner only, which broadcasts the values."""

    reduces_norm = True

    def _by_owner(self, blocks: list) -> dict[int, list]:
        owners = self.layout.owners
        return {r: [b for b in blocks if owners[b.name] == r] for r in range(self.layout.world())}

    def reduce(self, blocks: list) -> list:
        by_owner = self._by_owner(blocks)
        mine = by_owner[self.layout.rank()]
        if self.layout.zero_stage == 2:
            for owner, owned in by_owner.items():
                self.comm.reduce_to_owner([self.opt._grad(b) for b in owned], owner)
            self._drop_unowned_grads(mine)
        else:
            self.comm.all_reduce_mean([self.opt._grad(b) for b in blocks])
        return mine

    def _drop_unowned_grads(self, mine: list) -> None:
        """Stage 2: once reduced to its owner, a gradient no other rank needs is released."""
        opt = self.opt
        keep = {b.param for b in mine}
        for b in (opt.block_by_name[n] for n in opt.selected):
            if b.param not in keep:
                opt.params[b.param].grad = None
                opt._grad32.pop(b.param, None)

    def publish(self, mine: list, blocks: list) -> None:
        for owner, owned in self._by_owner(blocks).items():
            self.comm.broadcast_from_owner([self.opt._weight(b) for b in owned], owner)

    def sign_step(self, blocks: list, grads: list[torch.Tensor], lr: float, wd: float) -> torch.Tensor:
        return self.sharded_sign_step(blocks, grads, lr, wd)  # (the norm's all-reduce: clip())


class FsdpRows(StepLayout):
    """FSDP2, plain Adam: FSDP reduce-scattered (averaged) the gradient rows in backward;
    every rank updates its rows of every block in place, so there is nothing to publish."""

    def __init__(self, opt):
        super().__init__(opt)
        self.reduces_norm = self.layout.world() > 1

    def average(self, grads: list[torch.Tensor]) -> None:
        pass  # FSDP has already reduce-scattered the rows each rank updates


class FsdpOwner(FsdpRows):
    """FSDP2 with projected states: each block's rows of gradient and weight are gathered
    to its owner, which runs the rule on the whole block and scatters the new rows back."""

    def run(self, blocks: list, hyper: Hyper, sq_inactive: torch.Tensor) -> None:
        opt = self.opt
        rank = self.layout.rank()
        sq = sum((opt._grad(b).double().pow(2).sum() for b in blocks),
                 torch.zeros((), dtype=torch.float64, device=opt.device)).reshape(1) + sq_inactive
        opt.wire.all_reduce(sq)  # the global norm, from the local rows
        norm = float(sq.sqrt())
        opt.last_grad_norm = norm
        coef = min(1.0, opt.max_grad_norm / (norm + 1e-6)) if opt.max_grad_norm > 0 else 1.0
        for b in blocks:
            owner = self.layout.owners[b.name]
            grad = self.comm.gather_rows(b, opt._grad(b), owner)
            weight = self.comm.gather_rows(b, opt._weight(b), owner)
            if rank == owner:
                if coef < 1.0:
                    grad.mul_(coef)
                if b.name not in opt.block_state:
                    opt.block_state[b.name] = opt.rule.new_state(b, weight)
                opt.rule.update(b, weight, grad, opt.block_state[b.name], hyper)
            self.comm.scatter_rows(b, weight, opt._weight(b), owner)


def step_layout(opt) -> StepLayout:
    """The strategy for the optimizer's layout now (the engine may set zero_stage after construction)."""
    layout = opt.layout
    if layout.fsdp:
        return FsdpRows(opt) if layout.fsdp_rows else FsdpOwner(opt)
    return Owner(opt) if layout.owner_sharded else Replicated(opt)
