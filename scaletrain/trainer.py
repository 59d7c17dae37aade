"""Pretraining. `launch/pretrain.py` calls `main()`; `train()` builds the run and hands it to the
loop (scaletrain.loop: the step; its hooks here: metrics, eval, checkpoints, heatmap)."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from scaletrain import checkpoint as ckpt
from scaletrain.config import (ConfigError, RunConfig, given_keys, help_text, load_config, load_ds_config,
                               resumed_config, to_dict)
from scaletrain.data import CorruptShardError, DataPathError, load_tokenizer
from scaletrain.data.pipeline import train_loader, validation_batches
from scaletrain.distributed.engines import build_engine, check_zero_stage, resolve_precision, shard_model
from scaletrain.distributed.runtime import (DistContext, all_reduce_max, all_reduce_sum, init_distributed,
                                            resolve_backend)
from scaletrain.loop import Progress, RankLostError, Step, StepOut, closing_run, due, run
from scaletrain.metrics import (MetricsWriter, ProgressBar, peak_flops, peak_memory_bytes, selection_heatmap,
                                train_flops_per_token)
from scaletrain.models.llama import build_model, causal_lm_loss, compile_layers, count_params
from scaletrain.nonfinite import NonFiniteError, local_shard, nan_grad_steps
from scaletrain.optim import build_optimizer
from scaletrain.optim.schedule import build_scheduler
from scaletrain.optim.selecting import SelectsBlocks
from scaletrain.run_dir import agree_on_run_dir, choose_run_dir, setup_logging

log = logging.getLogger("scaletrain")
HEATMAP_EVERY_SELECTIONS = 10


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return
    try:
        cfg = load_config(argv)
        run_dir = choose_run_dir(cfg.run_dir, cfg.resume)
    except ConfigError as e:  # before any process group starts or anything is written
        print(f"scaletrain: config error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        train(cfg, run_dir, given_keys(argv))
    except ConfigError as e:  # found at resume: a key that cannot change, or a bad ds_config there
        print(f"scaletrain: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except (ckpt.CheckpointError, DataPathError, CorruptShardError, FileNotFoundError, NonFiniteError,
            RankLostError) as e:
        print(f"scaletrain: error: {e}", file=sys.stderr)
        sys.exit(1)


def evaluate(module, batches: list[torch.Tensor], ctx: DistContext) -> float:
    """Mean held-out loss over the validation windows of all ranks (token-weighted).

    Every rank runs the same number of forwards (a sharded model gathers its weights
    collectively); a rank short of windows runs uncounted ones on a copy of its last window or zeros."""
    module.eval()
    loss_sum, count = 0.0, 0.0
    rounds = int(all_reduce_max(len(batches), ctx))
    filler = batches[-1][:1] if batches else torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        for i in range(rounds):
            mb = batches[i] if i < len(batches) else filler
            loss = causal_lm_loss(module, mb.to(ctx.device)).item()
            if i < len(batches):
                loss_sum += loss * mb.shape[0]
                count += mb.shape[0]
    module.train()
    loss_sum, count = all_reduce_sum([loss_sum, count], ctx)
    return loss_sum / max(count, 1.0)


def optimizer_state_bytes(optimizer) -> int:
    """Exact bytes of optimizer-state tensors held by this rank."""
    if isinstance(optimizer, SelectsBlocks):
        return int(optimizer.stats()["optim_state_bytes"])
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO wraps the client optimizer
    return sum(t.numel() * t.element_size() for s in inner.state.values()
               for t in s.values() if torch.is_tensor(t))


def find_resume_checkpoint(cfg, run_dir, ctx) -> Path | None:
    """The checkpoint that `--resume` names, or None to start afresh (collective: the ranks share
    the checksum work; rank 0 lists the candidates)."""
    path = ckpt.find_checkpoint(cfg.resume, run_dir, ctx.rank, ctx.world_size)
    if path is None and cfg.resume == "auto":
        log.info("--resume auto: no checkpoint under %s, starting afresh", run_dir)
    return path


def config_for_resume(cfg: RunConfig, path: Path, given: set[str] | None) -> RunConfig:
    """The checkpoint's config, with the keys given now (None: all of them) winning; logs each
    change. ConfigError if one that cannot change (model preset, tokenizer, seq_len) differs."""
    saved = yaml.safe_load((path / "config.yaml").read_text())
    cfg, changed = resumed_config(saved, cfg, given)
    if changed:
        log.info("resume: changed since %s: %s", path.name,
                 ", ".join(f"{k} {was!r} -> {now!r}" for k, (was, now) in changed.items()))
    return cfg


def restore_schedule(scheduler, optimizer, saved: dict) -> None:
    """The LR schedule at the saved position, shaped by this run's config (peak optim.lr, steps,
    warm-up, min_lr_ratio: values changed on resume take effect at the first resumed step)."""
    scheduler.last_epoch = saved["last_epoch"]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)


def resume(path: Path | None, ctx, engine, optimizer, scheduler, loader) -> int:
    """Load the checkpoint at `path` (None: start afresh); returns the step to start at."""
    if path is None:
        return 0
    t0 = time.perf_counter()
    state = ckpt.load_trainer_state(path)
    saved = ckpt.SavedState(path)
    ckpt.restore_model(engine.module, saved)
    if engine.zero_partitions_state:  # DeepSpeed ZeRO-1/2 AdamW: each rank sets its fragments
        engine.load_optimizer_states(*ckpt.dense_optimizer_fragments(
            engine.module, saved, state["optim"], engine.optimizer_state_ranges()))
    else:
        ckpt.restore_optimizer(optimizer, engine.module, saved, state["optim"])
    restore_schedule(scheduler, optimizer, state["scheduler"])
    loader.load_state_dict(state["loader"])
    ckpt.load_rng_state(path, ctx.rank)
    log.info("resumed from %s at step %d (loaded in %.2fs)", path, state["step"], time.perf_counter() - t0)
    return state["step"]


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    states = optimizer.block_state.values() if hasattr(optimizer, "block_state") else optimizer.state.values()
    return [t for st in states for t in st.values() if torch.is_tensor(t)]


def state_is_finite(module, optimizer, ctx: DistContext) -> bool:
    """Collective: True on every rank iff every rank's weights and optimizer state are finite."""
    tensors = list(module.parameters()) + _optimizer_tensors(optimizer)
    bad = any(not bool(torch.isfinite(local_shard(t)).all()) for t in tensors if t.is_floating_point())
    return all_reduce_max(float(bad), ctx) == 0.0


