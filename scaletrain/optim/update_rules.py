"""Per-block update rules of the block optimizer: what one owner does to one block's weight.

  AdamWRule         torch.optim.AdamW's arithmetic, op for op (projection: none)
  GaLoreRule        GaLore: Adam in a rank-r subspace of the gradient, arithmetic of galore-torch
  GradNormLoRPRule  GradNormLoRP: per-row magnitude m and unit direction D (W = m * D), Adam on
                    m densely and on D's gradient projected to rank r (GaLore's projector)

A rule allocates a block's whole state up front (`new_state`: fixed keys and shapes, so a new
owner can allocate the buffers it receives a moved state into) and updates a block in place
(`update`). Moments are stored fp32 or, with eight_bit, as dynamic 8-bit codes + absmax
(quant8): `MomentStore` hides which.

State layout (tensors and plain numbers only, keyed per block by the optimizer):
  step                    float, updates applied
  exp_avg, exp_avg_sq     moments (projected shape for projected blocks); with 8-bit, for matrices
                          of at least quant8.MIN_NUMEL values: <key>_q (uint8, the moment's shape)
                          and <key>_absmax (fp32, [rows, chunks per row]: quant8)
  proj                    the GaLore basis (r x n or m x r), projected blocks only
  proj_stale              1.0 when the basis must be refit at the next update (reselection)
  mag_exp_avg(_sq)        GradNormLoRP: moments of the per-row magnitudes (m values each)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scaletrain.optim import quant8
from scaletrain.optim.lowrank import GaLoreProjector


@dataclass(frozen=True)
class Hyper:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


class MomentStore:
    """Reads and writes Adam moments kept fp32 (the tensor itself, updated in place) or 8-bit."""

    def __init__(self, eight_bit: bool):
        self.eight_bit = eight_bit

    def quantizes(self, shape, whole_numel: int | None = None) -> bool:
        """Whether a moment of `shape` is kept in 8 bits: matrices of at least quant8.MIN_NUMEL
        values, judged on the whole block (`whole_numel`) where `shape` is an FSDP2 row shard of
        it, so every rank decides alike. 1-D moments (norm weights) stay fp32: chunks of a flat
        tensor would not follow FSDP2's row shards, and they are a few thousand values a layer."""
        numel = math.prod(shape) if whole_numel is None else whole_numel
        return self.eight_bit and len(shape) >= 2 and quant8.quantized(numel)

    def alloc(self, state: dict, key: str, shape, dtype, whole_numel: int | None = None) -> None:
        if self.quantizes(shape, whole_numel):
            state[f"{key}_q"] = torch.zeros(shape, dtype=torch.uint8)
            state[f"{key}_absmax"] = torch.zeros(quant8.absmax_shape(shape), dtype=torch.float32)
        else:
            state[key] = torch.zeros(shape, dtype=dtype)

    def load(self, state: dict, key: str, signed: bool) -> torch.Tensor:
        if key in state:
            return state[key]
        return quant8.dequantize(state[f"{key}_q"], state[f"{key}_absmax"], signed)

    def store(self, state: dict, key: str, value: torch.Tensor, signed: bool) -> None:
        if key in state:
            return  # fp32 moments were updated in place
        state[f"{key}_q"], state[f"{key}_absmax"] = quant8.quantize(value, signed)


def chunked_by_rows(state: dict) -> dict:
    """A plain-Adam state whose 8-bit matrices were saved flat-chunked (1-D absmax, before row
    chunking), re-quantized row by row, so it can be cut into FSDP2 row shards; else as it is."""
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes, absmax = state.get(f"{key}_q"), state.get(f"{key}_absmax")
        if codes is not None and codes.dim() >= 2 and absmax.dim() == 1:
            state[f"{key}_q"], state[f"{key}_absmax"] = quant8.quantize(quant8.dequantize(codes, absmax, signed),
                                                                        signed)
    return state


def _to(state: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in state.items()}


class PerBlockRule:
    """A rule that updates one block at a time; update_blocks() loops over update()."""

    def update_blocks(self, blocks, weights, grads, states, hp: Hyper) -> None:
        for block, weight, grad, state in zip(blocks, weights, grads, states):
            self.update(block, weight, grad, state, hp)


