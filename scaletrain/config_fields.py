"""The config machinery every config section uses, with no scaletrain imports (a leaf): the error
type, a documented dataclass field, and the check that names a bad key."""
from __future__ import annotations

from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A bad config file, key, type or value; the message names the field and the fix."""


def doc(default: Any, text: str, choices: tuple | None = None):
    """A dataclass field with its documentation (and allowed values) attached."""
    meta = {"doc": text, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def require(cond: bool, key: str, msg: str) -> None:
    """A ConfigError naming the key when cond is false."""
    if not cond:
        raise ConfigError(f"config key '{key}' {msg}")
