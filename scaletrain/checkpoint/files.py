"""The checkpoint format's fixed parts: version, directory names, errors, durable file writes,
the per-rank file names, numbers stored as tensors, and the RNG state every rank saves."""
from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

# 2: sharded (torch.distributed.checkpoint); 1: model.safetensors + optim_rank*.pt (gathered)
FORMAT_VERSION = 2
DCP_DIR = "dcp"
STEP_DIR = re.compile(r"^step_(\d{8})$")
# Fault-injection hook for tests: "STEP:SECONDS" holds the save of STEP open between writing
# its files and committing them, so a test can kill the run mid-save.
PAUSE_BEFORE_COMMIT_ENV = "SCALETRAIN_TEST_PAUSE_BEFORE_COMMIT"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and what is wrong."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint written in another format: never skipped silently for an older one."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- RNG

def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain numbers, loadable with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss),
        "python_version": version, "python_state": list(py_state), "python_gauss": py_gauss,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(state["python_state"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- save

def _rank_files(rank: int) -> tuple[str, str]:
    return f"optim_rank{rank:05d}.pt", f"rng_rank{rank:05d}.pt"



def _numbers_as_tensors(flat: dict) -> dict:
    """Python numbers become 0-d float64 tensors under `<key>:float`, so every value in the shard
    files is a tensor (nothing pickled there; DCP's own `.metadata` is its format)."""
    return {(f"{k}:float" if not torch.is_tensor(v) else k): (v if torch.is_tensor(v) else
                                                              torch.tensor(float(v), dtype=torch.float64))
            for k, v in flat.items()}


def _tensors_as_numbers(flat: dict) -> dict:
    return {(k[:-6] if k.endswith(":float") else k): (float(v) if k.endswith(":float") else v)
            for k, v in flat.items()}