def save(cfg, run_dir, step, ctx, engine, optimizer, scheduler, loader, ds_config, saver) -> None:
    """Checkpoint now (saver is None) or hand a copy to the background saver; never a state with
    a non-finite weight or moment (`latest` keeps pointing to the last finite one)."""
    if not state_is_finite(engine.module, optimizer, ctx):
        log.error("step %d: weights or optimizer state not finite on some rank: checkpoint not "
                  "written (latest stays the previous one)", step)
        return
    write = saver.save if saver is not None else ckpt.save_checkpoint
    optim_tensors, optim_meta = optimizer_shard(engine, optimizer)
    write(
        run_dir / "checkpoints", step, rank=ctx.rank, world_size=ctx.world_size,
        sharded={**ckpt.model_shard(engine.module), **optim_tensors},
        trainer_state={"step": step, "world_size": ctx.world_size, "optim": optim_meta,
                       "scheduler": scheduler.state_dict(), "loader": loader.state_dict()},
        config_text=yaml.safe_dump(to_dict(cfg), sort_keys=False), ds_config=ds_config,
        keep_latest=cfg.checkpoint.keep_latest)


def optimizer_shard(engine, optimizer) -> tuple[dict, dict]:
    """(this rank's optimizer tensors for the checkpoint, global optimizer metadata)."""
    if engine.zero_partitions_state:  # from ZeRO's partitions: each rank writes its own elements
        return engine.optimizer_shard()
    return ckpt.optimizer_shard(optimizer, engine.module)


