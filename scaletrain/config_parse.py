"""The machinery that turns `--config FILE` and `--dotted.key value` arguments into any config
dataclass (pretraining's RunConfig, fine-tuning's FinetuneConfig): key lookup with a hint for a
misspelt key, type coercion, choice checks and the `--help` text. It knows no config section."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from scaletrain.config_fields import ConfigError


def all_keys(cls, prefix="") -> dict[str, dataclasses.Field]:
    """{dotted key: its dataclass field} for every leaf of the config dataclass `cls`."""
    keys = {}
    for f in dataclasses.fields(cls):
        hints = typing.get_type_hints(cls)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.update(all_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = f
    return keys


def unknown_key(key: str, valid, hints: dict[str, str]) -> ConfigError:
    if key in hints:
        return ConfigError(f"unknown config key '{key}': use {hints[key]}")
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see --help for every key"
    return ConfigError(f"unknown config key '{key}'{hint}")


def coerce(key: str, value: Any, typ) -> Any:
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


def flatten(tree: dict, prefix="") -> dict[str, Any]:
    """A nested mapping as {dotted key: leaf value}."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def set_key(cfg, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, leaf, value)


def get_key(cfg, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def field_type(cls, key: str):
    *parents, leaf = key.split(".")
    for p in parents:
        cls = typing.get_type_hints(cls)[p]
    return typing.get_type_hints(cls)[leaf]


def build_config(cls, argv: list[str], hints: dict[str, str]):
    """An instance of the config dataclass `cls` from `--config FILE` then `--dotted.key value`
    overrides, each value coerced to its field's type (ConfigError naming the key otherwise)."""
    keys = all_keys(cls)
    file_values, overrides = _read_args(argv)
    cfg = cls()
    for key, value in list(file_values.items()) + overrides:
        if key not in keys:
            raise unknown_key(key, keys, hints)
        set_key(cfg, key, coerce(key, value, field_type(cls, key)))
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
    return flatten(tree)


def check_choices(cfg) -> None:
    """Every field of a config dataclass that lists its choices holds one of them."""
    for key, f in all_keys(type(cfg)).items():
        choices = f.metadata.get("choices")
        value = get_key(cfg, key)
        if choices and value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"config key '{key}' is {value!r}{hint}; choose one of {list(choices)}")


def config_help(cls, script: str, config_file: str) -> str:
    """Every key of the config dataclass `cls` with its default, choices and documentation."""
    lines = [f"usage: {script} [--config FILE] [--key value ...]", "",
             f"  --config FILE  {config_file}; later --key value pairs override it", ""]
    defaults = cls()
    for key, f in all_keys(cls).items():
        choices = f.metadata.get("choices")
        extra = f" [{'|'.join(choices)}]" if choices else ""
        lines.append(f"  --{key} (default {get_key(defaults, key)!r}){extra}\n      {f.metadata.get('doc', '')}")
    return "\n".join(lines)
