"""Optimizer benchmark: state bytes, step time, wire bytes and memory per mode, same model and data.

    python tools/bench_optim.py --preset llama_60m --modes adamw,block --steps 20 --json out.json
    python tools/bench_optim.py --preset llama_60m --modes adamw,zero1,zero2,block --nproc 1,2,4

Each mode runs on `--nproc` fresh gloo ranks (so peak RSS is that mode's own), one mode after
another, on the same global batch and initial weights. adamw/zero1/zero2 are torch AdamW inside
DeepSpeed at ZeRO stage 0/1/2 (plain PyTorch at one rank for adamw); block is the block optimizer
(owner-sharded state); block_galore(_8bit), block_gradnorm_lorp add low-rank states (and 8-bit
moments) inside the selected blocks; galore and gradnorm_lorp are the dense modes (every block);
galore_torch is galore-torch's GaLoreAdamW, the external reference. The step is the trainer's
(scaletrain.loop). Times are medians after warm-up, as ratios to adamw from the same invocation;
steps that ran a selection pass or a GaLore basis refit (SVD) are timed apart. Optimizer-state
bytes are exact (summed over state tensors), per rank. wire_bytes_ratio compares the optimizer's counted bytes per
step with a DDP all-reduce of all gradients (2 (W-1)/W x 4 bytes x parameters per rank); DeepSpeed's
own collectives are not counted (None).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scaletrain.config import OptimConfig  # noqa: E402
from scaletrain.config_parse import coerce, field_type  # noqa: E402
from scaletrain.data import TrainWindowLoader, c4_source, load_tokenizer  # noqa: E402
from scaletrain.distributed.engines import DeepSpeedEngine, SingleEngine  # noqa: E402
from scaletrain.distributed.runtime import DistContext, all_reduce_max, all_reduce_sum  # noqa: E402
from scaletrain.metrics import peak_memory_bytes  # noqa: E402
from scaletrain.optim.selecting import SelectsBlocks  # noqa: E402
from tools.local_ranks import run_ranks  # noqa: E402
from tools.modes import MODES as TRAINER_MODES  # noqa: E402  (the one table of modes)
from tools.modes import optim_overrides  # noqa: E402
from scaletrain.models.llama import build_model, count_params  # noqa: E402
from scaletrain.optim import build_optimizer  # noqa: E402
from scaletrain.optim.schedule import build_scheduler  # noqa: E402
from scaletrain.loop import Step, StepOut, run  # noqa: E402
from scaletrain.trainer import optimizer_state_bytes  # noqa: E402

# bench_optim's own: the ZeRO stage DeepSpeed runs each mode at (2, the block optimizer's owner
# layout, unless named: galore-torch needs whole weights) and zero1/zero2, AdamW at stages 1 and 2.
ZERO_STAGE = {"adamw": 0, "zero1": 1, "zero2": 2, "galore_torch": 0}
SAME_OPTIMIZER_AS = {"zero1": "adamw", "zero2": "adamw"}


def _optim_kwargs(mode: str) -> dict | None:
    """OptimConfig keyword arguments of a tools.modes mode, typed as the trainer types them from the
    command line; None for a mode that is more than an optimizer (e.g. model.compile)."""
    overrides = optim_overrides(mode)
    if overrides is None:
        return None
    return {key: coerce(f"optim.{key}", value, field_type(OptimConfig, key)) for key, value in overrides.items()}


MODES = {  # mode -> (OptimConfig keyword arguments, ZeRO stage)
    mode: (_optim_kwargs(SAME_OPTIMIZER_AS.get(mode, mode)), ZERO_STAGE.get(mode, 2))
    for mode in [*TRAINER_MODES, *SAME_OPTIMIZER_AS] if _optim_kwargs(SAME_OPTIMIZER_AS.get(mode, mode)) is not None
}


def refits(optimizer) -> int:
    """GaLore basis refits so far (our rules count them; galore-torch refits at step 0, 200...)."""
    rule = getattr(optimizer, "rule", None)
    return getattr(rule, "refits", 0)


def run_mode(mode: str, args) -> dict:
    """One mode on this rank (a process of `run_ranks`); returns this rank's figures."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, args.threads // world))
    ctx = DistContext(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    tok = load_tokenizer(args.tokenizer)
    model = build_model(args.preset, tok.vocab_size, seed=0)
    optim_cfg, stage = MODES[mode]
    if args.block_stage is not None and mode not in ZERO_STAGE:  # a mode whose optimizer shards itself
        stage = args.block_stage
    cfg = OptimConfig(lr=args.lr, density=args.density, rank=args.rank, svd=args.svd, **optim_cfg)
    optimizer, syncs = build_optimizer(cfg, model, max_grad_norm=1.0)
    scheduler = build_scheduler(optimizer, args.steps, 0, 1.0)
    ds = {"train_micro_batch_size_per_gpu": args.micro // world, "gradient_accumulation_steps": 1,
          "gradient_clipping": 1.0, "bf16": {"enabled": False}, "zero_optimization": {"stage": stage},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    use_ds = world > 1 or (stage > 0 and not syncs)  # one rank: the block modes need no engine
    engine = (DeepSpeedEngine if use_ds else SingleEngine)(model, optimizer, scheduler, ds, ctx, syncs)
    loader = TrainWindowLoader(c4_source("local", None), tok, args.seq_len, args.micro // world, 1, rank, world)
    steady, selection, svd, losses = [], [], [], []
    refits_so_far = [refits(optimizer)]

    def timed(out: StepOut) -> None:  # whole steps (loading the batch included), by kind
        losses.append(out.loss)
        refitted = refits(optimizer) > refits_so_far[-1] or (mode == "galore_torch" and (out.step - 1) % 200 == 0)
        refits_so_far.append(refits(optimizer))
        (selection if out.selected else svd if refitted else steady).append(out.seconds)

    run(Step(engine, optimizer, ctx), loader.next_step, 0, args.steps, [timed], barrier=True)
    n_params = count_params(model)
    state = optimizer_state_bytes(engine.optimizer if stage else optimizer)
    wire = optimizer.stats()["wire_bytes"] if isinstance(optimizer, SelectsBlocks) else None
    ddp_bytes = 2 * (world - 1) / world * 4 * n_params
    return {
        "n_params": n_params,
        "state_bytes_per_rank_max": all_reduce_max(state, ctx),
        "state_bytes_total": all_reduce_sum([state], ctx)[0],
        "state_bytes_per_param": all_reduce_sum([state], ctx)[0] / n_params,
        "step_time_s": statistics.median(steady[args.warmup:] or steady),
        "selection_step_time_s": statistics.median(selection) if selection else None,
        "svd_step_time_s": statistics.median(svd) if svd else None,
        "wire_bytes": None if wire is None else all_reduce_max(wire, ctx),
        "wire_bytes_ratio": None if wire is None or world == 1 else all_reduce_max(wire, ctx) / ddp_bytes,
        "peak_mem_bytes": all_reduce_max(peak_memory_bytes(ctx.device), ctx),
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama_60m")
    p.add_argument("--modes", default="adamw,block")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro", type=int, default=4, help="global micro-batch, split over --nproc ranks")
    p.add_argument("--nproc", default="1", help="ranks, or a list (1,2,4): each mode at each size")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--rank", type=int, default=128, help="projection rank of the galore modes")
    p.add_argument("--svd", choices=("full", "lowrank"), default=OptimConfig.svd,
                   help="our projected modes' SVD; 'full' is the one galore-torch's GaLoreAdamW uses")
    p.add_argument("--block_stage", type=int, choices=(0, 1, 2), default=None,
                   help="ZeRO stage of the block and dense projected modes (default 2: owner-sharded "
                        "state; 0: ds_configs/default.json's, every rank holds every state)")
    p.add_argument("--tokenizer", default="llama32k", help="llama32k gives the papers' param counts")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; choose from {sorted(MODES)}")
    sizes = [int(n) for n in str(args.nproc).split(",")]
    if any(args.micro % n for n in sizes):
        p.error("--micro (the global micro-batch) must be divisible by every --nproc")
    results = {}
    for world in sizes:
        at = {mode: run_ranks(run_mode, world, mode, args)[0] for mode in modes}
        base = at.get("adamw")
        for mode, r in at.items():
            r["nproc"] = world
            r["step_time_ratio"] = r["step_time_s"] / base["step_time_s"] if base else None
            results[mode if len(sizes) == 1 else f"{mode}@{world}"] = r
    print(f"{args.preset}, global micro-batch {args.micro} x {args.seq_len}, fp32, {args.nproc} rank(s), "
          f"{args.steps} steps, {args.threads} threads; ratios to adamw at the same rank count")
    print(f"{'mode':<22}{'state B/param':>14}{'max/rank MiB':>13}{'step s':>8}{'ratio':>7}{'select s':>9}"
          f"{'svd s':>7}{'wire/DDP':>9}{'peak RSS MiB':>13}{'loss':>8}")
    for mode, r in results.items():
        sel = f"{r['selection_step_time_s']:.3f}" if r["selection_step_time_s"] else "-"
        svd = f"{r['svd_step_time_s']:.3f}" if r["svd_step_time_s"] else "-"
        ratio = f"{r['step_time_ratio']:.3f}" if r["step_time_ratio"] else "-"
        wire = f"{r['wire_bytes_ratio']:.4f}" if r["wire_bytes_ratio"] is not None else "-"
        print(f"{mode:<22}{r['state_bytes_per_param']:>14.4f}{r['state_bytes_per_rank_max'] / 2**20:>13.1f}"
              f"{r['step_time_s']:>8.3f}{ratio:>7}{sel:>9}{svd:>7}{wire:>9}{r['peak_mem_bytes'] / 2**20:>13.0f}"
              f"{r['final_loss']:>8.4f}")
    out = {"args": vars(args), "modes": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