def train(cfg: RunConfig, run_dir: Path | None, given: set[str] | None = None) -> None:
    """given: the config keys set explicitly (None: all); on resume the rest come from the checkpoint.
    However the run ends, metrics, the background saver and the process group are closed; a
    collective that fails because another rank is gone raises RankLostError naming the step."""
    backend = resolve_backend(cfg.backend)
    ctx = init_distributed(backend, cfg.collective_timeout_s)
    progress = Progress()
    with closing_run(ctx, progress) as closing:
        _train(cfg, run_dir, given, backend, ctx, closing, progress)


def _train(cfg: RunConfig, run_dir: Path | None, given: set[str] | None, backend: str, ctx: DistContext,
           closing: contextlib.ExitStack, progress: Progress) -> None:
    run_dir = agree_on_run_dir(cfg.name, run_dir, ctx)
    setup_logging(run_dir, ctx)
    resume_from = find_resume_checkpoint(cfg, run_dir, ctx)
    if resume_from is not None:
        cfg = config_for_resume(cfg, resume_from, given)
    ds_config = resolve_precision(load_ds_config(cfg.deepspeed_config))
    check_zero_stage(ds_config, backend)
    random.seed(cfg.seed + ctx.rank)  # python/numpy RNGs are per rank; torch's seeds the model (same everywhere)
    np.random.seed(cfg.seed + ctx.rank)
    if ctx.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))

    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config.get("gradient_accumulation_steps", 1)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg.model.preset, tokenizer.vocab_size, seed=cfg.seed,
                        activation_checkpointing=cfg.model.activation_checkpointing, device=ctx.device)
    n_params = count_params(model)
    if cfg.model.compile:
        compile_layers(model)
    if backend == "fsdp":
        model = shard_model(model, ds_config, ctx)  # before the optimizer sees the parameters
    optimizer, syncs_grads = build_optimizer(cfg.optim, model, float(ds_config.get("gradient_clipping", 0.0)))
    scheduler = build_scheduler(optimizer, cfg.train.steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio)
    engine = build_engine(backend, model, optimizer, scheduler, ds_config, ctx, syncs_grads)

    loader = train_loader(cfg.data, tokenizer, micro, accum, ctx.rank, ctx.world_size, ctx.device)
    val_batches = validation_batches(cfg.data, tokenizer, cfg.train.eval_windows, ctx.rank,
                                     ctx.world_size, micro)
    tokens_per_step = micro * accum * ctx.world_size * cfg.data.seq_len
    log.info("run %s | backend %s | world %d | %s %.2fM params | %s | %d tokens/step | %s",
             run_dir, backend, ctx.world_size, cfg.model.preset, n_params / 1e6, cfg.optim.name,
             tokens_per_step, "bf16" if ds_config["bf16"].get("enabled") else "fp32")

    start = resume(resume_from, ctx, engine, optimizer, scheduler, loader)
    saver = ckpt.AsyncCheckpointer(ctx.world_size, cfg.collective_timeout_s) if cfg.checkpoint.async_save else None
    if saver is not None:
        closing.callback(saver.close)
    metrics = closing.enter_context(contextlib.closing(MetricsWriter(run_dir, ctx.is_main)))
    bar = closing.enter_context(contextlib.closing(ProgressBar(cfg.train.steps, start, ctx.is_main)))
    if ctx.device.type == "cuda":  # peak_mem_bytes: training's peak, not the fp32 init before the bf16 cast
        torch.cuda.reset_peak_memory_stats(ctx.device)
    step_times: list[float] = []
    data_waits: list[float] = []
    heatmap_at = 0
    row: dict = {}

    def after_step(out: StepOut) -> None:  # metrics every log_every, eval, checkpoint, heatmap
        nonlocal step_times, data_waits, heatmap_at, row
        step_times.append(out.seconds)
        data_waits.append(out.data_wait_s)
        bar.update(out.loss, tokens_per_step / out.seconds)
        done, last = out.step, cfg.train.steps
        row = {"loss": out.loss}
        if due(done, cfg.train.log_every, last):
            row.update(_step_metrics(cfg, engine, optimizer, loader, ctx, done, tokens_per_step,
                                     step_times, n_params), data_wait_s=sum(data_waits) / len(data_waits))
            row["skipped_steps"] = train_step.skipped.total
            step_times, data_waits = [], []
        if due(done, cfg.train.eval_every, last):
            eval_loss = evaluate(engine.module, val_batches, ctx)
            row.update(eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50.0)))
        if len(row) > 1:
            metrics.log(done, row)
        if cfg.checkpoint.every_steps >= 0 and due(done, cfg.checkpoint.every_steps, last):
            save(cfg, run_dir, done, ctx, engine, optimizer, scheduler, loader, ds_config, saver)
        n_sel = len(optimizer.selection_history) if train_step.selects else 0
        if n_sel and (done == last or (n_sel > heatmap_at and n_sel % HEATMAP_EVERY_SELECTIONS == 0)):
            heatmap_at = n_sel
            metrics.figure("selection_heatmap",
                           selection_heatmap(optimizer.layer_names, optimizer.selection_history), done)

    train_step = Step(engine, optimizer, ctx, causal_lm_loss, cfg.train.max_skipped_steps, nan_grad_steps(ctx.rank))
    run(train_step, loader.next_step, start, cfg.train.steps, [after_step], progress)
    bar.close()
    if saver is not None:
        saver.wait()  # the last checkpoint is committed before we report done
    if ctx.is_main:
        log.info("done: loss %.4f, eval_loss %.4f (ppl %.2f) -> %s", row.get("loss", float("nan")),
                 row.get("eval_loss", float("nan")), row.get("eval_ppl", float("nan")), run_dir)


