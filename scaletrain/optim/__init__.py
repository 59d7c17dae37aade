"""Optimizer registry: `build_optimizer(cfg, model, max_grad_norm)` by `optim.name`.

Each entry says whether the optimizer synchronises gradients across ranks itself
(`syncs_grads`): the dense baseline leaves that to the engine (DeepSpeed's ZeRO or plain
all-reduce); the block optimizer reduces only the blocks it trains, and clips after that.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from scaletrain.optim.config import OptimConfig
from scaletrain.optim.galore_torch_baseline import build_galore_torch


@dataclass(frozen=True)
class OptimizerEntry:
    build: Callable[[OptimConfig, torch.nn.Module, float], torch.optim.Optimizer]
    syncs_grads: bool


def _adamw(cfg: OptimConfig, model: torch.nn.Module, max_grad_norm: float) -> torch.optim.Optimizer:
    # the baseline in torch's fastest form: fused kernels on CUDA, multi-tensor (foreach) elsewhere;
    # the single-tensor path stays the reference inside the equality tests only
    cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=cuda or None, foreach=not cuda)


def _block(cfg: OptimConfig, model: torch.nn.Module, max_grad_norm: float, **dense) -> torch.optim.Optimizer:
    from scaletrain.optim.blockllm import BlockOptimizer

    return BlockOptimizer(model.named_parameters(), cfg, max_grad_norm=max_grad_norm, **dense)


def _dense(projection: str):
    """GaLore / GradNormLoRP as published: every parameter trained (no selection, nothing
    frozen), fp32 moments, each tensor's state on one owner rank."""
    def build(cfg: OptimConfig, model: torch.nn.Module, max_grad_norm: float) -> torch.optim.Optimizer:
        return _block(dataclasses.replace(cfg, projection=projection, frozen_patterns=[], density=1.0,
                                          always_train=[], inactive="none", eight_bit=False), model,
                      max_grad_norm, select_all=True)
    return build


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "adamw": OptimizerEntry(_adamw, syncs_grads=False),
    "block": OptimizerEntry(_block, syncs_grads=True),
    "galore": OptimizerEntry(_dense("galore"), syncs_grads=True),
    "gradnorm_lorp": OptimizerEntry(_dense("gradnorm_lorp"), syncs_grads=True),
    "galore_torch": OptimizerEntry(build_galore_torch, syncs_grads=False),  # galore-torch's GaLoreAdamW
}


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module, max_grad_norm: float = 0.0):
    """Returns (optimizer, syncs_grads)."""
    entry = OPTIMIZERS[cfg.name]
    return entry.build(cfg, model, max_grad_norm), entry.syncs_grads
