"""Every tensor collective scaletrain issues (the optimizers' own, the run's scalars:
runtime.SCALARS, the zeroth-order Fisher sum), through one object that counts the bytes this rank
sends. (Checkpoint commits exchange small Python objects and barriers, no tensors.)

Counted from the tensors handed to each collective, as NCCL's bandwidth-optimal algorithms send
them (ring or chain), per rank, the mean over ranks where ranks differ:

    all_reduce                    2 (W-1)/W x the tensor's bytes
    reduce, broadcast             (W-1)/W x the tensor's bytes
    reduce_scatter_tensor         (W-1)/W x the input's bytes
    all_gather_into_tensor        (W-1)   x this rank's input bytes
    gather, scatter, send         the bytes this rank itself sends

gloo over loopback sends exactly these totals for all_reduce, broadcast and all_gather; its reduce
sends 2.4x the count at 2 ranks (1.8x at 3), and its reduce_scatter is an all-reduce (2x): measured
against the loopback interface's counters in tests/distributed/test_wire.py. The count is what a
bandwidth-optimal implementation (NCCL) sends, not what gloo does.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Wire:
    """dist collectives on `group`, counting sent bytes; `take()` reads and resets the count."""

    def __init__(self, group=None):
        self.group = group
        self.sent = 0

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    def take(self) -> int:
        sent, self.sent = self.sent, 0
        return sent

    def _ring(self, nbytes: int, times: int = 1) -> None:
        w = self.world
        self.sent += times * (w - 1) * nbytes // w

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        dist.all_reduce(t, op=op, group=self.group)
        self._ring(_nbytes(t), times=2)

    def reduce(self, t: torch.Tensor, dst: int) -> None:
        """dst: a global rank, as torch.distributed takes it."""
        dist.reduce(t, dst, group=self.group)
        self._ring(_nbytes(t))

    def broadcast(self, t: torch.Tensor, src: int) -> None:
        dist.broadcast(t, src, group=self.group)
        self._ring(_nbytes(t))

    def reduce_scatter_tensor(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        dist.reduce_scatter_tensor(out, inp, group=self.group)
        self._ring(_nbytes(inp))

    def all_gather_into_tensor(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        dist.all_gather_into_tensor(out, inp, group=self.group)
        self.sent += (self.world - 1) * _nbytes(inp)

    def all_gather(self, outs: list[torch.Tensor], inp: torch.Tensor) -> None:
        dist.all_gather(outs, inp, group=self.group)
        self.sent += (self.world - 1) * _nbytes(inp)

    def gather(self, inp: torch.Tensor, outs: list[torch.Tensor] | None, dst: int) -> None:
        dist.gather(inp, outs, dst=dst, group=self.group)
        if dist.get_rank() != dst:
            self.sent += _nbytes(inp)

    def scatter(self, out: torch.Tensor, chunks: list[torch.Tensor] | None, src: int) -> None:
        dist.scatter(out, chunks, src=src, group=self.group)
        if dist.get_rank() == src:
            self.sent += (len(chunks) - 1) * _nbytes(out)

    def send(self, t: torch.Tensor, dst: int) -> None:
        dist.send(t, dst, group=self.group)
        self.sent += _nbytes(t)

    def recv(self, t: torch.Tensor, src: int) -> None:
        dist.recv(t, src, group=self.group)