class AdamWRule(PerBlockRule):
    """torch.optim.AdamW's single-tensor update, op for op (bit-identical in fp32); many blocks
    at once through torch's multi-tensor (foreach) kernels, with the same arithmetic."""

    def __init__(self, eight_bit: bool = False):
        self.moments = MomentStore(eight_bit)

    def new_state(self, block, weight: torch.Tensor) -> dict:
        state = {"step": 0.0}
        for key in ("exp_avg", "exp_avg_sq"):  # (weight: the block, or its local rows under FSDP2)
            self.moments.alloc(state, key, weight.shape, weight.dtype, block.numel if block is not None else None)
        return _to(state, weight.device)

    def update(self, block, weight, grad, state, hp: Hyper) -> None:
        m = self.moments.load(state, "exp_avg", signed=True)
        v = self.moments.load(state, "exp_avg_sq", signed=False)
        state["step"] += 1.0
        if hp.weight_decay != 0:
            weight.mul_(1 - hp.lr * hp.weight_decay)
        m.lerp_(grad, 1 - hp.beta1)
        v.mul_(hp.beta2).addcmul_(grad, grad, value=1 - hp.beta2)
        step = state["step"]
        step_size = hp.lr / (1 - hp.beta1 ** step)
        denom = (v.sqrt() / ((1 - hp.beta2 ** step) ** 0.5)).add_(hp.eps)
        weight.addcdiv_(m, denom, value=-step_size)
        self.moments.store(state, "exp_avg", m, signed=True)
        self.moments.store(state, "exp_avg_sq", v, signed=False)

    def update_blocks(self, blocks, weights, grads, states, hp: Hyper) -> None:
        """update() on every block, one kernel launch per op for all blocks with fp32 moments and
        the same step count (on a GPU the per-block loop is launch-bound); 8-bit ones one by one."""
        groups: dict[float, list[int]] = {}
        for i, (block, state) in enumerate(zip(blocks, states)):
            if "exp_avg" in state and "exp_avg_sq" in state:
                groups.setdefault(state["step"] + 1.0, []).append(i)
            else:
                self.update(block, weights[i], grads[i], state, hp)
        for step, idx in groups.items():
            w, g = [weights[i] for i in idx], [grads[i] for i in idx]
            m, v = [states[i]["exp_avg"] for i in idx], [states[i]["exp_avg_sq"] for i in idx]
            for i in idx:
                states[i]["step"] = step
            if hp.weight_decay != 0:
                torch._foreach_mul_(w, 1 - hp.lr * hp.weight_decay)
            torch._foreach_lerp_(m, g, 1 - hp.beta1)
            torch._foreach_mul_(v, hp.beta2)
            torch._foreach_addcmul_(v, g, g, value=1 - hp.beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, (1 - hp.beta2 ** step) ** 0.5)
            torch._foreach_add_(denom, hp.eps)
            torch._foreach_addcdiv_(w, m, denom, value=-hp.lr / (1 - hp.beta1 ** step))


class GaLoreRule(PerBlockRule):
    """GaLore-AdamW on one block, following galore-torch's arithmetic: the basis is refit when
    the step count (before the increment) is a multiple of update_proj_gap, i.e. at the first
    update and every gap updates after; moments persist across refits, as in GaLore. Blocks that
    are not projected (1-D, min side <= rank, or not matching proj_patterns) get the same Adam
    arithmetic without projection, as galore-torch's non-GaLore parameter group does."""

    def __init__(self, projector: GaLoreProjector, update_proj_gap: int, proj_patterns: tuple[str, ...],
                 eight_bit: bool = False):
        self.projector, self.gap, self.patterns = projector, update_proj_gap, proj_patterns
        self.moments = MomentStore(eight_bit)
        self.refits = 0  # basis fits so far on this rank (benchmarks time those steps apart)

    def projects(self, block, weight: torch.Tensor) -> bool:
        return self.projector.applies_to(weight.shape) and any(p in block.param for p in self.patterns)

    def new_state(self, block, weight: torch.Tensor) -> dict:
        state = {"step": 0.0}
        shape = weight.shape
        if self.projects(block, weight):
            state["proj"] = torch.zeros(self.projector.basis_shape(shape), dtype=weight.dtype)
            state["proj_stale"] = 0.0
            shape = self.projector.moment_shape(shape)
        for key in ("exp_avg", "exp_avg_sq"):
            self.moments.alloc(state, key, shape, weight.dtype)
        return _to(state, weight.device)

    def _project(self, block, grad, state) -> torch.Tensor:
        if "proj" not in state:
            return grad
        if state["step"] % self.gap == 0 or state["proj_stale"]:
            state["proj"].copy_(self.projector.fit(grad, block.name, int(state["step"])))
            state["proj_stale"] = 0.0
            self.refits += 1
        return self.projector.project(grad, state["proj"])

    def _adam_direction(self, grad, state, hp: Hyper) -> tuple[torch.Tensor, float]:
        """(m / (sqrt(v) + eps), step size with bias correction), as galore-torch computes them."""
        m = self.moments.load(state, "exp_avg", signed=True)
        v = self.moments.load(state, "exp_avg_sq", signed=False)
        state["step"] += 1.0
        m.mul_(hp.beta1).add_(grad, alpha=1.0 - hp.beta1)
        v.mul_(hp.beta2).addcmul_(grad, grad, value=1.0 - hp.beta2)
        denom = v.sqrt().add_(hp.eps)
        step = state["step"]
        step_size = hp.lr * math.sqrt(1.0 - hp.beta2 ** step) / (1.0 - hp.beta1 ** step)
        direction = m / denom
        self.moments.store(state, "exp_avg", m, signed=True)
        self.moments.store(state, "exp_avg_sq", v, signed=False)
        return direction, step_size

    def update(self, block, weight, grad, state, hp: Hyper) -> None:
        low = self._project(block, grad, state)
        direction, step_size = self._adam_direction(low, state, hp)
        if "proj" in state:
            direction = self.projector.project_back(direction, state["proj"], weight.shape)
        weight.add_(direction, alpha=-step_size)
        if hp.weight_decay > 0.0:
            weight.add_(weight, alpha=-hp.lr * hp.weight_decay)


