"""The run directory of a pretraining or fine-tuning run: chosen before start-up (never over an
existing run), agreed on by all ranks after it, and the log file inside it."""
from __future__ import annotations

import logging
import sys
from datetime import datetime
from pathlib import Path

import torch

from scaletrain.config_fields import ConfigError
from scaletrain.distributed.runtime import DistContext


def choose_run_dir(run_dir: str, resume: str | None) -> Path | None:
    """An explicit run_dir that already holds a run is refused unless the run resumes (nothing
    written is overwritten). resume None: this entry point has no --resume."""
    if not run_dir:
        return None  # decided by rank 0 after start-up: runs/<name or timestamp>
    path = Path(run_dir)
    if (path / "metrics.jsonl").exists() and resume in (None, "none"):
        hint = " or continue it with --resume auto" if resume is not None else ""
        raise ConfigError(f"config key 'run_dir': {path} already holds a run (metrics.jsonl); "
                          f"choose another --run_dir{hint}")
    return path


def agree_on_run_dir(name: str, run_dir: Path | None, ctx: DistContext, prefix: str = "") -> Path:
    """runs/<name, or a timestamp> unless run_dir was given; created by rank 0."""
    if run_dir is None:
        name = name or datetime.now().strftime(f"{prefix}%Y%m%d-%H%M%S")
        if ctx.world_size > 1:  # ranks may straddle a second: rank 0's name wins
            holder = [name]
            torch.distributed.broadcast_object_list(holder, src=0)
            name = holder[0]
        run_dir = Path("runs") / name
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def setup_logging(run_dir: Path, ctx: DistContext) -> None:
    """INFO on rank 0 (stderr and run_dir/train.log), warnings only on the other ranks."""
    level = logging.INFO if ctx.is_main else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if ctx.is_main:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=level, format="%(asctime)s scaletrain: %(message)s", handlers=handlers,
                        force=True)
