"""The pretraining run configuration: RunConfig composes the sections each component owns, and
this module loads, validates and resumes it.

    python launch/pretrain.py --config configs/blockllm_paper.yaml --optim.lr 3e-3 --data.seq_len 256

Sections and their owners: `model.*` scaletrain.models.config, `data.*` scaletrain.data.config,
`train.*` scaletrain.train_args (shared with fine-tuning) plus TrainConfig here, `optim.*`
scaletrain.optim.config, `checkpoint.*` scaletrain.checkpoint.config. The argument/file parsing,
coercion and `--help` machinery is scaletrain.config_parse; the DeepSpeed JSON, scaletrain.ds_config.

Every field carries its documentation (`--help` prints it). DeepSpeed's own settings
(micro-batch, gradient accumulation, precision, ZeRO stage, clipping) are NOT here: they live
only in the JSON file named by `deepspeed_config`, so no knob exists in two places.

Bad input raises `ConfigError`, which names the field and, for a misspelt key, the closest
valid name; `launch/pretrain.py` turns it into exit code 2 before anything starts or is written.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from scaletrain.checkpoint.config import CheckpointConfig, check_checkpoint
from scaletrain.config_fields import ConfigError, doc, require
from scaletrain.config_parse import (all_keys, build_config, check_choices, coerce, config_help, field_type, flatten,
                                     get_key, given_keys, set_key)
from scaletrain.data.config import DataConfig, check_data
from scaletrain.ds_config import REPO_ROOT, load_ds_config, resolve_path
from scaletrain.models.config import ModelConfig
from scaletrain.optim import OPTIMIZERS  # the registry is the one list of optimizer names
from scaletrain.optim.config import OptimConfig, check_optim
from scaletrain.train_args import TrainArgs, check_train_args

# Importers (fine-tuning, tools, tests) reach the sections and the machinery through this module.
__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "FIXED_ON_RESUME", "HINTS", "INVOCATION_KEYS",
    "ModelConfig", "OptimConfig", "REPO_ROOT", "RunConfig", "TrainArgs", "TrainConfig", "build_config",
    "check_checkpoint", "check_choices", "check_optim", "check_train_args", "config_help", "doc",
    "given_keys", "help_text", "load_config", "load_ds_config", "require", "resolve_path",
    "resumed_config", "to_dict", "validate",
]


@dataclass
class TrainConfig(TrainArgs):
    eval_windows: int = doc(64, "Held-out sequences used per evaluation.")


@dataclass
class RunConfig:
    name: str = doc("", "Run name; default: a timestamp.")
    run_dir: str = doc("", "Where logs, metrics and checkpoints go; default runs/<name>.")
    seed: int = doc(0, "Seed for model initialisation.")
    collective_timeout_s: float = doc(600.0, "Seconds a collective waits for the other ranks before it "
                                      "fails and the run stops naming the lost rank and step. Every "
                                      "rank waits in a collective while rank 0 commits a checkpoint: "
                                      "raise it if saves take longer.")
    resume: str = doc("none", "none | auto (newest intact checkpoint under run_dir/checkpoints) | "
                      "a checkpoint directory.")
    backend: str = doc("auto", "deepspeed | fsdp | single; auto: deepspeed under a launcher "
                       "(deepspeed, torchrun, mpirun), single under plain python. fsdp: FSDP2 "
                       "fully_shard (ZeRO-3), e.g. under torchrun.",
                       ("auto", "deepspeed", "fsdp", "single"))
    deepspeed_config: str = doc("ds_configs/default.json", "DeepSpeed JSON: micro-batch, "
                                "accumulation, precision, ZeRO stage, clipping. Read by every backend.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# Renamed or misremembered keys that deserve a pointed hint rather than a fuzzy match.
HINTS = {
    "optim.sparsity": "optim.density (the fraction trained; BlockLLM's sparsity_level 0.95 is density 0.05)",
    "train.batch_size": "train_micro_batch_size_per_gpu in the deepspeed_config JSON",
    "train.micro_batch_size": "train_micro_batch_size_per_gpu in the deepspeed_config JSON",
    "train.grad_accum": "gradient_accumulation_steps in the deepspeed_config JSON",
    "optim.grad_clip": "gradient_clipping in the deepspeed_config JSON",
}


def load_config(argv: list[str]) -> RunConfig:
    """Build the config from `--config FILE` (optional) and `--dotted.key value` overrides."""
    cfg = build_config(RunConfig, argv, HINTS)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    check_choices(cfg)
    check_optim(cfg.optim, sorted(OPTIMIZERS))
    check_data(cfg.data)
    check_train_args(cfg.train)
    require(cfg.train.eval_windows > 0, "train.eval_windows", "must be positive")
    check_checkpoint(cfg.checkpoint)
    require(cfg.collective_timeout_s > 0, "collective_timeout_s", "must be positive (seconds)")
    load_ds_config(cfg.deepspeed_config)  # a bad ds_config is a config error too


# --------------------------------------------------------------------------- resume

# Keys that describe this invocation, not the run: never taken from a checkpoint.
INVOCATION_KEYS = ("name", "run_dir", "resume", "backend")
# What a checkpoint's weights and data position depend on: a resumed run cannot change them.
FIXED_ON_RESUME = ("model.preset", "data.tokenizer", "data.seq_len")


def resumed_config(saved: dict[str, Any], current: RunConfig, given: set[str] | None) -> tuple[RunConfig, dict]:
    """The config of a resumed run: the checkpoint's `saved` one, except the keys `given` now (in
    --config or on the command line; None: all keys), which win. Returns it and {key: (saved, now)} for each key
    that differs; ConfigError naming the key if one in FIXED_ON_RESUME differs."""
    keys = all_keys(RunConfig)
    saved_flat = {k: v for k, v in flatten(saved).items() if k in keys and k not in INVOCATION_KEYS}
    cfg = dataclasses.replace(current)
    for section in ("model", "data", "train", "optim", "checkpoint"):  # no nested object shared with current
        setattr(cfg, section, dataclasses.replace(getattr(current, section)))
    for key, value in saved_flat.items():
        if given is not None and key not in given:
            set_key(cfg, key, coerce(key, value, field_type(RunConfig, key)))
    changed = {k: (v, get_key(cfg, k)) for k, v in saved_flat.items()
               if coerce(k, v, field_type(RunConfig, k)) != get_key(cfg, k)}
    for key in FIXED_ON_RESUME:
        if key in changed:
            was, now = changed[key]
            raise ConfigError(f"config key '{key}' is {now!r} but the checkpoint was trained with "
                              f"{was!r}; it cannot change on resume: drop --{key}, or start a new "
                              f"run (another --run_dir, --resume none)")
    validate(cfg)
    return cfg, changed


def help_text() -> str:
    return config_help(RunConfig, "launch/pretrain.py", "YAML/JSON run config (configs/)")


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
