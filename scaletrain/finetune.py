"""Fine-tuning: `launch/finetune.py` calls `main()`.

    deepspeed launch/finetune.py --config configs/finetune_zo.yaml --model.path runs/tiny
    torchrun --nproc_per_node 2 launch/finetune.py --config configs/finetune_zo.yaml ...
    python launch/finetune.py --model.path runs/tiny --optim.name adamw --optim.lr 1e-4

Loads a model (scaletrain checkpoint or transformers directory), fine-tunes it on a task
(scaletrain.data.tasks; SST-2 by default) with any optimizer of the registry or zeroth-order
(`optim.name zo`: SensZOQ, scaletrain.zo), evaluates held-out loss and accuracy, logs like
pretraining (metrics.jsonl + TensorBoard) and saves a checkpoint (the ZO mask included).
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
import torch.nn.functional as F
import yaml

from scaletrain import checkpoint as ckpt
from scaletrain.config import ConfigError, load_ds_config, resolve_path
from scaletrain.data import CorruptShardError, DataPathError, c4_source, eval_windows, load_tokenizer
from scaletrain.data.tasks import (Batch, ExampleLoader, Task, TaskDataError, check_fields, load_rows,
                                   make_batch)
from scaletrain.distributed.runtime import (DistContext, all_reduce_max, all_reduce_mean, all_reduce_sum,
                                     init_distributed, resolve_backend, shutdown)
from scaletrain.finetune_config import ZO, FinetuneConfig, help_text, load_finetune_config, to_dict
from scaletrain.metrics import MetricsWriter, ProgressBar, peak_memory_bytes
from scaletrain.models.llama import PRESETS, causal_lm_loss, llama_config
from scaletrain.nonfinite import NonFiniteError, SkippedSteps
from scaletrain.optim.schedule import warmup_cosine
from scaletrain.optim.selecting import SelectsBlocks
from scaletrain.run_dir import agree_on_run_dir, choose_run_dir, setup_logging

log = logging.getLogger("scaletrain")
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")
HF_TOKENIZER = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class ModelPathError(ConfigError):
    """model.path names nothing loadable; the message says why and what to point it at."""


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
    except (ckpt.CheckpointError, DataPathError, CorruptShardError, FileNotFoundError, NonFiniteError) as e:
        print(f"scaletrain finetune: error: {e}", file=sys.stderr)
        sys.exit(1)


# --------------------------------------------------------------------------- model

@dataclass
class ModelSource:
    kind: str  # "scaletrain" | "hf"
    path: Path
    config: dict  # the checkpoint's config.yaml ({} for transformers directories)


def resolve_model(spec: str) -> ModelSource:
    """A scaletrain checkpoint (step dir, checkpoints/ root, run dir) or a transformers directory."""
    if not spec:
        raise ModelPathError("config key 'model.path' is empty: point it at a scaletrain run or checkpoint "
                             "(e.g. python launch/pretrain.py --run_dir runs/tiny, then --model.path "
                             "runs/tiny) or at a transformers model directory (tools/export_hf.py writes one)")
    p = resolve_path(spec)
    if not p.is_dir():
        raise ModelPathError(f"config key 'model.path': no such directory {spec!r}")
    if (p / "config.json").is_file():
        if not any((p / f).is_file() for f in HF_WEIGHTS):
            raise ModelPathError(f"config key 'model.path': {p} is a transformers model directory "
                                 f"(config.json) without weights ({' / '.join(HF_WEIGHTS[::2])}); export "
                                 f"it again with tools/export_hf.py or point model.path at one with weights")
        return ModelSource("hf", p, {})
    try:
        if (p / "checkpoints").is_dir():
            found = ckpt.find_checkpoint("auto", p)
        elif (p / "latest").is_file() or (p / "manifest.json").is_file():
            found = ckpt.find_checkpoint(str(p), p)
        elif (p / "dcp").is_dir() or (p / "config.yaml").is_file():
            ckpt.verify(p)  # an incomplete checkpoint: the error names what is missing
            found = p
        else:
            found = None
    except ckpt.CheckpointError as e:
        raise ModelPathError(f"config key 'model.path': {e}; the model weights (dcp/) must "
                             f"be there: point model.path at an intact step_* directory or its run "
                             f"directory") from None
    if found is None:
        raise ModelPathError(f"config key 'model.path': {p} holds no model: neither a scaletrain checkpoint "
                             f"(step_*/ with manifest.json and dcp/, a checkpoints/ root, or a "
                             f"run directory) nor a transformers directory (config.json + weights)")
    return ModelSource("scaletrain", found, yaml.safe_load((found / "config.yaml").read_text()) or {})


def load_model(source: ModelSource, tokenizer_spec: str = "auto"):
    """(LlamaForCausalLM in fp32, tokenizer, tokenizer spec, preset or 'custom')."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if source.kind == "hf":
        model = LlamaForCausalLM.from_pretrained(source.path, dtype=torch.float32)
        if tokenizer_spec == "auto":
            if not any((source.path / f).is_file() for f in HF_TOKENIZER):
                raise ModelPathError(f"config key 'model.tokenizer': {source.path} has no tokenizer files; "
                                     f"name one with --model.tokenizer")
            from scaletrain.data.tokenizer import HFTokenizer

            return model, HFTokenizer(str(source.path)), str(source.path), "custom"
        return model, load_tokenizer(tokenizer_spec), tokenizer_spec, "custom"
    cfg = source.config
    weights = ckpt.load_model_state(source.path)
    model_cfg = cfg.get("model", {})
    if "llama_config" in model_cfg:  # written by a fine-tuning run
        model = LlamaForCausalLM(LlamaConfig(**model_cfg["llama_config"]))
    else:
        vocab = weights["model.embed_tokens.weight"].shape[0]
        model = LlamaForCausalLM(llama_config(model_cfg["preset"], vocab))
    model.load_state_dict(weights, strict=True)
    spec = cfg.get("data", {}).get("tokenizer", "default") if tokenizer_spec == "auto" else tokenizer_spec
    tokenizer = load_tokenizer(spec)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ModelPathError(f"config key 'model.tokenizer': {spec!r} has {tokenizer.vocab_size} pieces, the "
                             f"model's vocabulary {model.config.vocab_size}")
    preset = model_cfg.get("preset", "custom")
    return model, tokenizer, spec, preset if preset in PRESETS else "custom"


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


