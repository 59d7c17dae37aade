"""Checkpoints that survive a crash at any moment, and find the newest good one on resume.

Layout (`<run_dir>/checkpoints/`):

    step_00000100/
        model.safetensors        full weights (rank 0; every rank holds them at ZeRO stage <= 2)
        optim_rank00000.pt       this rank's optimizer shard: tensors and plain numbers, keyed by
                                 parameter name (never by position, never pickled objects)
        rng_rank00000.pt         torch / numpy / python RNG states of that rank
        trainer.pt               step, LR-schedule state, data-loader position (global)
        config.yaml, ds_config.json
        manifest.json            written last inside the directory: sha256 and size of every file
    latest                       name of the newest committed checkpoint, replaced atomically

A save writes into `.tmp-step_...`, every rank reports its files' checksums to rank 0, rank 0
writes the manifest, renames the directory into place (atomic on POSIX), then replaces
`latest`. A crash before the rename leaves only a `.tmp-*` directory, which resume ignores; a
crash after it leaves a complete checkpoint. On resume every candidate is verified against its
manifest; a bad one is named in the log and the previous complete one is used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

log = logging.getLogger("scaletrain")

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step_(\d{8})$")
# Fault-injection hook for tests: "STEP:SECONDS" holds the save of STEP open between writing
# its files and committing them, so a test can kill the run mid-save.
PAUSE_BEFORE_COMMIT_ENV = "SCALETRAIN_TEST_PAUSE_BEFORE_COMMIT"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and what is wrong."""


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


def _gather_to_main(obj: Any, rank: int, world: int, group=None) -> list[Any] | None:
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0 if group is None else dist.get_global_rank(group, 0), group=group)
    return out


def _barrier(world: int, group=None) -> None:
    if world > 1:
        dist.barrier(group=group)


def save_checkpoint(root: Path, step: int, *, rank: int, world_size: int, model_state: dict,
                    optim_shard: dict, trainer_state: dict, config_text: str, ds_config: dict,
                    keep_latest: int, rng: dict | None = None, group=None) -> Path:
    """Collective over `group` (default: all ranks): every rank calls it. Returns the committed
    directory. `rng` is the RNG state to store (default: the current one)."""
    t0 = time.perf_counter()
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that crashed
        tmp.mkdir()
    _barrier(world_size, group)

    written = []
    optim_file, rng_file = _rank_files(rank)
    _torch_save(optim_shard, tmp / optim_file)
    _torch_save(rng if rng is not None else rng_state(), tmp / rng_file)
    written += [optim_file, rng_file]
    if rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _torch_save(trainer_state, tmp / "trainer.pt")
        (tmp / "config.yaml").write_text(config_text)
        (tmp / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        written += ["model.safetensors", "trainer.pt", "config.yaml", "ds_config.json"]
    sums = {f: {"sha256": _sha256(tmp / f), "bytes": (tmp / f).stat().st_size} for f in written}
    gathered = _gather_to_main(sums, rank, world_size, group)

    if rank == 0:
        files = {k: v for part in gathered for k, v in part.items()}
        pause_step, _, pause = os.environ.get(PAUSE_BEFORE_COMMIT_ENV, "-1:0").partition(":")
        pause = float(pause) if int(pause_step) == step else 0.0
        if pause:
            log.info("test hook: pausing %.1fs before committing %s", pause, name)
            time.sleep(pause)
        manifest = {"format": FORMAT_VERSION, "step": step, "world_size": world_size, "files": files}
        _write_atomic_text(tmp / "manifest.json", json.dumps(manifest, indent=2))
        if final.exists():  # a re-save of the same step: keep the old one until the new is in place
            old = root / f".old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        _write_atomic_text(root / "latest", name + "\n")
        _prune(root, keep_latest)
        size = sum(v["bytes"] for v in files.values())
        log.info("checkpoint %s: %.1f MiB in %.2fs", final, size / 2**20, time.perf_counter() - t0)
    _barrier(world_size, group)
    return final


def _snapshot(obj: Any) -> Any:
    """A deep copy whose tensors are private CPU copies: training may change the originals."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


class AsyncCheckpointer:
    """`checkpoint.async_save`: copy the state on the training thread (the only stall), then
    write and commit it on a background thread while training goes on. The commit's collectives
    run on a process group of their own, so they never interleave with training's. One save at
    a time: the next one (and the end of training) first waits for the previous."""

    def __init__(self, world_size: int, timeout_s: float | None = None):
        import threading
        from datetime import timedelta

        self._threading = threading
        self.thread = None
        self.error: BaseException | None = None
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        self.group = dist.new_group(backend="gloo", timeout=timeout) if world_size > 1 else None

    def save(self, root: Path, step: int, **kwargs) -> None:
        self.wait()
        t0 = time.perf_counter()
        for key in ("model_state", "optim_shard", "trainer_state"):
            kwargs[key] = _snapshot(kwargs[key])
        kwargs["rng"] = rng_state()
        log.info("checkpoint step %d: state copied in %.2fs, writing in the background",
                 step, time.perf_counter() - t0)

        def run():
            try:
                save_checkpoint(root, step, group=self.group, **kwargs)
            except BaseException as e:  # reported by the next wait(), never lost
                self.error = e

        self.thread = self._threading.Thread(target=run, name=f"checkpoint-{step}", daemon=False)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise CheckpointError(f"background checkpoint save failed: {error}") from error

    def close(self) -> None:
        """Wait for a save in flight and log (not raise) its failure: the run is already ending."""
        try:
            self.wait()
        except CheckpointError as e:
            log.error("%s", e)


def _prune(root: Path, keep: int) -> None:
    steps = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name)), key=lambda p: p.name)
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- find and verify

def verify(path: Path) -> dict:
    """The manifest of a complete, intact checkpoint; CheckpointError naming the fault otherwise."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: incomplete (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}/manifest.json: corrupt ({e})") from None
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{f}: truncated or altered ({f.stat().st_size} bytes, "
                                  f"manifest says {meta['bytes']})")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: checksum mismatch (corrupt)")
    return manifest