class GradNormLoRPRule(GaLoreRule):
    """GradNormLoRP on one 2-D block W (out x in), over the plain weight (no adapter, no copy):

        m_i = ||W_i||,  D = W / m                      (per output row i)
        grad m_i = sum_j D_ij G_ij                     (G = dL/dW)
        grad D   = m_i (G_i - D_i grad m_i)            (gradient w.r.t. the direction V at V = D,
                                                        the weight-norm chain rule)
    Adam (torch arithmetic) on m densely and on grad D, projected to rank r when the block is
    projected; D is renormalised after its step and W = m * D is written back. Decoupled weight
    decay scales W (i.e. m). Other blocks get AdamWRule."""

    def __init__(self, projector: GaLoreProjector, update_proj_gap: int, proj_patterns: tuple[str, ...],
                 eight_bit: bool = False):
        super().__init__(projector, update_proj_gap, proj_patterns, eight_bit)
        self.plain = AdamWRule(eight_bit)

    def reparametrised(self, block, weight) -> bool:
        return weight.dim() == 2 and any(p in block.param for p in self.patterns)

    def new_state(self, block, weight: torch.Tensor) -> dict:
        if not self.reparametrised(block, weight):
            return self.plain.new_state(block, weight)
        state = super().new_state(block, weight)
        rows = weight.shape[0]
        state["mag_exp_avg"] = torch.zeros(rows, dtype=weight.dtype, device=weight.device)
        state["mag_exp_avg_sq"] = torch.zeros(rows, dtype=weight.dtype, device=weight.device)
        return state

    @staticmethod
    def split_gradient(weight, grad):
        """(m, D, grad m, grad D) for W = m * D with unit-norm rows D."""
        mag = weight.norm(dim=1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
        direction = weight / mag
        grad_mag = (direction * grad).sum(dim=1, keepdim=True)
        grad_dir = mag * (grad - direction * grad_mag)
        return mag, direction, grad_mag, grad_dir

    def update(self, block, weight, grad, state, hp: Hyper) -> None:
        if "mag_exp_avg" not in state:
            self.plain.update(block, weight, grad, state, hp)
            return
        if hp.weight_decay != 0:
            weight.mul_(1 - hp.lr * hp.weight_decay)
        mag, direction, grad_mag, grad_dir = self.split_gradient(weight, grad)
        low = self._project(block, grad_dir, state)
        state["step"] += 1.0
        step = state["step"]
        bc1, bc2_sqrt = 1 - hp.beta1 ** step, (1 - hp.beta2 ** step) ** 0.5

        def adam(g, m, v):  # torch.optim.Adam's moments and normalised step, for m and for D
            m.lerp_(g, 1 - hp.beta1)
            v.mul_(hp.beta2).addcmul_(g, g, value=1 - hp.beta2)
            return m / (v.sqrt() / bc2_sqrt).add_(hp.eps)

        mag_step = adam(grad_mag.squeeze(1), state["mag_exp_avg"], state["mag_exp_avg_sq"])
        m = self.moments.load(state, "exp_avg", signed=True)
        v = self.moments.load(state, "exp_avg_sq", signed=False)
        dir_step = adam(low, m, v)
        self.moments.store(state, "exp_avg", m, signed=True)
        self.moments.store(state, "exp_avg_sq", v, signed=False)
        if "proj" in state:
            dir_step = self.projector.project_back(dir_step, state["proj"], weight.shape)
        new_mag = mag.squeeze(1) - (hp.lr / bc1) * mag_step
        new_dir = direction - (hp.lr / bc1) * dir_step
        new_dir /= new_dir.norm(dim=1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
        weight.copy_(new_mag.unsqueeze(1) * new_dir)


def build_rule(projection: str, *, rank: int, update_proj_gap: int, proj_scale: float, svd: str,
               proj_patterns: tuple[str, ...], eight_bit: bool):
    if projection == "none":
        return AdamWRule(eight_bit)
    projector = GaLoreProjector(rank, proj_scale, svd)
    if projection == "galore":
        return GaLoreRule(projector, update_proj_gap, proj_patterns, eight_bit)
    if projection == "gradnorm_lorp":
        return GradNormLoRPRule(projector, update_proj_gap, proj_patterns, eight_bit)
    raise ValueError(f"unknown projection {projection!r}: none, galore or gradnorm_lorp")
