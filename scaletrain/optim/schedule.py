"""LR schedule: linear warm-up, then cosine decay to `min_lr_ratio` of the peak (as GaLore)."""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR for the update at `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps  # never 0: the first update is not wasted
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> LambdaLR:
    return LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps, min_lr_ratio))
