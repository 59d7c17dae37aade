"""Fine-tuning's zeroth-order mode (SensZOQ, scaletrain.zo): the sensitive mask (loaded, or
computed from C4 calibration sequences), the ZO model with its SPSA optimizer, and the ZO step
as a step function of the training loop (scaletrain.loop)."""
from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

from scaletrain import checkpoint as ckpt
from scaletrain.config_fields import ConfigError
from scaletrain.data import c4_source, eval_windows
from scaletrain.data.tasks import Batch, Task
from scaletrain.distributed.runtime import DistContext, all_reduce_sum
from scaletrain.ds_config import resolve_path
from scaletrain.finetune_config import FinetuneConfig
from scaletrain.finetune_model import task_loss
from scaletrain.loop import StepOut
from scaletrain.models.llama import causal_lm_loss
from scaletrain.optim.schedule import warmup_cosine

log = logging.getLogger("scaletrain")


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




class ZOStep:
    """The zeroth-order step for the loop: the LR schedule set on SPSA, then two-sided forward
    passes per sample over the micro-batches (SPSA agrees the loss across ranks itself)."""

    def __init__(self, cfg: FinetuneConfig, spsa, model, task: Task, autocast=None):
        self.cfg, self.spsa, self.model, self.task, self.autocast = cfg, spsa, model, task, autocast

    def __call__(self, step: int, batches: list[Batch]) -> StepOut:
        t = self.cfg.train
        self.spsa.lr = self.cfg.optim.lr * warmup_cosine(step, t.steps, t.warmup_steps, t.min_lr_ratio)
        out = zo_step(self.spsa, self.model, self.task, batches, step, self.autocast)
        extra = {"projected_grad": out["projected_grad"], "loss_plus": float(np.mean(out["loss_plus"])),
                 "loss_minus": float(np.mean(out["loss_minus"]))}
        return StepOut(step + 1, out["loss"], forwards=2 * self.cfg.zo.samples * len(batches), lr=self.spsa.lr,
                       extra=extra)