# --------------------------------------------------------------------------- scoring

def task_loss(model, batch: Batch, task: Task) -> tuple[torch.Tensor, float, float, float]:
    """(mean loss of the micro-batch, summed loss, correct, weight).

    Classification: weight = examples, loss = cross-entropy over the label words' scores.
    Completion: weight = completion tokens, loss = their mean next-token loss."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, logits_to_keep=batch.keep)
    logp = F.log_softmax(out.logits.float(), dim=-1)  # (N, keep, V)
    if task.single_token:  # one row per example, the next token's log-probability
        cand = torch.tensor([c[0] for c in task.candidates], device=logp.device)
        scores = logp[:, -1, :].index_select(1, cand)  # (B, K)
    else:
        width = batch.keep - 1  # continuation tokens are the last `width` of each row
        target = batch.input_ids[:, -width:]
        tok = logp[:, :-1, :].gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (N, width)
        on = torch.arange(width, device=tok.device).unsqueeze(0) >= (width - batch.cont_len).unsqueeze(1)
        if task.kind == "completion":
            n_tok = on.sum()
            nll = -(tok * on).sum()
            hits = ((logp[:, :-1, :].argmax(-1) == target) & on).sum()
            return nll / n_tok, float(nll), float(hits), float(n_tok)
        scores = (tok * on).sum(1).view(batch.n_examples, len(task.candidates))
    losses = F.cross_entropy(scores, batch.labels, reduction="none")
    correct = (scores.argmax(1) == batch.labels).sum()
    return losses.mean(), float(losses.sum()), float(correct), float(batch.n_examples)


@torch.no_grad()
def evaluate(model, task: Task, examples, ctx: DistContext, batch_size: int, autocast=None) -> dict:
    """Held-out loss and accuracy over every rank's share (examples j with j % W == rank)."""
    was = model.training
    model.eval()
    loss_sum = correct = weight = 0.0
    for i in range(0, len(examples), batch_size):
        batch = make_batch(task, examples[i:i + batch_size]).to(ctx.device)
        with autocast or contextlib.nullcontext():
            _, s, c, w = task_loss(model, batch, task)
        loss_sum, correct, weight = loss_sum + s, correct + c, weight + w
    model.train(was)
    loss_sum, correct, weight = all_reduce_sum([loss_sum, correct, weight], ctx)
    return {"eval_loss": loss_sum / max(weight, 1.0), "eval_accuracy": correct / max(weight, 1.0),
            "eval_examples": weight}


# --------------------------------------------------------------------------- ZO pieces

def load_mask(spec: str):
    """A saved mask: a .pt file, or a checkpoint (step dir / run dir) whose rank-0 shard holds it."""
    from scaletrain.zo import Mask

    p = resolve_path(spec)
    if p.is_dir():
        try:
            found = ckpt.find_checkpoint("auto", p) if (p / "checkpoints").is_dir() else ckpt.find_checkpoint(str(p), p)
        except ckpt.CheckpointError as e:
            raise ConfigError(f"config key 'zo.mask': {e}") from None
        p = found / "optim_rank00000.pt"
    if not p.is_file():
        raise ConfigError(f"config key 'zo.mask': no such file {spec!r} (compute, a checkpoint of a zo run, "
                          f"or a mask .pt file)")
    state = torch.load(p, map_location="cpu", weights_only=True)
    try:
        return Mask.from_state_dict(state)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"config key 'zo.mask': {p} holds no SensZOQ mask ({e}); name a zo run's "
                          f"checkpoint") from None


