"""Blockwise 4-bit weights (NF4 or absmax int4), pure torch, with a sparse full-precision part.

Storage of an m x n weight (numel N, block B = 64 by default):
  codes   uint8, ceil(N / B) * B / 2 bytes: two 4-bit codes per byte (even index in the low nibble)
  scales  float32, one absmax per block of B consecutive values (row-major order)
so 0.5 + 4 / B bytes a value (0.5625 at B = 64). A code indexes a 16-entry level table in [-1, 1]
and the value is level * scale:
  nf4   QLoRA's NormalFloat4 levels (quantiles of N(0, 1), 0 exactly representable, 8 positive
        and 7 negative levels, normalised to +-1); error <= half the widest gap (0.1519) x absmax
  int4  15 symmetric levels k / 7, k = -7..7; error <= absmax / 14
Values are rounded to the nearest level (bucketize on the midpoints), so each block's
round-trip error is at most half the gap around the value, times the block's absmax.

`SparseDeltaLinear` replaces an `nn.Linear` of a frozen model: its weight is the frozen base (4-bit
codes, or a dense tensor for `none`) with the sensitive coordinates overwritten by a few
full-precision values, the only ones that train (SensZOQ's dense-and-sparse decomposition). The
sensitive coordinates are zeroed before quantization (they do not widen their block's range), so
the dequantized base is exactly 0 there and overwriting equals adding the sparse part. The weight
is materialized per forward, one matrix at a time, and freed after the matmul.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FORMATS = ("nf4", "int4", "none")


def nf4_levels(dtype=torch.float32) -> torch.Tensor:
    """NormalFloat4 (Dettmers et al. 2023): 8 positive quantiles of N(0, 1) from offset 0.9677083
    down to 0.5, 7 negative ones, and 0; scaled so the extremes are +-1."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (levels / levels.max()).to(dtype)


def int4_levels(dtype=torch.float32) -> torch.Tensor:
    return (torch.arange(-7, 8, dtype=torch.float64) / 7).to(dtype)


LEVELS = {"nf4": nf4_levels, "int4": int4_levels}


def error_bound(fmt: str) -> float:
    """Largest round-trip error as a fraction of the block's absmax: half the widest level gap."""
    return float(LEVELS[fmt](torch.float64).diff().max()) / 2


class Quant4:
    """A tensor stored as packed 4-bit codes + per-block float32 absmax scales."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...], fmt: str, block: int):
        self.codes, self.scales, self.shape, self.fmt, self.block = codes, scales, tuple(shape), fmt, block

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    @classmethod
    @torch.no_grad()
    def quantize(cls, w: torch.Tensor, fmt: str = "nf4", block: int = 64) -> "Quant4":
        if fmt not in LEVELS:
            raise ValueError(f"4-bit format {fmt!r}: choose nf4 or int4")
        if block <= 0 or block % 2:
            raise ValueError(f"quantization block {block}: must be a positive even number")
        flat = w.detach().reshape(-1).float()
        pad = (-flat.numel()) % block
        if pad:
            flat = F.pad(flat, (0, pad))
        blocks = flat.view(-1, block)
        scales = blocks.abs().amax(dim=1)
        normed = blocks / torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
        levels = LEVELS[fmt](torch.float32).to(w.device)
        mid = (levels[1:] + levels[:-1]) / 2
        codes = torch.bucketize(normed, mid).to(torch.uint8).view(-1)  # nearest level
        packed = codes[0::2] | (codes[1::2] << 4)
        return cls(packed, scales.contiguous(), tuple(w.shape), fmt, block)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = torch.stack((self.codes & 0x0F, self.codes >> 4), dim=1).view(-1).long()
        levels = LEVELS[self.fmt](dtype).to(self.codes.device)
        values = levels[codes].view(-1, self.block) * self.scales.to(dtype).unsqueeze(1)
        return values.view(-1)[: self.numel].view(self.shape)


class SparseDeltaLinear(torch.nn.Module):
    """y = x W^T + b with W = frozen base (4-bit or dense) + sparse trainable values.

    The sparse values live in a flat vector shared by all such layers of a model (`store`, see
    `scaletrain.zo.model.ZOModel`), this layer's slice being [offset, offset + numel(idx)); `idx`
    are the sorted flat positions of the sensitive coordinates in W."""

    def __init__(self, linear: torch.nn.Linear, idx: torch.Tensor, store, offset: int,
                 fmt: str = "nf4", block: int = 64):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"weight format {fmt!r}: choose one of {FORMATS}")
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.fmt, self.block, self.shape = fmt, block, tuple(w.shape)
        self.register_buffer("idx", idx.to(device=w.device, dtype=torch.long))
        base = w.clone().reshape(-1)
        base[self.idx] = 0  # the sparse part holds these; they do not widen the block's range
        if fmt == "none":
            self.register_buffer("dense", base.view(self.shape))
        else:
            q = Quant4.quantize(base, fmt, block)
            self.register_buffer("codes", q.codes)
            self.register_buffer("scales", q.scales)
        self.bias = linear.bias
        self.store, self.offset = store, offset

    @property
    def values(self) -> torch.Tensor:
        return self.store.values[self.offset:self.offset + self.idx.numel()]

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.fmt == "none":
            return self.dense.to(dtype)
        return Quant4(self.codes, self.scales, self.shape, self.fmt, self.block).dequantize(dtype)

    def weight_now(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The effective weight (base with the sparse values in place), freshly materialized.
        Differentiable with respect to the sparse values (tests compare with autograd)."""
        dtype = dtype or self.store.values.dtype
        base = self.base_weight(dtype).reshape(-1)
        return base.index_copy(0, self.idx, self.values.to(dtype)).view(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_now(x.dtype), self.bias)

    def frozen_bytes(self) -> int:
        bufs = (self.dense,) if self.fmt == "none" else (self.codes, self.scales)
        return sum(b.numel() * b.element_size() for b in bufs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"block={self.block}, sparse={self.idx.numel()}")
