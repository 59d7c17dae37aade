"""Sensitive coordinates: the top `density` fraction of linear-weight entries by Fisher diagonal.

SensZOQ (arXiv 2406.02913) keeps a static mask of the coordinates with the largest squared
first-order gradient on pretraining text (C4), computed once and reused across tasks. Here:

  fisher[w] = sum over calibration sequences s of (d loss_s / d w)^2

one sequence per backward (the empirical Fisher: per-sequence gradients, so the sum does not
depend on how sequences are grouped, hence not on the world size), over the candidate weights:
2-D parameters whose name contains one of `patterns` (default: every attention and MLP
projection, q/k/v/o and gate/up/down; embedding, head and norms stay out). Squared gradients
are accumulated into one flat float32 buffer by post-accumulate-grad hooks that free each
gradient at once, so a full set of gradients never coexists.

Across data-parallel ranks each rank takes every W-th calibration sequence; the one collective is
an all-reduce of the flat buffer (every rank then holds the global Fisher and derives the same
mask with no further communication). `scope` "global" (default) keeps the top k = round(density x
candidates) entries over all matrices together (torch.topk on the flat buffer, so exactly k);
"per_matrix" keeps round(density x numel) in each matrix (at least 1).

The mask is {parameter name: sorted int64 flat indices}, saved with the checkpoint (tensors,
strings and numbers only: `torch.load(weights_only=True)` reads it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from scaletrain.distributed.wire import Wire


def candidate_names(model: torch.nn.Module, patterns) -> list[str]:
    """2-D weights whose name contains one of `patterns` ('' matches all), in model order."""
    return [n for n, p in model.named_parameters()
            if p.dim() == 2 and any(pat in n for pat in patterns)]


@dataclass
class Mask:
    indices: dict[str, torch.Tensor]  # name -> sorted int64 flat indices
    shapes: dict[str, list[int]]
    density: float
    scope: str = "global"
    meta: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.indices)

    @property
    def count(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def candidates(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes.values())

    def state_dict(self) -> dict:
        return {"kind": "zo_mask", "density": float(self.density), "scope": self.scope,
                "names": list(self.indices), "indices": {n: i.cpu() for n, i in self.indices.items()},
                "shapes": {n: list(s) for n, s in self.shapes.items()}, "meta": dict(self.meta)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Mask":
        if state.get("kind") != "zo_mask":
            raise ValueError(f"not a SensZOQ mask (kind {state.get('kind')!r})")
        return cls({n: state["indices"][n].long() for n in state["names"]},
                   {n: list(state["shapes"][n]) for n in state["names"]},
                   float(state["density"]), state.get("scope", "global"), dict(state.get("meta", {})))

    def checksum(self) -> float:
        """A number equal on every rank iff the masks agree (for debug checks)."""
        return float(sum((k + 1) * (i.double() + 1).square().sum()
                         for k, i in enumerate(self.indices.values())))


def fisher_diagonal(model: torch.nn.Module, names: list[str], sequences: list[torch.Tensor],
                    loss_fn, group=None) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
    """Global sum of squared per-sequence gradients of the named parameters, as one flat float32
    buffer, and each name's (offset, numel) in it. `sequences` are this rank's (1, L) windows;
    `loss_fn(model, window)` returns the scalar loss of one."""
    params = dict(model.named_parameters())
    spans, offset = {}, 0
    for n in names:
        spans[n] = (offset, params[n].numel())
        offset += params[n].numel()
    device = params[names[0]].device
    fisher = torch.zeros(offset, dtype=torch.float32, device=device)
    was = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in spans)
        p.grad = None

    def hook_for(name):
        a, k = spans[name]

        def hook(p):
            fisher[a:a + k].add_(p.grad.detach().float().reshape(-1).square())
            p.grad = None  # freed at once
        return hook

    handles = [params[n].register_post_accumulate_grad_hook(hook_for(n)) for n in names]
    try:
        was_training = model.training
        model.eval()  # no dropout in Llama; eval only for clarity
        for seq in sequences:
            loss_fn(model, seq.to(device)).backward()
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(was[n])
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        Wire(group).all_reduce(fisher)  # the one collective
    return fisher, spans


def top_mask(fisher: torch.Tensor, spans: dict[str, tuple[int, int]], shapes: dict[str, list[int]],
             density: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Sorted flat indices per name of the top-`density` Fisher entries (global or per matrix)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density {density} outside (0, 1]")
    out: dict[str, torch.Tensor] = {}
    if scope == "global":
        k = max(1, round(density * fisher.numel()))
        top = torch.topk(fisher, k, sorted=False).indices.sort().values
        for n, (a, m) in spans.items():
            lo, hi = torch.searchsorted(top, torch.tensor([a, a + m], device=top.device)).tolist()
            out[n] = (top[lo:hi] - a).cpu()
    elif scope == "per_matrix":
        for n, (a, m) in spans.items():
            k = max(1, round(density * m))
            out[n] = torch.topk(fisher[a:a + m], k, sorted=False).indices.sort().values.cpu()
    else:
        raise ValueError(f"mask scope {scope!r}: choose global or per_matrix")
    return out


def compute_mask(model: torch.nn.Module, patterns, sequences: list[torch.Tensor], loss_fn,
                 density: float, scope: str = "global", group=None, n_global: int | None = None) -> Mask:
    """The mask from this rank's calibration `sequences` (n_global of them over all ranks)."""
    t0 = time.perf_counter()
    names = candidate_names(model, patterns)
    if not names:
        raise ValueError(f"no 2-D weight matches zo.patterns {list(patterns)}")
    fisher, spans = fisher_diagonal(model, names, sequences, loss_fn, group)
    params = dict(model.named_parameters())
    shapes = {n: list(params[n].shape) for n in names}
    indices = top_mask(fisher, spans, shapes, density, scope)
    kept = sum(float(fisher[spans[n][0] + i.to(fisher.device)].sum()) for n, i in indices.items())
    total = float(fisher.sum())
    meta = {"calib_sequences": len(sequences) if n_global is None else n_global,
            "fisher_share": kept / total if total > 0 else 0.0,  # of the squared-gradient mass
            "seconds": time.perf_counter() - t0}
    return Mask(indices, shapes, density, scope, meta)
