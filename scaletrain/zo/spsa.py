"""MeZO's two-point zeroth-order step (SPSA), on the tensors a `ZOModel` says may move.

For each of `samples` directions i (seed s_i derived from (seed, step, i), identical on every rank):

    theta += eps z_i;  L+ = loss          z_i ~ N(0, I) drawn from torch.Generator(s_i)
    theta -= 2 eps z_i; L- = loss
    theta += eps z_i                      (restore)
    g_i = (L+ - L-) / (2 eps)             the projected gradient: ~ grad L . z_i

then, with z_i regenerated from s_i (never stored),

    theta -= lr * (mean_i g_i z_i + weight_decay * theta)

Data parallel: each rank evaluates L+ and L- on its own micro-batches; the only collective is one
all-reduce of the 2 x samples local loss sums (and the micro-batch count) per step, from which
every rank computes the same g. Parameters never travel: the seeds are shared.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from scaletrain.distributed.wire import Wire


class SPSA:
    def __init__(self, tensors: list[torch.Tensor], *, lr: float, eps: float = 1e-3, samples: int = 1,
                 weight_decay: float = 0.0, seed: int = 0, group=None):
        if eps <= 0 or samples < 1:
            raise ValueError("SPSA needs eps > 0 and samples >= 1")
        self.tensors = list(tensors)
        self.lr, self.eps, self.samples, self.weight_decay = lr, eps, samples, weight_decay
        self.seed, self.group = seed, group
        self.wire = Wire(group)
        self.wire_bytes_last_step = 0

    def seed_for(self, step: int, sample: int) -> int:
        """A well-mixed 63-bit seed from (seed, step, sample): the same on every rank and after a
        restart, no communication."""
        state = np.random.SeedSequence([self.seed, step, sample]).generate_state(1, np.uint64)
        return int(state[0]) & ((1 << 63) - 1)

    def directions(self, seed: int):
        """z for each tensor, in order, regenerated from the seed."""
        device = self.tensors[0].device
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        for t in self.tensors:
            yield torch.randn(t.shape, generator=gen, device=device, dtype=t.dtype)

    @torch.no_grad()
    def _move(self, seed: int, scale: float) -> None:
        for t, z in zip(self.tensors, self.directions(seed)):
            t.add_(z, alpha=scale)

    def _world(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    @torch.no_grad()
    def step(self, closure: Callable[[], tuple[float, float]], step: int) -> dict:
        """closure() -> (sum of this rank's micro-batch mean losses, number of micro-batches).
        Returns the global losses and projected gradients of this step."""
        local, count = [], 0.0
        for i in range(self.samples):
            s = self.seed_for(step, i)
            self._move(s, self.eps)
            plus, count = closure()
            self._move(s, -2 * self.eps)
            minus, _ = closure()
            self._move(s, self.eps)
            local += [plus, minus]
        buf = torch.tensor(local + [count], dtype=torch.float64, device=self.tensors[0].device)
        if self._world() > 1:  # the one collective of a step
            self.wire.all_reduce(buf)
        self.wire_bytes_last_step = self.wire.take()
        sums = buf[:-1].cpu().view(self.samples, 2) / buf[-1].item()
        g = ((sums[:, 0] - sums[:, 1]) / (2 * self.eps)).tolist()
        if self.weight_decay:
            for t in self.tensors:
                t.mul_(1 - self.lr * self.weight_decay)
        for i, gi in enumerate(g):
            self._move(self.seed_for(step, i), -self.lr * gi / self.samples)
        return {"loss": float(sums.mean()), "loss_plus": sums[:, 0].tolist(), "loss_minus": sums[:, 1].tolist(),
                "projected_grad": float(np.mean(g)), "g": g}
