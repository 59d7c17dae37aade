"""bf16 weights with fp32 masters, and the gradients the block optimizer holds between steps.

With `use_master_weights` (set by the engines when the ds_config enables bf16) the model's
weights are bf16 everywhere; each selected block has an fp32 master copy in its state, on the
ranks that hold the state, which the update rule steps and the bf16 weight is rounded from.
Gradients are accumulated over micro-batches into fp32 buffers: a post-accumulate-grad hook adds
each bf16 gradient and frees it, so the reduction and the update see fp32 sums, not a sum of
bf16 roundings.

A mixin of BlockOptimizer: it reads `params`, `selected`, `block_by_name`, `block_state`, `rule`
and `_in_selection_pass`, and owns `master_weights`, `_grad32` and `_accum_hooks`.
"""
from __future__ import annotations

import torch

from scaletrain.optim.selection import Block


class MasterWeights:
    """bf16 masters and gradient accumulation of BlockOptimizer (see the module docstring)."""

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

    def _new_state(self, b: Block, weight: torch.Tensor) -> dict:
        """The rule's state for a block; with master weights, on an fp32 copy of the weight,
        which is kept in the state as "master" (saved, moved and resharded like the moments)."""
        if not self.master_weights:
            return self.rule.new_state(b, weight)
        master = weight.detach().float().clone()
        st = self.rule.new_state(b, master)
        st["master"] = master
        return st

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