def calibration_sequences(cfg: FinetuneConfig, tokenizer, ctx: DistContext, max_positions: int) -> list[torch.Tensor]:
    """This rank's share (every W-th) of the first zo.calib_sequences C4 windows, one per backward."""
    seq_len = min(cfg.zo.calib_seq_len, max_positions)
    docs = c4_source("local", None if cfg.zo.calib_path == "default" else cfg.zo.calib_path)
    return eval_windows(docs, tokenizer, seq_len, cfg.zo.calib_sequences, ctx.rank, ctx.world_size, micro_batch=1)


def build_zo(cfg: FinetuneConfig, model, tokenizer, ctx: DistContext, mask=None):
    """ZOModel + SPSA; the mask is loaded, given, or computed (one all-reduce over ranks)."""
    from scaletrain.zo import SPSA, ZOModel, compute_mask

    z = cfg.zo
    if z.density >= 1.0:
        zm = ZOModel(model, None, tuple(z.patterns), "none")
    else:
        if mask is None and z.mask != "compute":
            mask = load_mask(z.mask)
        if mask is None:
            seqs = calibration_sequences(cfg, tokenizer, ctx, model.config.max_position_embeddings)
            mask = compute_mask(model, tuple(z.patterns), seqs, causal_lm_loss, z.density, z.scope,
                                n_global=z.calib_sequences)
            log.info("sensitive mask: %d of %d coordinates (density %g, %s top-k) from %d C4 sequences "
                     "of %d tokens in %.1fs; they hold %.1f%% of the squared-gradient mass",
                     mask.count, mask.candidates, z.density, z.scope, z.calib_sequences,
                     len(seqs[0][0]) - 1 if seqs else 0, mask.meta["seconds"], 100 * mask.meta["fisher_share"])
        if z.debug_checks and ctx.world_size > 1:
            sums = all_reduce_sum([mask.checksum(), 1.0], ctx)
            assert abs(sums[0] - sums[1] * mask.checksum()) <= 1e-6 * abs(sums[0]), "masks differ across ranks"
        try:
            zm = ZOModel(model, mask, tuple(z.patterns), z.quant, z.quant_block)
        except ValueError as e:
            raise ConfigError(f"config key 'zo.mask': {e}") from None
    spsa = SPSA(zm.tensors, lr=cfg.optim.lr, eps=z.eps, samples=z.samples, weight_decay=z.weight_decay,
                seed=cfg.seed)
    return zm, spsa


def zo_step(spsa, model, task: Task, micro_batches: list[Batch], step: int, autocast=None) -> dict:
    def closure():
        total = 0.0
        with autocast or contextlib.nullcontext():
            for mb in micro_batches:
                total += task_loss(model, mb, task)[0].item()
        return total, float(len(micro_batches))

    return spsa.step(closure, step)


# --------------------------------------------------------------------------- first-order step

def first_order_step(engine, task: Task, micro_batches: list[Batch], poison: bool = False) -> float:
    """One optimizer step over the micro-batches: the engine's train_step with the task's loss
    (poison: the NaN-gradient test hook, NAN_GRAD_ENV)."""
    return engine.train_step(micro_batches, loss_fn=lambda module, mb: task_loss(module, mb, task)[0],
                             poison=poison)


# --------------------------------------------------------------------------- the run

