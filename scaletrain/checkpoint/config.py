"""The `checkpoint.*` config section (how often to save, how many to keep, in the background or
not) and its checks; pretraining and fine-tuning both use it."""
from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config_fields import doc, require


@dataclass
class CheckpointConfig:
    every_steps: int = doc(1000, "Save a checkpoint every N steps (and always at the end); 0: only at the "
                           "end; -1: never (benchmarks).")
    keep_latest: int = doc(3, "Complete checkpoints kept (the oldest are deleted); at least 2.")
    async_save: bool = doc(False, "Write checkpoints on a background thread after copying the state "
                           "(training stalls only for the copy).")


def check_checkpoint(c: CheckpointConfig) -> None:
    require(c.every_steps >= -1, "checkpoint.every_steps", "must be >= -1 (0: only at the end; -1: never)")
    require(c.keep_latest >= 2, "checkpoint.keep_latest",
           "must be >= 2 (a crash while saving must leave a previous complete checkpoint)")
