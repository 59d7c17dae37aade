"""The run configuration: typed, nested dataclasses, a YAML/JSON file, and dotted CLI overrides.

    python launch/pretrain.py --config configs/blockllm_paper.yaml --optim.lr 3e-3 --data.seq_len 256

Every field carries its documentation (`--help` prints it). DeepSpeed's own settings
(micro-batch, gradient accumulation, precision, ZeRO stage, clipping) are NOT here: they live
only in the JSON file named by `deepspeed_config`, so no knob exists in two places.

Bad input raises `ConfigError`, which names the field and, for a misspelt key, the closest
valid name; `launch/pretrain.py` turns it into exit code 2 before anything starts or is written.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scaletrain.config_fields import ConfigError, doc, require
from scaletrain.optim import OPTIMIZERS  # the registry is the one list of optimizer names
from scaletrain.optim.config import OptimConfig, check_optim

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ModelConfig:
    preset: str = doc("llama_9m", "Model size preset (GaLore's C4 study shapes).",
                      ("llama_9m", "llama_20m", "llama_60m", "llama_130m", "llama_350m",
                       "llama_1b", "llama_7b"))
    activation_checkpointing: bool = doc(False, "Recompute activations in backward to save memory.")
    compile: bool = doc(False, "torch.compile each decoder layer (as torchtitan). The layers share their "
                        "graphs; a graph is compiled per pattern of requires_grad: the block "
                        "optimizer's default (sign) mode needs three (training, and the selection "
                        "pass for the first and the other layers); with optim.inactive none each new pattern of "
                        "trainable tensors in a layer compiles once more, up to "
                        "torch._dynamo.config.recompile_limit, after which that layer runs eagerly.")


@dataclass
class DataConfig:
    source: str = doc("files", "'files': C4 JSON-lines shards at data.path; 'hub': stream "
                      "data.hub_name with `datasets` (needs network).", ("files", "hub"))
    path: str = doc("default", "C4 training shards: a .json/.json.gz file, a directory or a glob "
                    "(tokenized on the fly), or a directory written by tools/prepare_data.py "
                    "(memory-mapped); 'default' is the shipped 1,000-document C4 sample.")
    val_path: str = doc("default", "Held-out shards for eval loss (as data.path); 'default' is the "
                        "shipped, disjoint 1,000-document C4 validation sample.")
    hub_name: str = doc("allenai/c4", "Dataset name for data.source=hub.")
    tokenizer: str = doc("default", "'default' (shipped 8,192-piece model trained on the sample), "
                         "'llama32k' (shipped 32,000-piece Llama-style model), a sentencepiece "
                         ".model path, or a transformers tokenizer name (needs network).")
    seq_len: int = doc(256, "Tokens per training sequence (windows are seq_len + 1 tokens).")
    shuffle: bool = doc(False, "Prepared data.path only: serve each epoch's windows in a seeded "
                        "random order (every window once per epoch, the same for every world "
                        "size); false: stream order.")
    shuffle_seed: int = doc(0, "Seed of data.shuffle's order (each epoch gets its own order).")
    prefetch: int = doc(2, "Steps loaded ahead on a background thread while the current step "
                        "computes (pinned memory on CUDA); 0: load on the training thread.")
    verify_checksums: bool = doc(False, "Prepared data: hash every shard against the manifest at "
                                 "start-up (reads all of it); sizes are always checked.")


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


@dataclass
class TrainConfig(TrainArgs):
    eval_windows: int = doc(64, "Held-out sequences used per evaluation.")


@dataclass
class CheckpointConfig:
    every_steps: int = doc(1000, "Save a checkpoint every N steps (and always at the end); 0: only at the "
                           "end; -1: never (benchmarks).")
    keep_latest: int = doc(3, "Complete checkpoints kept (the oldest are deleted); at least 2.")
    async_save: bool = doc(False, "Write checkpoints on a background thread after copying the state "
                           "(training stalls only for the copy).")


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


# --------------------------------------------------------------------------- loading

def _all_keys(cls, prefix="") -> dict[str, dataclasses.Field]:
    keys = {}
    for f in dataclasses.fields(cls):
        hints = typing.get_type_hints(cls)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.update(_all_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = f
    return keys


def _unknown(key: str, valid, hints: dict[str, str] | None = None) -> ConfigError:
    hints = HINTS if hints is None else hints
    if key in hints:
        return ConfigError(f"unknown config key '{key}': use {hints[key]}")
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see --help for every key"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, typ) -> Any:
    """Convert a YAML or CLI value to the field's type, or say which field is wrong and why."""
    origin = typing.get_origin(typ) or typ
    if isinstance(value, str) and origin is not str:
        try:
            value = yaml.safe_load(value)  # '3e-3' -> float, 'true' -> bool, '[a, b]' -> list
        except yaml.YAMLError:
            pass
        if isinstance(value, str) and origin is float:
            try:
                value = float(value)  # YAML 1.1 reads '3e-3' as a string
            except ValueError:
                pass
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
        list: lambda v: isinstance(v, (list, tuple)) or v is None,
    }[origin]
    if not ok(value):
        raise ConfigError(f"config key '{key}' expects {origin.__name__}, got {value!r}")
    if origin is float:
        return float(value)
    if origin is str:
        return str(value)
    if origin is list:
        return [str(v) for v in (value or [])]
    return value


