"""The `train.*` config keys pretraining and fine-tuning share (steps, LR schedule, logging,
non-finite tolerance) and their checks; each entry point's section subclasses TrainArgs."""
from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config_fields import doc, require


@dataclass
class TrainArgs:
    """The train section pretraining and fine-tuning share (litgpt's TrainArgs); each entry point's
    subclass adds its own evaluation knobs and may change defaults."""
    steps: int = doc(250, "Optimizer steps to run.")
    warmup_steps: int = doc(20, "Linear LR warm-up steps (then cosine decay).")
    min_lr_ratio: float = doc(0.1, "Cosine decays the LR to this fraction of optim.lr (GaLore: 0.1).")
    eval_every: int = doc(0, "Evaluate held-out loss every N steps (0: only at the end).")
    log_every: int = doc(10, "Write metrics every N steps.")
    max_skipped_steps: int = doc(10, "Stop the run (exit 1) after this many steps in a row whose loss or "
                                 "gradient norm is not finite; each such step is skipped on all ranks "
                                 "(no update, LR schedule held) and counted as skipped_steps.")


def check_train_args(t: TrainArgs) -> None:
    """The train.* keys pretraining and fine-tuning share."""
    require(t.steps > 0, "train.steps", "must be positive")
    require(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    require(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
    require(t.eval_every >= 0, "train.eval_every", "must be >= 0")
    require(t.log_every > 0, "train.log_every", "must be positive")
    require(t.max_skipped_steps > 0, "train.max_skipped_steps", "must be positive")
