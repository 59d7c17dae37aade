"""8-bit optimizer moments: blockwise dynamic quantization (the scheme of Dettmers et al.,
"8-bit Optimizers via Block-wise Quantization", which bitsandbytes implements), in pure torch.

A moment tensor is cut into chunks of CHUNK values; each chunk is divided by its absolute maximum
(kept in fp32) and every value is replaced by the index of the nearest entry of a 256-entry
codebook. A matrix is chunked row by row (each row's last chunk may be short; absmax has shape
[rows, chunks per row]), so any run of rows is quantized exactly as inside the whole matrix: an
FSDP2 rank keeps its rows of an 8-bit state, and a checkpoint of row pieces reshards by rows. A
1-D tensor (and a state saved before row chunking, with a 1-D absmax) is chunked flat.

The codebook is "dynamic": it spends its entries evenly over decades (1e-6..1), so small values
keep their relative precision, which a linear int8 grid would round to zero. That matters for
Adam's second moment: a zeroed v turns the update into m / eps.

Storage: 1 byte per value + 4 bytes per chunk (1.016 B/value where rows are multiples of 256).

Kernels: on CUDA tensors, bitsandbytes' blockwise quantization kernels (`quantize_blockwise`,
`dequantize_blockwise`) with this module's codebooks, when bitsandbytes is installed; elsewhere the
pure-torch code below. Both give the same codes (tests/optim/test_cuda.py), so a state saved by
one resumes with the other. bitsandbytes' CPU kernel is not used: it does not round to the nearest
entry near zero (bitsandbytes 0.50: an exact 0 comes back as 2e-5 of the chunk's absmax), which
would move embedding rows whose moments are zero (tests/optim/test_quant8.py shows the defect).
"""
from __future__ import annotations

import functools
import math

import torch

CHUNK = 256          # values per absmax scale (bitsandbytes' blockwise optimizers use 256 too)
MIN_NUMEL = 4096     # smaller moments stay fp32, as bitsandbytes' min_8bit_size


@functools.lru_cache(maxsize=None)
def dynamic_codebook(signed: bool) -> torch.Tensor:
    """Sorted values in [-1, 1] (signed) or [0, 1]: per decade 10^(k-6)..10^(k-5), 2^k (signed,
    k = 1..6, each sign) or 2^(k+1) (unsigned, k = 0..6) evenly spaced points, so larger values
    get finer steps; plus 0 and +-1 (each chunk's absmax is exact). Signed: 2 * 126 + 3 = 255
    distinct entries and 1.0 once more; unsigned: 254 + 2 = 256."""
    values = [0.0, 1.0] + ([-1.0] if signed else [])
    for k in range(1 if signed else 0, 7):
        n = 2 ** k if signed else 2 ** (k + 1)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - 6)).tolist()
        values += mids + ([-v for v in mids] if signed else [])
    if signed:
        values.append(1.0)  # 256 entries, as bitsandbytes' kernels search: a second 1.0 at the end,
        # after every index in use, so codes written before it existed decode the same
    book = torch.tensor(sorted(values), dtype=torch.float32)
    assert book.numel() == 256
    return book


@functools.lru_cache(maxsize=None)
def _midpoints(signed: bool) -> torch.Tensor:
    book = dynamic_codebook(signed)
    return (book[1:] + book[:-1]) / 2


# The nearest entry by table lookup instead of a binary search (torch.bucketize; speeds in the
# README, from tools/bench_quant8.py): the top 32 - _KEY_SHIFT bits of a float32 (sign, exponent,
# 9 mantissa bits) name a bucket narrower (2^-9 relative) than any gap between neighbouring
# midpoints (>= 0.7% relative), so a bucket holds at most one midpoint: the code of its smallest
# value, plus one above that midpoint.
_KEY_SHIFT = 14


