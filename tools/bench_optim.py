"""Optimizer benchmark: state bytes, step time and memory per mode on the same model and data.

    python tools/bench_optim.py --preset llama_60m --modes adamw,block --steps 20 --json out.json

Each mode runs in a fresh process (so peak RSS is that mode's own), one after another, on the same
data and initial weights. Times are medians after warm-up, reported as ratios to AdamW from the same
invocation; steps that ran a selection pass are timed apart. Optimizer-state bytes are exact
(summed over the state tensors).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scaletrain.config import OptimConfig  # noqa: E402
from scaletrain.data import TrainWindowLoader, c4_source, load_tokenizer  # noqa: E402
from scaletrain.dist.engines import SingleEngine  # noqa: E402
from scaletrain.dist.runtime import DistContext  # noqa: E402
from scaletrain.metrics import peak_memory_bytes  # noqa: E402
from scaletrain.models.llama import build_model, count_params  # noqa: E402
from scaletrain.optim import build_optimizer  # noqa: E402
from scaletrain.optim.schedule import build_scheduler  # noqa: E402
from scaletrain.trainer import optimizer_state_bytes, selection_pass  # noqa: E402

MODES = {
    "adamw": {"name": "adamw"},
    "block": {"name": "block"},
}


def run_mode(mode: str, args) -> dict:
    torch.set_num_threads(args.threads)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    tok = load_tokenizer(args.tokenizer)
    model = build_model(args.preset, tok.vocab_size, seed=0)
    cfg = OptimConfig(lr=args.lr, density=args.density, **MODES[mode])
    optimizer, syncs = build_optimizer(cfg, model, max_grad_norm=1.0)
    scheduler = build_scheduler(optimizer, args.steps, 0, 1.0)
    engine = SingleEngine(model, optimizer, scheduler, {"gradient_clipping": 1.0}, ctx, syncs)
    loader = TrainWindowLoader(c4_source("local", None), tok, args.seq_len, args.micro, 1, 0, 1)
    steady, selection, losses = [], [], []
    for step in range(args.steps):
        batches = loader.next_step()
        t0 = time.perf_counter()
        selecting = hasattr(optimizer, "wants_selection") and optimizer.wants_selection(step)
        if selecting:
            selection_pass(engine.module, optimizer, batches, ctx.device)
        losses.append(engine.train_step(batches))
        if hasattr(optimizer, "record_loss"):
            optimizer.record_loss(losses[-1])
        (selection if selecting else steady).append(time.perf_counter() - t0)
    n_params = count_params(model)
    state = optimizer_state_bytes(optimizer)
    return {
        "n_params": n_params,
        "state_bytes": state,
        "state_bytes_per_param": state / n_params,
        "state_bytes_per_rank_max": state,
        "step_time_s": statistics.median(steady[args.warmup:] or steady),
        "selection_step_time_s": statistics.median(selection) if selection else None,
        "peak_mem_bytes": peak_memory_bytes(ctx.device),
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
    }


def _child(mode, args, queue):
    queue.put(run_mode(mode, args))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama_60m")
    p.add_argument("--modes", default="adamw,block")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--tokenizer", default="llama32k", help="llama32k gives the papers' param counts")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; choose from {sorted(MODES)}")
    results = {}
    ctx = mp.get_context("spawn")
    for mode in modes:  # one fresh process per mode: peak RSS is that mode's own
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(mode, args, queue))
        proc.start()
        results[mode] = queue.get()
        proc.join()
    base = results.get("adamw")
    for r in results.values():
        r["step_time_ratio"] = r["step_time_s"] / base["step_time_s"] if base else None
    print(f"{args.preset}, micro-batch {args.micro} x {args.seq_len}, fp32, {args.steps} steps, "
          f"{args.threads} threads")
    print(f"{'mode':<10}{'state B/param':>15}{'step s':>10}{'ratio':>8}{'select s':>10}"
          f"{'peak RSS MiB':>14}{'loss':>9}")
    for mode, r in results.items():
        sel = f"{r['selection_step_time_s']:.3f}" if r["selection_step_time_s"] else "-"
        ratio = f"{r['step_time_ratio']:.3f}" if r["step_time_ratio"] else "-"
        print(f"{mode:<10}{r['state_bytes_per_param']:>15.4f}{r['step_time_s']:>10.3f}{ratio:>8}"
              f"{sel:>10}{r['peak_mem_bytes'] / 2**20:>14.0f}{r['final_loss']:>9.4f}")
    out = {"args": vars(args), "modes": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
