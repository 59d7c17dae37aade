"""Fine-tuning: `launch/finetune.py` calls `main()`.

    deepspeed launch/finetune.py --config configs/finetune_zo.yaml --model.path runs/tiny
    torchrun --nproc_per_node 2 launch/finetune.py --config configs/finetune_zo.yaml ...
    python launch/finetune.py --model.path runs/tiny --optim.name adamw --optim.lr 1e-4

Loads a model (scaletrain checkpoint or transformers directory), fine-tunes it on a task
(scaletrain.data.tasks; SST-2 by default) with any optimizer of the registry or zeroth-order
(`optim.name zo`: SensZOQ, scaletrain.zo), evaluates held-out loss and accuracy, logs like
pretraining (metrics.jsonl + TensorBoard) and saves a checkpoint (the ZO mask included).
The step and the loop are pretraining's (scaletrain.loop); finetune_model.py: the model and its
task scoring; finetune_zo.py: the zeroth-order mask, model and step.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from scaletrain import checkpoint as ckpt
from scaletrain.config_fields import ConfigError
from scaletrain.data import CorruptShardError, DataPathError
from scaletrain.data.tasks import ExampleLoader, Task, TaskDataError, check_fields, load_rows, make_batch
from scaletrain.distributed.engines import build_engine, resolve_precision
from scaletrain.distributed.runtime import DistContext, all_reduce_max, init_distributed, resolve_backend
from scaletrain.ds_config import load_ds_config
from scaletrain.finetune_config import ZO, FinetuneConfig, help_text, load_finetune_config, to_dict
from scaletrain.finetune_model import ModelSource, evaluate, load_model, resolve_model, task_loss
from scaletrain.finetune_zo import ZOStep, build_zo, load_mask, zo_step  # noqa: F401 (zo_step: tests)
from scaletrain.loop import Progress, RankLostError, Step, StepOut, closing_run, due, run
from scaletrain.metrics import MetricsWriter, ProgressBar, peak_memory_bytes
from scaletrain.nonfinite import NonFiniteError, nan_grad_steps
from scaletrain.optim import build_optimizer
from scaletrain.optim.schedule import build_scheduler
from scaletrain.optim.selecting import SelectsBlocks
from scaletrain.run_dir import agree_on_run_dir, choose_run_dir, setup_logging
from scaletrain.trainer import optimizer_shard, optimizer_state_bytes

log = logging.getLogger("scaletrain")


# --------------------------------------------------------------------------- entry

def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return
    try:
        cfg = load_finetune_config(argv)
        run_dir = choose_run_dir(cfg.run_dir, resume=None)
        inputs = preflight(cfg)
    except (ConfigError, TaskDataError) as e:  # before any process group starts or anything is written
        print(f"scaletrain finetune: config error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        finetune(cfg, run_dir, inputs)
    except (ConfigError, TaskDataError) as e:  # found after start-up (e.g. a saved mask that does not fit)
        print(f"scaletrain finetune: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except (ckpt.CheckpointError, DataPathError, CorruptShardError, FileNotFoundError, NonFiniteError,
            RankLostError) as e:
        print(f"scaletrain finetune: error: {e}", file=sys.stderr)
        sys.exit(1)


# --------------------------------------------------------------------------- data

@dataclass
class Inputs:
    source: ModelSource
    train_rows: list[dict]
    val_rows: list[dict]


def preflight(cfg: FinetuneConfig) -> Inputs:
    """Everything that can be wrong with the input, found before anything starts (exit 2)."""
    source = resolve_model(cfg.model.path)
    d = cfg.data
    fields = {"data.text_field": d.text_field}
    fields.update({"data.label_field": d.label_field} if d.task == "classification"
                  else {"data.completion_field": d.completion_field})
    rows = []
    for path, split, key in ((d.train_path, d.train_split, "data.train_path"), (d.val_path, d.val_split, "data.val_path")):
        r = load_rows(d.source, path, split, key, d.hub_name, d.hub_config)
        check_fields(r, fields, f"{key} {path if d.source == 'files' else d.hub_name + ':' + split}")
        rows.append(r)
    train_rows = rows[0][: d.train_examples or None]
    val_rows = rows[1][: d.val_examples or None]
    if cfg.optim.name == ZO and cfg.zo.mask != "compute":
        load_mask(cfg.zo.mask)  # fails early, naming zo.mask
    return Inputs(source, train_rows, val_rows)


def build_task(cfg: FinetuneConfig, tokenizer) -> Task:
    return Task(tokenizer, cfg.data.task, cfg.data.template, cfg.data.label_words, cfg.data.max_len)


def encode(cfg: FinetuneConfig, task: Task, rows: list[dict], where: str):
    d = cfg.data
    return task.encode(rows, d.text_field, d.label_field, d.completion_field, where)


# --------------------------------------------------------------------------- the run

def _tensor_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def finetune(cfg: FinetuneConfig, run_dir: Path | None, inputs: Inputs | None = None) -> dict:
    """However the run ends, metrics and the process group are closed (scaletrain.loop.closing_run)."""
    inputs = inputs or preflight(cfg)
    backend = resolve_backend(cfg.backend)
    ds_config = resolve_precision(load_ds_config(cfg.deepspeed_config))
    ctx = init_distributed(backend)
    progress = Progress()
    with closing_run(ctx, progress) as closing:
        return _finetune(cfg, run_dir, inputs, backend, ds_config, ctx, closing, progress)


def _finetune(cfg, run_dir, inputs: Inputs, backend: str, ds_config: dict, ctx: DistContext, closing,
              progress: Progress) -> dict:
    random.seed(cfg.seed + ctx.rank)
    np.random.seed(cfg.seed + ctx.rank)
    run_dir = agree_on_run_dir(cfg.name, run_dir, ctx, prefix="ft-")
    setup_logging(run_dir, ctx)
    if ctx.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config.get("gradient_accumulation_steps", 1)
    bf16 = bool(ds_config["bf16"].get("enabled"))

    model, tokenizer, tok_spec, preset = load_model(inputs.source, cfg.model.tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    task = build_task(cfg, tokenizer)
    train_ex = encode(cfg, task, inputs.train_rows, "data.train_path")
    val_ex = encode(cfg, task, inputs.val_rows, "data.val_path")
    val_mine = val_ex[ctx.rank::ctx.world_size]
    loader = ExampleLoader(len(train_ex), micro, accum, ctx.rank, ctx.world_size, cfg.seed)
    is_zo = cfg.optim.name == ZO
    log.info("finetune %s | backend %s | world %d | %s %.2fM params from %s | %s | %d examples/step | "
             "%d train, %d held-out examples | %s", run_dir, backend, ctx.world_size, preset, n_params / 1e6,
             inputs.source.path, cfg.optim.name, loader.per_step, len(train_ex), len(val_ex),
             "bf16" if bf16 else "fp32")

    t_setup = time.perf_counter()
    engine = optimizer = zm = spsa = None
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if bf16 else None
    if is_zo:
        model.to(ctx.device)
        zm, spsa = build_zo(cfg, model, tokenizer, ctx)
        module, trainable = model, zm.trainable
        step_fn = ZOStep(cfg, spsa, model, task, autocast)
    else:
        if backend == "fsdp":
            raise ConfigError("config key 'backend': fine-tuning runs under deepspeed or single")
        optimizer, syncs = build_optimizer(cfg.optim, model, float(ds_config.get("gradient_clipping", 0.0)))
        scheduler = build_scheduler(optimizer, cfg.train.steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio)
        engine = build_engine(backend, model, optimizer, scheduler, ds_config, ctx, syncs)
        module, trainable = engine.module, n_params
        step_fn = Step(engine, optimizer, ctx, lambda module, mb: task_loss(module, mb, task)[0],
                       cfg.train.max_skipped_steps, nan_grad_steps(ctx.rank))
    setup_s = time.perf_counter() - t_setup
    metrics = closing.enter_context(contextlib.closing(MetricsWriter(run_dir, ctx.is_main)))
    weight_bytes = zm.weight_bytes()["total"] if zm is not None else _tensor_bytes(module)
    static = {"n_params": n_params, "trainable_params": trainable, "weight_bytes": weight_bytes,
              "setup_s": setup_s}
    if zm is not None and zm.mask is not None:
        static.update(mask_fisher_share=zm.mask.meta.get("fisher_share", float("nan")))
    first = evaluate(module, task, val_mine, ctx, cfg.train.eval_batch_size, autocast)
    metrics.log(0, {**first, **static, "forward_passes": 0})
    log.info("before tuning: eval_loss %.4f, eval_accuracy %.4f on %d examples", first["eval_loss"],
             first["eval_accuracy"], int(first["eval_examples"]))

    bar = closing.enter_context(contextlib.closing(ProgressBar(cfg.train.steps, 0, ctx.is_main)))
    forwards, step_times, g_window = 0, [], []
    last_eval = first

    def after_step(out: StepOut) -> None:  # metrics every log_every, eval, checkpoint
        nonlocal forwards, step_times, g_window, last_eval
        forwards += out.forwards
        dt = out.seconds - out.data_wait_s  # the step itself: building the batches is not timed
        step_times.append(dt)
        bar.update(out.loss, loader.per_step / dt)
        done, last = out.step, cfg.train.steps
        row = {**out.extra, "loss": out.loss}
        if is_zo:
            g_window.append(abs(out.extra["projected_grad"]))
        if due(done, cfg.train.log_every, last):
            mean_dt = sum(step_times) / len(step_times)
            state = 0 if is_zo else optimizer_state_bytes(optimizer)
            row.update(lr=out.lr, examples=done * loader.per_step, forward_passes=forwards, step_time_s=mean_dt,
                       examples_per_s=loader.per_step / mean_dt,
                       peak_mem_bytes=all_reduce_max(peak_memory_bytes(ctx.device), ctx),
                       optim_state_bytes=all_reduce_max(state, ctx), **static)
            if is_zo:
                row.update(abs_projected_grad=float(np.mean(g_window)), wire_bytes=spsa.wire_bytes_last_step)
                g_window = []
            else:
                row.update(grad_norm=engine.grad_norm, skipped_steps=step_fn.skipped.total)
                if isinstance(optimizer, SelectsBlocks):
                    s = optimizer.stats()
                    row.update(selected_params=s["selected_params"], wire_bytes=all_reduce_max(s["wire_bytes"], ctx))
            step_times = []
        if due(done, cfg.train.eval_every, last):
            last_eval = evaluate(module, task, val_mine, ctx, cfg.train.eval_batch_size, autocast)
            row.update({k: v for k, v in last_eval.items() if k != "eval_examples"})
        metrics.log(done, row)
        if cfg.checkpoint.every_steps >= 0 and due(done, cfg.checkpoint.every_steps, last):
            save(cfg, run_dir, done, ctx, model, zm, engine, optimizer, loader, ds_config, tok_spec, preset,
                 inputs.source)

    def next_batches() -> list:
        return [make_batch(task, [train_ex[i] for i in idx]).to(ctx.device) for idx in loader.next_step()]

    run(step_fn, next_batches, 0, cfg.train.steps, [after_step], progress)
    bar.close()
    if ctx.is_main:
        log.info("done: eval_loss %.4f (was %.4f), eval_accuracy %.4f (was %.4f) -> %s", last_eval["eval_loss"],
                 first["eval_loss"], last_eval["eval_accuracy"], first["eval_accuracy"], run_dir)
    return {"before": first, "after": last_eval, "run_dir": str(run_dir)}


def save(cfg, run_dir, step, ctx, model, zm, engine, optimizer, loader, ds_config, tok_spec, preset, source) -> Path:
    """A checkpoint in the pretraining layout: plain Llama weights (ZO: the 4-bit base with the tuned
    sparse values in place, materialized), the mask (ZO) or optimizer state in the rank shards,
    and a config.yaml that tools/export_hf.py and `--model.path` read."""
    extra, optim_meta = None, {"kind": "none"}
    if zm is not None:  # the materialized weights and the mask, from rank 0 (replicated)
        sharded = {f"model/{k}": v for k, v in zm.state_dict().items()} if ctx.is_main else {}
        if zm.mask is None:
            extra = {"kind": "zo_dense"}
        elif ctx.is_main:
            extra = {**zm.mask.state_dict(), "quant": cfg.zo.quant, "quant_block": cfg.zo.quant_block}
        else:
            extra = {"kind": "zo_mask", "replica_of_rank": 0}
    else:
        optim_tensors, optim_meta = optimizer_shard(engine, optimizer)
        sharded = {**ckpt.model_shard(engine.module), **optim_tensors}
    llama = {k: v for k, v in model.config.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))}
    record = {"model": {"preset": preset, "llama_config": llama, "source": str(source.path)},
              "data": {"tokenizer": tok_spec}, "finetune": to_dict(cfg)}
    return ckpt.save_checkpoint(run_dir / "checkpoints", step, rank=ctx.rank, world_size=ctx.world_size,
                                sharded=sharded, extra_shard=extra,
                                trainer_state={"step": step, "world_size": ctx.world_size, "optim": optim_meta,
                                               "loader": loader.state_dict()},
                                config_text=yaml.safe_dump(record, sort_keys=False), ds_config=ds_config,
                                keep_latest=cfg.checkpoint.keep_latest)