def _flatten(tree: dict, prefix="") -> dict[str, Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _set(cfg: RunConfig, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, leaf, value)


def load_config(argv: list[str]) -> RunConfig:
    """Build the config from `--config FILE` (optional) and `--dotted.key value` overrides."""
    cfg = build_config(RunConfig, argv, HINTS)
    validate(cfg)
    return cfg


def build_config(cls, argv: list[str], hints: dict[str, str]):
    """An instance of the config dataclass `cls` from `--config FILE` then `--dotted.key value`
    overrides, each value coerced to its field's type (ConfigError naming the key otherwise)."""
    keys = _all_keys(cls)
    file_values, overrides = _read_args(argv)
    cfg = cls()
    for key, value in list(file_values.items()) + overrides:
        if key not in keys:
            raise _unknown(key, keys, hints)
        _set(cfg, key, _coerce(key, value, _field_type(cls, key)))
    return cfg


def given_keys(argv: list[str]) -> set[str]:
    """The keys set explicitly, by `--config FILE` or on the command line (the rest are defaults)."""
    file_values, overrides = _read_args(argv)
    return set(file_values) | {key for key, _ in overrides}


def _read_args(argv: list[str]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """(values from the --config file, [(key, value) from the command line]), unchecked."""
    file_values: dict[str, Any] = {}
    overrides: list[tuple[str, str]] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --key value")
        key, sep, value = arg[2:].partition("=")
        if key == "local_rank":  # the deepspeed launcher appends --local_rank=N
            continue
        if not sep and not args:
            raise ConfigError(f"option --{key} needs a value")
        value = value if sep else args.pop(0)
        if key == "config":
            file_values = _read_config_file(value)
        else:
            overrides.append((key, value))
    return file_values, overrides


# Keys that describe this invocation, not the run: never taken from a checkpoint.
INVOCATION_KEYS = ("name", "run_dir", "resume", "backend")
# What a checkpoint's weights and data position depend on: a resumed run cannot change them.
FIXED_ON_RESUME = ("model.preset", "data.tokenizer", "data.seq_len")


def resumed_config(saved: dict[str, Any], current: RunConfig, given: set[str] | None) -> tuple[RunConfig, dict]:
    """The config of a resumed run: the checkpoint's `saved` one, except the keys `given` now (in
    --config or on the command line; None: all keys), which win. Returns it and {key: (saved, now)} for each key
    that differs; ConfigError naming the key if one in FIXED_ON_RESUME differs."""
    keys = _all_keys(RunConfig)
    saved_flat = {k: v for k, v in _flatten(saved).items() if k in keys and k not in INVOCATION_KEYS}
    cfg = dataclasses.replace(current)
    for section in ("model", "data", "train", "optim", "checkpoint"):  # no nested object shared with current
        setattr(cfg, section, dataclasses.replace(getattr(current, section)))
    for key, value in saved_flat.items():
        if given is not None and key not in given:
            _set(cfg, key, _coerce(key, value, _field_type(RunConfig, key)))
    changed = {k: (v, _get(cfg, k)) for k, v in saved_flat.items()
               if _coerce(k, v, _field_type(RunConfig, k)) != _get(cfg, k)}
    for key in FIXED_ON_RESUME:
        if key in changed:
            was, now = changed[key]
            raise ConfigError(f"config key '{key}' is {now!r} but the checkpoint was trained with "
                              f"{was!r}; it cannot change on resume: drop --{key}, or start a new "
                              f"run (another --run_dir, --resume none)")
    validate(cfg)
    return cfg, changed


def _field_type(cls, key: str):
    *parents, leaf = key.split(".")
    for p in parents:
        cls = typing.get_type_hints(cls)[p]
    return typing.get_type_hints(cls)[leaf]


def _read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file (run configs live in configs/)")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML/JSON: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys, got {type(tree).__name__}")
    return _flatten(tree)


# --------------------------------------------------------------------------- validation

def validate(cfg: RunConfig) -> None:
    check_choices(cfg)
    check_optim(cfg.optim, sorted(OPTIMIZERS))
    require(cfg.data.seq_len > 0, "data.seq_len", "must be positive")
    require(cfg.data.seq_len <= 1024, "data.seq_len", "must be <= 1024 (the presets' max positions)")
    require(cfg.data.prefetch >= 0, "data.prefetch", "must be >= 0 (0: no background loading)")
    require(not cfg.data.shuffle or _prepared_path(cfg.data), "data.shuffle",
            "needs data.path to be a directory written by tools/prepare_data.py (JSON shards and "
            "the Hub are read in stream order)")
    check_train_args(cfg.train)
    require(cfg.train.eval_windows > 0, "train.eval_windows", "must be positive")
    check_checkpoint(cfg.checkpoint)
    require(cfg.collective_timeout_s > 0, "collective_timeout_s", "must be positive (seconds)")
    load_ds_config(cfg.deepspeed_config)  # a bad ds_config is a config error too


def _prepared_path(data: DataConfig) -> bool:
    from scaletrain.data.prepared import is_prepared

    return data.source == "files" and data.path != "default" and is_prepared(data.path)


def check_choices(cfg) -> None:
    """Every field of a config dataclass that lists its choices holds one of them."""
    for key, f in _all_keys(type(cfg)).items():
        choices = f.metadata.get("choices")
        value = _get(cfg, key)
        if choices and value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"config key '{key}' is {value!r}{hint}; choose one of {list(choices)}")