def _step_metrics(cfg, engine, optimizer, loader, ctx, done, tokens_per_step, step_times, n_params):
    mean_dt = sum(step_times) / len(step_times)
    flops_per_token = train_flops_per_token(engine.module, cfg.data.seq_len)
    state = optimizer_state_bytes(optimizer)
    row = {
        "tokens": done * tokens_per_step,
        "lr": engine.lr,
        "grad_norm": engine.grad_norm,
        "tokens_per_s": tokens_per_step / mean_dt,
        "step_time_s": mean_dt,
        "peak_mem_bytes": all_reduce_max(peak_memory_bytes(ctx.device), ctx),
        "train_flops_per_token": flops_per_token,
        "n_params": n_params,
        "optim_state_bytes": all_reduce_max(state, ctx),
        "optim_state_bytes_total": all_reduce_sum([state], ctx)[0],
        "skipped_data_lines": loader.skipped_lines,
    }
    peak = peak_flops(ctx.device)
    if peak:  # model FLOPs utilisation per GPU
        row["mfu"] = row["tokens_per_s"] * flops_per_token / (peak * ctx.world_size)
    if isinstance(optimizer, SelectsBlocks):
        s = optimizer.stats()
        row.update(always_params=s["always_params"], always_state_bytes=all_reduce_sum([s["always_state_bytes"]], ctx)[0],
                   inactive_params=s["inactive_params"])
        row.update(wire_bytes=all_reduce_max(s["wire_bytes"], ctx), selected_params=s["selected_params"],
                   selected_fraction=s["selected_fraction"], selection_churn=s["selection_churn"],
                   selection_time_s=s["selection_time_s"], owner_imbalance=s["owner_imbalance"])
    return row