def _tensor_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def finetune(cfg: FinetuneConfig, run_dir: Path | None, inputs: Inputs | None = None) -> dict:
    inputs = inputs or preflight(cfg)
    backend = resolve_backend(cfg.backend)
    from scaletrain.distributed.engines import resolve_precision

    ds_config = resolve_precision(load_ds_config(cfg.deepspeed_config))
    ctx = init_distributed(backend)
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
        module = model
        trainable = zm.trainable
    else:
        from scaletrain.distributed.engines import build_engine, nan_grad_steps
        from scaletrain.optim import build_optimizer
        from scaletrain.optim.schedule import build_scheduler

        if backend == "fsdp":
            raise ConfigError("config key 'backend': fine-tuning runs under deepspeed or single")
        optimizer, syncs = build_optimizer(cfg.optim, model, float(ds_config.get("gradient_clipping", 0.0)))
        scheduler = build_scheduler(optimizer, cfg.train.steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio)
        engine = build_engine(backend, model, optimizer, scheduler, ds_config, ctx, syncs)
        module = engine.module
        trainable = n_params
    setup_s = time.perf_counter() - t_setup
    metrics = MetricsWriter(run_dir, ctx.is_main)
    weight_bytes = zm.weight_bytes()["total"] if zm is not None else _tensor_bytes(module)
    static = {"n_params": n_params, "trainable_params": trainable, "weight_bytes": weight_bytes,
              "setup_s": setup_s}
    if zm is not None and zm.mask is not None:
        static.update(mask_fisher_share=zm.mask.meta.get("fisher_share", float("nan")))
    first = evaluate(module, task, val_mine, ctx, cfg.train.eval_batch_size, autocast)
    metrics.log(0, {**first, **static, "forward_passes": 0})
    log.info("before tuning: eval_loss %.4f, eval_accuracy %.4f on %d examples", first["eval_loss"],
             first["eval_accuracy"], int(first["eval_examples"]))

    bar = ProgressBar(cfg.train.steps, 0, ctx.is_main)
    forwards, step_times, g_window = 0, [], []
    row: dict = {}
    last_eval = first
    skipped = SkippedSteps(cfg.train.max_skipped_steps)
    poison_at = set() if is_zo else nan_grad_steps(ctx.rank)
    for step in range(cfg.train.steps):
        batches = [make_batch(task, [train_ex[i] for i in idx]).to(ctx.device) for idx in loader.next_step()]
        t0 = time.perf_counter()
        row = {}
        if is_zo:
            spsa.lr = cfg.optim.lr * warmup_cosine(step, cfg.train.steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio)
            out = zo_step(spsa, model, task, batches, step, autocast)
            loss, lr = out["loss"], spsa.lr
            forwards += 2 * cfg.zo.samples * len(batches)
            row.update(projected_grad=out["projected_grad"], loss_plus=float(np.mean(out["loss_plus"])),
                       loss_minus=float(np.mean(out["loss_minus"])))
            g_window.append(abs(out["projected_grad"]))
        else:
            if isinstance(optimizer, SelectsBlocks) and optimizer.wants_selection(step):
                with optimizer.selection_pass(step=step):
                    for mb in batches:
                        task_loss(module, mb, task)[0].backward()
                forwards += len(batches)
            loss = all_reduce_mean(first_order_step(engine, task, batches, poison=step + 1 in poison_at), ctx)
            skipped.record(step + 1, engine.step_skipped, loss)  # the engine skipped it on every rank
            if isinstance(optimizer, SelectsBlocks) and not engine.step_skipped:
                optimizer.record_loss(loss)
            lr = engine.lr
            forwards += len(batches)
        dt = time.perf_counter() - t0
        step_times.append(dt)
        bar.update(loss, loader.per_step / dt)
        done = step + 1
        row["loss"] = loss
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            mean_dt = sum(step_times) / len(step_times)
            state = 0 if is_zo else _optim_state_bytes(optimizer)
            row.update(lr=lr, examples=done * loader.per_step, forward_passes=forwards, step_time_s=mean_dt,
                       examples_per_s=loader.per_step / mean_dt,
                       peak_mem_bytes=all_reduce_max(peak_memory_bytes(ctx.device), ctx),
                       optim_state_bytes=all_reduce_max(state, ctx), **static)
            if is_zo:
                row.update(abs_projected_grad=float(np.mean(g_window)), wire_bytes=spsa.wire_bytes_last_step)
                g_window = []
            else:
                row.update(grad_norm=engine.grad_norm, skipped_steps=skipped.total)
                if isinstance(optimizer, SelectsBlocks):
                    s = optimizer.stats()
                    row.update(selected_params=s["selected_params"], wire_bytes=all_reduce_max(s["wire_bytes"], ctx))
            step_times = []
        if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == cfg.train.steps:
            last_eval = evaluate(module, task, val_mine, ctx, cfg.train.eval_batch_size, autocast)
            row.update({k: v for k, v in last_eval.items() if k != "eval_examples"})
        metrics.log(done, row)
        every = cfg.checkpoint.every_steps
        if every >= 0 and ((every and done % every == 0) or done == cfg.train.steps):
            save(cfg, run_dir, done, ctx, model, zm, engine, optimizer, loader, ds_config, tok_spec, preset,
                 inputs.source)
    bar.close()
    if ctx.is_main:
        log.info("done: eval_loss %.4f (was %.4f), eval_accuracy %.4f (was %.4f) -> %s", last_eval["eval_loss"],
                 first["eval_loss"], last_eval["eval_accuracy"], first["eval_accuracy"], run_dir)
    metrics.close()
    shutdown()
    return {"before": first, "after": last_eval, "run_dir": str(run_dir)}


def _optim_state_bytes(optimizer) -> int:
    from scaletrain.trainer import optimizer_state_bytes

    return optimizer_state_bytes(optimizer)


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
        from scaletrain.trainer import optimizer_shard

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
