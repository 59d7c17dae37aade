"""Precision from the DeepSpeed JSON, shared by the engines: bf16 'auto', and the block optimizer's
bf16 weights with fp32 masters of the blocks it trains."""
from __future__ import annotations

from typing import Any

import torch


def resolve_precision(ds_config: dict[str, Any]) -> dict[str, Any]:
    """bf16.enabled 'auto' (as in the HF integration) means: on where the device supports it."""
    ds = dict(ds_config)
    bf16 = dict(ds.get("bf16", {}))
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    ds["bf16"] = bf16
    return ds


def bf16_enabled(ds_config: dict[str, Any]) -> bool:
    return bool(ds_config.get("bf16", {}).get("enabled", False))


def use_bf16_weights(model, optimizer) -> None:
    """Cast the model to bf16 (parameters keep their identity, so the optimizer's references
    stay valid) and let the block optimizer keep fp32 masters of the blocks it trains."""
    model.to(torch.bfloat16)
    optimizer.use_master_weights()
