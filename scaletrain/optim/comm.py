"""The block optimizer's collectives: bucketing, reduce-to-owner, all-reduce, broadcast from
owner, FSDP row gather/scatter, and the sign step's 2-bit reduce-scatter/all-gather.

Every collective goes through `Wire` (scaletrain.distributed.wire), which counts the bytes each
sends. Buckets are flat concatenations of at most BUCKET_BYTES: one collective per bucket
instead of per tensor, with a bounded extra buffer. All functions here are collective: every
rank of the group must call them in the same order with the same tensor sizes.
"""
from __future__ import annotations

import math

import torch

from scaletrain.distributed.wire import Wire
from scaletrain.optim.layout import BlockLayout
from scaletrain.optim.selection import Block

BUCKET_BYTES = 32 * 2**20  # gradient all-reduce bucket: bounds the flat buffer's extra memory


def buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive groups of at most BUCKET_BYTES (a larger tensor is a bucket of its own)."""
    out, current, size = [], [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > BUCKET_BYTES:
            out.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    return out + ([current] if current else [])


def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
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


class BlockComm:
    """The collectives of one optimizer, over its layout's group, counted by its wire."""

    def __init__(self, wire: Wire, layout: BlockLayout):
        self.wire, self.layout = wire, layout

    def reduce_to_owner(self, grads: list[torch.Tensor], owner: int) -> None:
        """Sum gradients onto their owner, which divides by the world size (stage 2)."""
        world, rank = self.layout.world(), self.layout.rank()
        for bucket in buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            self.wire.reduce(flat, self.layout.global_rank(owner))
            if rank == owner:
                flat /= world
                unflatten_into(flat, bucket)

    def all_reduce_mean(self, grads: list[torch.Tensor]) -> None:
        """Average gradients on every rank (stages 0 and 1)."""
        world = self.layout.world()
        for bucket in buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            self.wire.all_reduce(flat)
            flat /= world
            unflatten_into(flat, bucket)

    def broadcast_from_owner(self, weights: list[torch.Tensor], owner: int) -> None:
        """The owner's new values to every other rank (stages 1 and 2)."""
        rank = self.layout.rank()
        for bucket in buckets(weights):
            flat = torch.cat([w.reshape(-1) for w in bucket])
            self.wire.broadcast(flat, self.layout.global_rank(owner))
            if rank != owner:
                unflatten_into(flat, bucket)

    def gather_rows(self, b: Block, local: torch.Tensor, owner: int) -> torch.Tensor | None:
        """FSDP2: the whole block on its owner from every rank's rows (None on the others). Each
        rank sends a buffer padded to the largest share, as gather needs equal sizes."""
        rows = self.layout.rows_per_rank(b)
        padded = torch.zeros((max(rows), *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in rows] if self.layout.rank() == owner else None
        self.wire.gather(padded, parts, dst=self.layout.global_rank(owner))
        return torch.cat([part[:n] for part, n in zip(parts, rows)]) if parts is not None else None

    def scatter_rows(self, b: Block, full: torch.Tensor | None, local: torch.Tensor, owner: int) -> None:
        """FSDP2: the owner's whole block back into every rank's rows (`local`, in place)."""
        rows = self.layout.rows_per_rank(b)
        buf = torch.empty((max(rows), *local.shape[1:]), dtype=local.dtype, device=local.device)
        chunks = None
        if self.layout.rank() == owner:
            chunks, start = [], 0
            for n in rows:
                chunk = torch.zeros_like(buf)
                chunk[:n] = full[start:start + n]
                chunks.append(chunk)
                start += n
        self.wire.scatter(buf, chunks, src=self.layout.global_rank(owner))
        local.copy_(buf[: local.shape[0]])

    def all_gather_rows(self, b: Block, local: torch.Tensor) -> torch.Tensor:
        """FSDP2: the whole block on every rank from every rank's rows."""
        rows = self.layout.rows_per_rank(b)
        padded = torch.zeros((max(rows), *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in rows]
        self.wire.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, rows)])

    def sharded_signs(self, grads: list[torch.Tensor]):
        """Yields, bucket by bucket, (first index into grads, the signs of those gradients averaged
        over all ranks, this rank's squared norm of its averaged shard).

        Each bucket is reduce-scattered (each rank averages 1/W of it), the signs are taken there
        and all-gathered at 2 bits a value: about half a DDP all-reduce's bytes, and every rank
        gets the same signs. One bucket at a time, so the buffers stay bounded."""
        world = self.layout.world()
        device = grads[0].device if grads else None
        start = 0
        for bucket in buckets(grads):
            n = sum(g.numel() for g in bucket)
            padded = math.ceil(n / (4 * world)) * 4 * world  # whole bytes of 2-bit codes per rank
            flat = torch.zeros(padded, dtype=torch.float32, device=device)
            torch.cat([g.reshape(-1).float() for g in bucket], out=flat[:n])
            shard = torch.empty(padded // world, dtype=torch.float32, device=device)
            self.wire.reduce_scatter_tensor(shard, flat)
            shard /= world
            sq = shard.double().pow(2).sum()
            packed = torch.empty(padded // 4, dtype=torch.uint8, device=device)
            self.wire.all_gather_into_tensor(packed, pack_signs(shard))
            signs = unpack_signs(packed)[:n].split([g.numel() for g in bucket])
            yield start, [s.view_as(g) for s, g in zip(signs, bucket)], sq
            start += len(bucket)