def check_train_args(t: TrainArgs) -> None:
    """The train.* keys pretraining and fine-tuning share."""
    require(t.steps > 0, "train.steps", "must be positive")
    require(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    require(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
    require(t.eval_every >= 0, "train.eval_every", "must be >= 0")
    require(t.log_every > 0, "train.log_every", "must be positive")
    require(t.max_skipped_steps > 0, "train.max_skipped_steps", "must be positive")


def check_checkpoint(c: CheckpointConfig) -> None:
    require(c.every_steps >= -1, "checkpoint.every_steps", "must be >= -1 (0: only at the end; -1: never)")
    require(c.keep_latest >= 2, "checkpoint.keep_latest",
           "must be >= 2 (a crash while saving must leave a previous complete checkpoint)")


def _get(cfg: RunConfig, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


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


def help_text() -> str:
    return config_help(RunConfig, "launch/pretrain.py", "YAML/JSON run config (configs/)")


def config_help(cls, script: str, config_file: str) -> str:
    """Every key of the config dataclass `cls` with its default, choices and documentation."""
    lines = [f"usage: {script} [--config FILE] [--key value ...]", "",
             f"  --config FILE  {config_file}; later --key value pairs override it", ""]
    defaults = cls()
    for key, f in _all_keys(cls).items():
        choices = f.metadata.get("choices")
        extra = f" [{'|'.join(choices)}]" if choices else ""
        lines.append(f"  --{key} (default {_get(defaults, key)!r}){extra}\n      {f.metadata.get('doc', '')}")
    return "\n".join(lines)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
