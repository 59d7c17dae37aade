"""Checkpoint save and load: time and peak extra memory per rank, at 1, 2 and 4 ranks.

    python tools/bench_checkpoint.py                       # llama_60m, AdamW (ZeRO-2) and block, W = 1 2 4
    python tools/bench_checkpoint.py --ranks 1 2 --optims block --preset llama_9m

Each world size starts W gloo ranks in-process (tools/local_ranks.py). Every rank builds the
model under the DeepSpeed engine (ZeRO stage 2: dense AdamW's state partitioned by DeepSpeed;
the block optimizer's per-block state on its owner), trains one step so the optimizer state
exists, then saves a checkpoint (scaletrain.checkpoint.save_checkpoint, as the trainer does) and
loads it back into the same engine (as `--resume` does). "Peak extra" is the largest resident
set size (RSS, sampled every 2 ms from /proc/self/statm) during the save or load minus the RSS
just before it: the memory the checkpoint itself costs that rank. "Read at load" is the bytes
the rank's read() calls returned during the load (/proc/self/io's rchar): the weights, which every
rank holds whole at ZeRO <= 2, plus the optimizer state it reads. Times are wall-clock.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.bench_zo import RSSPeak  # noqa: E402
from tools.local_ranks import run_ranks  # noqa: E402

MiB = 2 ** 20
SEQ = 64


def _engine(preset: str, optim: str, world: int, tokenizer: str):
    import torch

    from scaletrain.config import OptimConfig
    from scaletrain.data import load_tokenizer
    from scaletrain.distributed.engines import build_engine
    from scaletrain.distributed.runtime import DistContext
    from scaletrain.models.llama import build_model
    from scaletrain.optim import build_optimizer
    from scaletrain.optim.schedule import build_scheduler

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    vocab = load_tokenizer(tokenizer).vocab_size
    model = build_model(preset, vocab, seed=0)
    cfg = OptimConfig(name=optim, density=0.25, reselect_every=0)
    optimizer, syncs = build_optimizer(cfg, model, 1.0)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "bf16": {"enabled": False}, "zero_optimization": {"stage": 2},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    scheduler = build_scheduler(optimizer, 10, 0, 0.1)
    return build_engine("deepspeed", model, optimizer, scheduler, ds, ctx, syncs), optimizer, ctx, vocab


def _train_one_step(engine, optimizer, ctx, vocab: int) -> None:
    import torch

    from scaletrain.loop import Step

    batches = [torch.randint(0, vocab, (1, SEQ + 1), generator=torch.Generator().manual_seed(ctx.rank))]
    Step(engine, optimizer, ctx)(0, batches)  # the trainer's step (a selection pass first, if wanted)


def _bytes_read() -> int:
    """Bytes this process has read through read() calls so far (/proc/self/io's rchar)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _measure(fn):
    gc.collect()
    with RSSPeak() as peak:
        before = peak.now()
        read_before = _bytes_read()
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        read = _bytes_read() - read_before
    return seconds, max(0, peak.peak - before), read


def bench_rank(preset: str, optim: str, world: int, tokenizer: str, root: str) -> dict:
    """On one rank: save then load a checkpoint; its times, peak extra RSS and bytes written."""
    from scaletrain import checkpoint as ckpt
    from scaletrain.trainer import optimizer_shard

    engine, optimizer, ctx, vocab = _engine(preset, optim, world, tokenizer)
    _train_one_step(engine, optimizer, ctx, vocab)

    def save():
        tensors, meta = optimizer_shard(engine, optimizer)
        ckpt.save_checkpoint(Path(root), 1, rank=ctx.rank, world_size=world,
                             sharded={**ckpt.model_shard(engine.module), **tensors},
                             trainer_state={"step": 1, "optim": meta}, config_text="", ds_config={},
                             keep_latest=1)

    def load():
        path = Path(root) / "step_00000001"
        meta = ckpt.load_trainer_state(path)["optim"]
        saved = ckpt.SavedState(path)
        ckpt.restore_model(engine.module, saved)
        if engine.zero_partitions_state:
            engine.load_optimizer_states(*ckpt.dense_optimizer_fragments(
                engine.module, saved, meta, engine.optimizer_state_ranges()))
        else:
            ckpt.restore_optimizer(optimizer, engine.module, saved, meta)

    save_s, save_extra, _ = _measure(save)
    manifest = json.loads((Path(root) / "step_00000001" / "manifest.json").read_text())
    mine = sum(v["bytes"] for f, v in manifest["files"].items() if f.startswith(f"dcp/__{ctx.rank}_"))
    load_s, load_extra, load_read = _measure(load)
    return {"save_s": save_s, "save_extra": save_extra, "load_s": load_s, "load_extra": load_extra,
            "load_read": load_read,
            "written": mine, "total": sum(v["bytes"] for v in manifest["files"].values())}


LABEL = {"adamw": "AdamW, DeepSpeed ZeRO-2", "block": "block (density 0.25), owner-sharded"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama_60m")
    p.add_argument("--tokenizer", default="llama32k", help="its vocabulary sizes embedding and head")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--optims", nargs="+", default=["adamw", "block"], choices=sorted(LABEL))
    args = p.parse_args(argv)
    print(f"{args.preset} ({args.tokenizer}), CPU, gloo ranks on one machine; per-rank columns: "
          f"the largest over the ranks\n")
    print("| optimizer | ranks | checkpoint MiB | written by each rank MiB (max) | save s | "
          "save peak extra RSS MiB | load s | load peak extra RSS MiB | read by each rank at load MiB (max) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for optim in args.optims:
        for world in args.ranks:
            with tempfile.TemporaryDirectory() as root:
                rows = run_ranks(bench_rank, world, args.preset, optim, world, args.tokenizer, root,
                                 timeout=1800)
            worst = {k: max(r[k] for r in rows) for k in rows[0]}
            print(f"| {LABEL[optim]} | {world} | {worst['total'] / MiB:.0f} | {worst['written'] / MiB:.0f} | "
                  f"{worst['save_s']:.2f} | {worst['save_extra'] / MiB:.0f} | {worst['load_s']:.2f} | "
                  f"{worst['load_extra'] / MiB:.0f} | {worst['load_read'] / MiB:.0f} |", flush=True)


if __name__ == "__main__":
    main()
