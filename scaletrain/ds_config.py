"""The DeepSpeed JSON (`deepspeed_config`) every backend reads: micro-batch, accumulation,
precision, ZeRO stage, clipping. Only its sanity checks live here (DeepSpeed checks the rest),
with the lookup of a relative path from the working directory or the repository root."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scaletrain.config_fields import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(path: str) -> Path:
    """A relative path is looked up from the working directory, then from the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


# DeepSpeed sections that would put a second copy of one of our knobs in the ds_config.
_DS_FORBIDDEN = {
    "optimizer": "the optimizer and its lr are scaletrain's: set optim.name / optim.lr",
    "scheduler": "the LR schedule is scaletrain's: set train.warmup_steps / train.min_lr_ratio",
}


def load_ds_config(path: str) -> dict[str, Any]:
    """Read and sanity-check the DeepSpeed JSON; DeepSpeed itself checks the rest."""
    p = resolve_path(path)
    if not p.is_file():
        raise ConfigError(f"config key 'deepspeed_config': no such file {path!r} "
                          f"(the shipped ones are in ds_configs/)")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config key 'deepspeed_config': {path} is not valid JSON: {e}") from None
    for section, why in _DS_FORBIDDEN.items():
        if section in ds:
            raise ConfigError(f"deepspeed_config {path} has an '{section}' section: remove it; {why}")
    micro = ds.get("train_micro_batch_size_per_gpu")
    if not isinstance(micro, int) or micro <= 0:
        raise ConfigError(f"deepspeed_config {path}: train_micro_batch_size_per_gpu must be a "
                          f"positive integer, got {micro!r}")
    gas = ds.get("gradient_accumulation_steps", 1)
    if not isinstance(gas, int) or gas <= 0:
        raise ConfigError(f"deepspeed_config {path}: gradient_accumulation_steps must be a "
                          f"positive integer, got {gas!r}")
    return ds
