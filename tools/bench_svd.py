"""GaLore's basis refit: torch.linalg.svd against torch.svd_lowrank on real gradients.

    python tools/bench_svd.py --preset llama_60m --rank 128

One backward of the preset on a batch of the shipped C4 sample gives real weight gradients; for
each projected weight (attention and MLP) this times both ways of fitting the rank-r basis
(median of --repeat) and measures its quality as the share of the gradient's squared norm that
the basis captures (the full SVD's share is the best possible). Prints per-shape rows and the
totals over all projected weights, i.e. the cost of one refit of the whole model.
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

from scaletrain.data import TrainWindowLoader, c4_source, load_tokenizer  # noqa: E402
from scaletrain.models.llama import build_model, causal_lm_loss  # noqa: E402
from scaletrain.optim.lowrank import GaLoreProjector  # noqa: E402


def timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama_60m")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tokenizer", default="llama32k")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    model = build_model(args.preset, tok.vocab_size, seed=0)
    batch = TrainWindowLoader(c4_source("local", None), tok, args.seq_len, args.micro, 1, 0, 1).next_step()[0]
    causal_lm_loss(model, batch).backward()
    ways = {w: GaLoreProjector(args.rank, 1.0, w) for w in ("full", "lowrank")}
    by_shape: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not (("attn" in name or "mlp" in name) and ways["full"].applies_to(param.shape)):
            continue
        g = param.grad
        row = by_shape.setdefault(tuple(g.shape), {"count": 0, "time_s": {}, "captured": {}})
        row["count"] += 1
        for way, proj in ways.items():
            t, basis = timed(lambda: proj.fit(g, name, 0), args.repeat)
            captured = (proj.project(g, basis).norm() ** 2 / g.norm() ** 2).item()
            row["time_s"].setdefault(way, []).append(t)
            row["captured"].setdefault(way, []).append(captured)
    print(f"{args.preset}, rank {args.rank}, {torch.get_num_threads()} threads: seconds per refit "
          f"(median of {args.repeat}), share of |G|^2 captured (mean over weights of that shape)")
    print(f"{'shape':>12}{'n':>4}{'full s':>9}{'lowrank s':>11}{'speedup':>9}{'full cap':>10}{'lowrank cap':>13}")
    totals = {"full": 0.0, "lowrank": 0.0}
    summary = {}
    for shape, row in by_shape.items():
        t = {w: statistics.mean(v) for w, v in row["time_s"].items()}
        c = {w: statistics.mean(v) for w, v in row["captured"].items()}
        for w in totals:
            totals[w] += t[w] * row["count"]
        summary["x".join(map(str, shape))] = {"count": row["count"], "time_s": t, "captured": c}
        print(f"{'x'.join(map(str, shape)):>12}{row['count']:>4}{t['full']:>9.4f}{t['lowrank']:>11.4f}"
              f"{t['full'] / t['lowrank']:>9.2f}{c['full']:>10.4f}{c['lowrank']:>13.4f}")
    print(f"whole-model refit: full {totals['full']:.3f} s, lowrank {totals['lowrank']:.3f} s")
    out = {"args": vars(args), "shapes": summary, "whole_model_refit_s": totals}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
