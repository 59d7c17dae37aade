"""Saving: every rank writes its part through DCP into `.tmp-step_*`, hashes its files; rank 0
writes the manifest last, renames the directory into place and replaces `latest` (the commit);
AsyncCheckpointer does the same on a background thread."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from scaletrain.checkpoint.files import (DCP_DIR, FORMAT_VERSION, PAUSE_BEFORE_COMMIT_ENV, STEP_DIR, CheckpointError,
                                         _fsync_dir, _numbers_as_tensors, _rank_files, _sha256, _torch_save,
                                         _write_atomic_text, rng_state)

log = logging.getLogger("scaletrain")


def _gather_to_main(obj: Any, rank: int, world: int, group=None) -> list[Any] | None:
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0 if group is None else dist.get_global_rank(group, 0), group=group)
    return out


def _barrier(world: int, group=None) -> None:
    if world > 1:
        dist.barrier(group=group)


class _Writer(FileSystemWriter):
    """DCP's file writer without the random save id in `.metadata`: the same state gives the same
    bytes (a blocking and a background save of one step have equal checksums)."""

    def storage_meta(self):
        return None


def _files_written(tmp: Path, rank: int) -> list[str]:
    """This rank's files: its DCP data files (`__<rank>_*`, DCP's naming), RNG, optimizer extra."""
    names = [str(f.relative_to(tmp)) for f in sorted((tmp / DCP_DIR).glob(f"__{rank}_*.distcp"))]
    names += [f for f in _rank_files(rank) if (tmp / f).is_file()]
    return names


def save_checkpoint(root: Path, step: int, *, rank: int, world_size: int, sharded: dict,
                    trainer_state: dict, config_text: str, ds_config: dict, keep_latest: int,
                    rng: dict | None = None, extra_shard: dict | None = None, group=None) -> Path:
    """Collective over `group` (default: all ranks): every rank calls it with its own `sharded`
    state (flat keys -> tensors or DTensors; see the module docstring), written through DCP.
    `extra_shard`: a small per-rank object for `optim_rank<r>.pt` (fine-tuning's ZO mask).
    Returns the committed directory. `rng` is the RNG state to store (default: the current one)."""
    t0 = time.perf_counter()
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that crashed
        (tmp / DCP_DIR).mkdir(parents=True)
    _barrier(world_size, group)

    optim_file, rng_file = _rank_files(rank)
    if extra_shard is not None:
        _torch_save(extra_shard, tmp / optim_file)
    _torch_save(rng if rng is not None else rng_state(), tmp / rng_file)
    with warnings.catch_warnings():  # one process: no_dist is meant, say nothing about it
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save(_numbers_as_tensors(sharded), storage_writer=_Writer(tmp / DCP_DIR), process_group=group,
                 no_dist=world_size == 1)
    written = _files_written(tmp, rank)
    if rank == 0:
        _torch_save(trainer_state, tmp / "trainer.pt")
        (tmp / "config.yaml").write_text(config_text)
        (tmp / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        written += [f"{DCP_DIR}/.metadata", "trainer.pt", "config.yaml", "ds_config.json"]
    sums = {f: {"sha256": _sha256(tmp / f), "bytes": (tmp / f).stat().st_size} for f in written}
    gathered = _gather_to_main(sums, rank, world_size, group)
    if rank == 0:
        _commit(root, tmp, final, step, world_size, {k: v for part in gathered for k, v in part.items()},
                keep_latest)
        size = sum(v["bytes"] for part in gathered for v in part.values())
        log.info("checkpoint %s: %.1f MiB in %.2fs", final, size / 2**20, time.perf_counter() - t0)
    _barrier(world_size, group)
    return final


def _commit(root: Path, tmp: Path, final: Path, step: int, world_size: int, files: dict,
            keep_latest: int) -> None:
    """Rank 0: manifest last inside the directory, then the atomic rename and `latest`."""
    pause_step, _, pause = os.environ.get(PAUSE_BEFORE_COMMIT_ENV, "-1:0").partition(":")
    pause = float(pause) if int(pause_step) == step else 0.0
    if pause:
        log.info("test hook: pausing %.1fs before committing %s", pause, final.name)
        time.sleep(pause)
    manifest = {"format": FORMAT_VERSION, "step": step, "world_size": world_size, "files": files}
    _write_atomic_text(tmp / "manifest.json", json.dumps(manifest, indent=2))
    if final.exists():  # a re-save of the same step: keep the old one until the new is in place
        old = root / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    _write_atomic_text(root / "latest", final.name + "\n")
    _prune(root, keep_latest)


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
    """`checkpoint.async_save`: copy this rank's part of the state on the training thread (the
    only stall), then write and commit it on a background thread while training goes on. The
    save's collectives (DCP's plan exchange, the checksum gather) run on a process group of their
    own, so they never interleave with training's. One save at a time: the next one (and the
    end of training) first waits for the previous."""

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
        for key in ("sharded", "trainer_state", "extra_shard"):
            kwargs[key] = _snapshot(kwargs.get(key))
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