@functools.lru_cache(maxsize=None)
def _lookup(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per bucket: (the code of its smallest value as uint8, the midpoint above that code, +inf
    above the last)."""
    mids = _midpoints(signed)
    low_bits = torch.arange(1 << (32 - _KEY_SHIFT), dtype=torch.int64) << _KEY_SHIFT
    negative = low_bits >= 1 << 31  # sign bit set: the smallest value has the largest magnitude
    low_bits = torch.where(negative, low_bits | ((1 << _KEY_SHIFT) - 1), low_bits)
    smallest = (low_bits - (negative.long() << 32)).to(torch.int32).view(torch.float32)
    codes = torch.bucketize(smallest, mids)
    above = torch.cat([mids, torch.tensor([math.inf])])[codes]
    return codes.to(torch.uint8).to(device), above.to(device)


def nearest_codes(normed: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 index of the nearest codebook entry for values in [-1, 1] (ties to the lower entry):
    torch.bucketize(normed, midpoints), by table lookup (int32 keys through index_select)."""
    codes, above = _lookup(signed, normed.device)
    flat = normed.contiguous().view(-1)
    key = (flat.view(torch.int32) >> _KEY_SHIFT).bitwise_and_((1 << (32 - _KEY_SHIFT)) - 1)
    out = torch.index_select(codes, 0, key)
    out += flat > torch.index_select(above, 0, key)
    return out.view(normed.shape)


@functools.lru_cache(maxsize=None)
def _bitsandbytes():
    """bitsandbytes.functional where it is installed and has a CUDA build, else None."""
    try:
        import bitsandbytes.functional as bnb_functional
    except Exception:  # not installed, or no usable binary for this machine
        return None
    return bnb_functional


def uses_bitsandbytes(device: torch.device) -> bool:
    return device.type == "cuda" and _bitsandbytes() is not None


def _row_layout(shape) -> tuple[int, int]:
    """(rows, values per row) of the chunking: a matrix row by row (trailing dims flattened), a
    1-D tensor as one row."""
    shape = tuple(shape)
    return (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))


def _chunks(t: torch.Tensor) -> torch.Tensor:
    """t as [chunks, CHUNK] (a copy only where padding is needed), same dtype: each row (see
    _row_layout) zero-padded to whole chunks."""
    rows, per_row = _row_layout(t.shape)
    x = t.detach().reshape(rows, per_row)
    pad = -per_row % CHUNK
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(-1, CHUNK)


def _unchunk(chunked: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of _chunks: drop the padding, restore the shape."""
    rows, per_row = _row_layout(shape)
    return chunked.reshape(rows, per_row + -per_row % CHUNK)[:, :per_row].reshape(shape)


def absmax_shape(shape) -> tuple[int, ...]:
    """The absmax of a quantized tensor of `shape`: [rows, chunks per row] for a matrix, else [chunks]."""
    rows, per_row = _row_layout(shape)
    chunks = math.ceil(per_row / CHUNK)
    return (rows, chunks) if len(tuple(shape)) >= 2 else (chunks,)


def quantize(t: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 shaped like t, absmax fp32 shaped absmax_shape(t.shape)); bitsandbytes'
    kernel on CUDA where installed, else quantize_torch."""
    if not uses_bitsandbytes(t.device):
        return quantize_torch(t, signed)
    codes, qstate = _bitsandbytes().quantize_blockwise(
        _chunks(t.float()).reshape(-1), code=dynamic_codebook(signed).to(t.device), blocksize=CHUNK)
    return _unchunk(codes.view(-1, CHUNK), t.shape).contiguous(), qstate.absmax.float().view(absmax_shape(t.shape))


def quantize_torch(t: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize() in pure torch, on any device."""
    chunked = _chunks(t.float())
    # max |x| per chunk; a second moment (unsigned) has no negative values to take |x| of
    absmax = chunked.abs().amax(dim=1) if signed else chunked.amax(dim=1)
    codes = nearest_codes(chunked / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1), signed)
    return _unchunk(codes, t.shape).contiguous(), absmax.view(absmax_shape(t.shape))


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 values shaped like codes; bitsandbytes' kernel on CUDA where installed, else
    dequantize_torch. A 1-D absmax (a 1-D tensor, or a state saved before row chunking) means
    flat chunks."""
    if not uses_bitsandbytes(codes.device):
        return dequantize_torch(codes, absmax, signed)
    shape = codes.shape if absmax.dim() > 1 else (codes.numel(),)
    values = _bitsandbytes().dequantize_blockwise(_chunks(codes.reshape(shape)).reshape(-1),
                                                  absmax=absmax.reshape(-1), blocksize=CHUNK,
                                                  code=dynamic_codebook(signed).to(codes.device))
    return _unchunk(values.view(-1, CHUNK), shape).view(codes.shape)


def dequantize_torch(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """dequantize() in pure torch, on any device."""
    shape = codes.shape if absmax.dim() > 1 else (codes.numel(),)
    book = dynamic_codebook(signed).to(codes.device)
    index = _chunks(codes.reshape(shape)).reshape(-1).to(torch.int32)
    values = torch.index_select(book, 0, index).view(-1, CHUNK).mul_(absmax.reshape(-1, 1))
    return _unchunk(values, shape).view(codes.shape)


def quantized(numel: int) -> bool:
    return numel >= MIN_NUMEL


def n_chunks(numel: int) -> int:
    return math.ceil(numel / CHUNK)
