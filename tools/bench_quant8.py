"""8-bit moment codec speed: quantize + dequantize of one moment tensor, per kernel.

    python tools/bench_quant8.py [--numel 33554432] [--device cpu|cuda] [--repeat 10]

Rows: the nearest-code search alone, by torch.bucketize (the binary search the lookup replaced)
and by the table lookup (quant8.nearest_codes), on the same normalised values; the whole pure-torch
quantize and dequantize (what CPU runs use); and, on CUDA with
bitsandbytes installed, bitsandbytes' blockwise kernels (what GPU runs use). Values are |N(0, 1)|
times 1e-3, an Adam second moment's kind; the median of --repeat timed calls after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scaletrain.optim import quant8  # noqa: E402


def timed(fn, repeat: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=32 * 2**20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    x = torch.randn(args.numel - args.numel % quant8.CHUNK, device=device).abs() * 1e-3
    codes, absmax = quant8.quantize_torch(x, False)
    chunks = x.view(-1, quant8.CHUNK)
    normed = chunks / chunks.abs().amax(dim=1, keepdim=True)
    mids = quant8._midpoints(False).to(device)
    rows = {
        "nearest code: bucketize": timed(lambda: torch.bucketize(normed, mids), args.repeat, device),
        "nearest code: table lookup": timed(lambda: quant8.nearest_codes(normed, False), args.repeat, device),
        "torch: quantize": timed(lambda: quant8.quantize_torch(x, False), args.repeat, device),
        "torch: dequantize": timed(lambda: quant8.dequantize_torch(codes, absmax, False), args.repeat, device),
    }
    if quant8.uses_bitsandbytes(device):
        rows["bitsandbytes: quantize"] = timed(lambda: quant8.quantize(x, False), args.repeat, device)
        rows["bitsandbytes: dequantize"] = timed(lambda: quant8.dequantize(codes, absmax, False), args.repeat, device)
    print(f"{args.numel:,} values on {device} ({torch.get_num_threads()} CPU threads), median of {args.repeat}")
    for name, s in rows.items():
        print(f"  {name:<28}{s * 1e3:9.2f} ms  {args.numel / s / 1e9:7.2f} G values/s")
    out = {"numel": args.numel, "device": str(device), "threads": torch.get_num_threads(), "seconds": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