def _candidates(root: Path) -> list[Path]:
    steps = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name)), key=lambda p: p.name,
                   reverse=True)
    latest = root / "latest"
    if latest.is_file():
        named = root / latest.read_text().strip()
        steps = [named] + [p for p in steps if p != named]
    return steps


def find_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """'none' -> None; 'auto' -> newest intact checkpoint under run_dir (or None); else that path."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if path.is_dir() and not (path / "manifest.json").exists() and (path / "latest").is_file():
            path = path / (path / "latest").read_text().strip()  # a checkpoints/ root was given
        verify(path)
        return path
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    for path in _candidates(root):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    raise CheckpointError(f"--resume auto: no intact checkpoint under {root}; "
                          f"use --resume none to start afresh (a new --run_dir keeps this one)")


# --------------------------------------------------------------------------- load

def load_model_state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def load_trainer_state(path: Path) -> dict:
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)


def load_optim_shards(path: Path) -> list[dict]:
    """Every rank's saved optimizer shard, in rank order (a new world size reads them all), on
    the CPU whatever device saved it; each optimizer moves what it keeps to its own device."""
    manifest = json.loads((path / "manifest.json").read_text())
    return [torch.load(path / _rank_files(r)[0], map_location="cpu", weights_only=True)
            for r in range(manifest["world_size"])]


def load_rng_state(path: Path, rank: int) -> bool:
    """Restore this rank's RNG if the checkpoint has one for it (same or larger world size)."""
    f = path / _rank_files(rank)[1]
    if not f.is_file():
        return False
    set_rng_state(torch.load(f, map_location="cpu", weights_only=True))
    return True


# --------------------------------------------------------------------------- state by name

def _is_sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP2 DTensors


def model_state(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """Full weights on rank 0 (a collective gather when the model is sharded), {} elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if rank == 0 else {}


def restore_model(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=_is_sharded(model)))


def optimizer_shard(optimizer, model: torch.nn.Module, rank: int) -> dict:
    """This rank's optimizer state keyed by parameter name.

    Optimizers that key their state by name themselves (the block optimizer) give their own
    `state_dict()`. A dense torch optimizer's state comes from torch.distributed.checkpoint's
    state-dict API, keyed by parameter name and gathered in full (FSDP shards included); it is
    the same on every rank, so rank 0 writes it once."""
    if getattr(optimizer, "state_keyed_by_name", False):
        return {"kind": "named", "state": optimizer.state_dict()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"kind": "torch", **full} if rank == 0 else {"kind": "torch", "replica_of_rank": 0}


def full_optimizer_state(model: torch.nn.Module, shards: list[dict], optimizer_name: str = "AdamW") -> dict:
    """The full, name-keyed state of a dense optimizer (written once, by rank 0), checked
    against the model."""
    kinds = {s["kind"] for s in shards}
    if kinds != {"torch"}:
        raise CheckpointError(f"checkpoint optimizer state is {kinds}; this run uses "
                              f"{optimizer_name}: resume with the same optim.name")
    full = {k: v for k, v in shards[0].items() if k != "kind"}
    names = {n for n, _ in model.named_parameters()}
    saved = set(full["param_groups"][0]["params"]) if full["param_groups"] else set()
    if saved != names:
        raise CheckpointError("checkpoint optimizer parameters do not match the model "
                              "(a different model.preset?)")
    return full


def restore_optimizer(optimizer, model: torch.nn.Module, shards: list[dict]) -> None:
    """Load the saved shards (all ranks' files, in rank order) into this rank's optimizer."""
    kinds = {s["kind"] for s in shards}
    if getattr(optimizer, "state_keyed_by_name", False):
        if kinds != {"named"}:
            raise CheckpointError(f"checkpoint optimizer state is {kinds}, the run's optimizer "
                                  f"{type(optimizer).__name__} needs name-keyed block state")
        optimizer.load_state_dict_shards([s["state"] for s in shards])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    full = full_optimizer_state(model, shards, type(optimizer).__name__)
    set_optimizer_state_dict(model, optimizer, full,
                             options=StateDictOptions(full_state_dict=_is_sharded(model)))
