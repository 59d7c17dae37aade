"""Checkpoints that survive a crash at any moment, and find the newest good one on resume.

Layout (`<run_dir>/checkpoints/`):

    step_00000100/
        dcp/                     torch.distributed.checkpoint (DCP): every rank writes its own
            __<rank>_0.distcp    part of the weights ("model/<name>") and optimizer state
            .metadata            ("optim/..."); replicated tensors (weights at ZeRO <= 2) are
                                 written once (DCP's dedup spreads them over the ranks), FSDP2
                                 DTensors and block-optimizer state (by its owner) sharded
        rng_rank00000.pt         torch / numpy / python RNG states of that rank
        trainer.pt               step, LR-schedule state, data-loader position, optimizer
                                 metadata (kind, param groups, block selection): global, small
        config.yaml, ds_config.json
        manifest.json            written last inside the directory: sha256 and size of every file
    latest                       name of the newest committed checkpoint, replaced atomically

A save writes into `.tmp-step_...`; each rank hashes the files it wrote and sends that short
list to rank 0, which writes the manifest, renames the directory into place (atomic on POSIX),
then replaces `latest`. A crash before the rename leaves only a `.tmp-*` directory, which resume
ignores; a crash after it leaves a complete checkpoint. On resume every candidate is verified
against its manifest (each rank hashes a share of the files); a bad one is named in the log and
the previous complete one is used. At load each rank reads only the tensors it needs (DCP
reshards to the new world size and backend); no collective is needed. The exception is dense
AdamW under DeepSpeed ZeRO-1/2: its flat fragments do not map onto DCP's row chunks, so each
rank reads every parameter's whole state, one parameter at a time, and keeps its fragment.
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
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

log = logging.getLogger("scaletrain")

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


def _numbers_as_tensors(flat: dict) -> dict:
    """Python numbers become 0-d float64 tensors under `<key>:float`, so every value in the shard
    files is a tensor (nothing pickled there; DCP's own `.metadata` is its format)."""
    return {(f"{k}:float" if not torch.is_tensor(v) else k): (v if torch.is_tensor(v) else
                                                              torch.tensor(float(v), dtype=torch.float64))
            for k, v in flat.items()}


def _tensors_as_numbers(flat: dict) -> dict:
    return {(k[:-6] if k.endswith(":float") else k): (float(v) if k.endswith(":float") else v)
            for k, v in flat.items()}


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


# --------------------------------------------------------------------------- find and verify

def _read_manifest(path: Path) -> dict:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: incomplete (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}/manifest.json: corrupt ({e})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path}: checkpoint format {manifest.get('format')}, this scaletrain reads format "
            f"{FORMAT_VERSION} (sharded, torch.distributed.checkpoint). Resume or export it with the "
            f"scaletrain it was written by (format 1: before commit 'DCP checkpoints', e.g. "
            f"git checkout 3415d4d), or start afresh with --resume none")
    return manifest


def verify(path: Path, rank: int = 0, world_size: int = 1) -> dict:
    """The manifest of a complete, intact checkpoint; CheckpointError naming the fault otherwise.
    With world_size > 1 this rank hashes only every world_size-th file (its share)."""
    manifest = _read_manifest(path)
    for i, (name, meta) in enumerate(sorted(manifest["files"].items())):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{f}: truncated or altered ({f.stat().st_size} bytes, "
                                  f"manifest says {meta['bytes']})")
        if i % world_size == rank and _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: checksum mismatch (corrupt)")
    return manifest


def _verify_together(path: Path, rank: int, world_size: int) -> None:
    """Collective verify: each rank hashes its share; any rank's fault is raised on all."""
    try:
        verify(path, rank, world_size)
        error = None
    except CheckpointError as e:
        error = (isinstance(e, CheckpointFormatError), str(e))
    errors = [error]
    if world_size > 1:
        errors = [None] * world_size
        dist.all_gather_object(errors, error)
    for fault in errors:
        if fault is not None:
            raise (CheckpointFormatError if fault[0] else CheckpointError)(fault[1])


def _candidates(root: Path) -> list[Path]:
    steps = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name)), key=lambda p: p.name,
                   reverse=True)
    latest = root / "latest"
    if latest.is_file():
        named = root / latest.read_text().strip()
        steps = [named] + [p for p in steps if p != named]
    return steps


def _agreed(value: Any, rank: int, world_size: int) -> Any:
    """Rank 0's value on every rank (all ranks must look at the same candidates)."""
    if world_size == 1:
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def find_checkpoint(resume: str, run_dir: Path, rank: int = 0, world_size: int = 1) -> Path | None:
    """'none' -> None; 'auto' -> newest intact checkpoint under run_dir (or None); else that path.
    Collective when world_size > 1: the ranks share the hashing."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if path.is_dir() and not (path / "manifest.json").exists() and (path / "latest").is_file():
            path = path / (path / "latest").read_text().strip()  # a checkpoints/ root was given
        _verify_together(path, rank, world_size)
        return path
    root = run_dir / "checkpoints"
    candidates = _agreed(_candidates(root) if root.is_dir() else None, rank, world_size)
    if candidates is None:
        return None
    for path in candidates:
        try:
            _verify_together(path, rank, world_size)
            return path
        except CheckpointFormatError:
            raise
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    raise CheckpointError(f"--resume auto: no intact checkpoint under {root}; "
                          f"use --resume none to start afresh (a new --run_dir keeps this one)")


# --------------------------------------------------------------------------- load

class SavedState:
    """The DCP part of a checkpoint: what was saved (read once from `.metadata`) and a reader
    for any subset of it, into this process only (no collective: each rank reads what it needs;
    tensors land on the CPU unless a target on another device is given)."""

    def __init__(self, path: Path):
        self.dir = path / DCP_DIR
        self.meta = FileSystemReader(str(self.dir)).read_metadata().state_dict_metadata
        self.keys = {k[:-6] if k.endswith(":float") else k for k in self.meta}

    def empty(self, key: str) -> Any:
        """A CPU tensor of the saved size and dtype to read `key` into."""
        md = self.meta[key]
        return torch.empty(tuple(md.size), dtype=md.properties.dtype)

    def read(self, targets: dict) -> dict:
        """Fill `targets` (key -> tensor/DTensor of the saved shape, or None for a fresh CPU
        tensor) from the checkpoint; returns them with numbers restored."""
        missing = [k for k in targets if k not in self.keys]
        if missing:
            raise CheckpointError(f"{self.dir.parent}: no saved {missing[0]!r} ({len(missing)} "
                                  f"missing; saved with another optimizer or model?)")
        flat = {}
        for k, v in targets.items():
            key = k if k in self.meta else f"{k}:float"
            flat[key] = self.empty(key) if v is None else v
        if flat:
            with warnings.catch_warnings():  # no_dist is meant: say nothing about it
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(flat, storage_reader=FileSystemReader(str(self.dir)), no_dist=True)
        return _tensors_as_numbers(flat)

    def read_prefix(self, prefix: str) -> dict:
        """Everything saved under `prefix`, keys without it (whole tensors, on the CPU)."""
        got = self.read({k: None for k in sorted(self.keys) if k.startswith(prefix)})
        return {k[len(prefix):]: v for k, v in got.items()}


def load_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The full weights, read offline on the CPU (export, fine-tuning's starting point)."""
    return SavedState(path).read_prefix("model/")


def load_trainer_state(path: Path) -> dict:
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)


def load_rng_state(path: Path, rank: int) -> bool:
    """Restore this rank's RNG if the checkpoint has one for it (same or larger world size)."""
    f = path / _rank_files(rank)[1]
    if not f.is_file():
        return False
    set_rng_state(torch.load(f, map_location="cpu", weights_only=True))
    return True


# --------------------------------------------------------------------------- state by name

def _resharded(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 leaves the root module's parameters unsharded after a no-grad forward (evaluation):
    reshard them so that the parameters are the sharded DTensors the optimizer knows."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return model


def model_shard(model: torch.nn.Module) -> dict:
    """This rank's weights for DCP: the parameters themselves (replicated: DCP writes each once)
    or, under FSDP2, this rank's DTensor shards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {f"model/{k}": v for k, v in get_model_state_dict(_resharded(model)).items()}


def restore_model(model: torch.nn.Module, saved: SavedState) -> None:
    """Read the weights this rank holds (its shards under FSDP2) straight into the model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    current = get_model_state_dict(_resharded(model))
    got = saved.read({f"model/{k}": v for k, v in current.items()})
    set_model_state_dict(model, {k: got[f"model/{k}"] for k in current})


def _flatten(prefix: str, tree: dict) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(f"{prefix}{k}/", v))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def optimizer_shard(optimizer, model: torch.nn.Module) -> tuple[dict, dict]:
    """(this rank's optimizer tensors for DCP under "optim/", global metadata for trainer.pt).

    The block optimizer gives the blocks it owns (`checkpoint_blocks`); other name-keyed
    optimizers (galore_torch) hold replicated state, which DCP writes once. A dense torch
    optimizer's state comes from torch.distributed.checkpoint's state-dict API, keyed by
    parameter name: replicated, or DTensor shards under FSDP2."""
    if hasattr(optimizer, "checkpoint_blocks"):
        return ({f"optim/{k}": v for k, v in optimizer.checkpoint_blocks().items()},
                {"kind": "named", **optimizer.checkpoint_meta()})
    if getattr(optimizer, "state_keyed_by_name", False):
        return _flatten("optim/", optimizer.state_dict()), {"kind": "named"}
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(_resharded(model), optimizer)
    return _flatten("optim/state/", full["state"]), {"kind": "torch", "param_groups": full["param_groups"]}


def _check_kind(meta: dict, want: str, optimizer_name: str) -> None:
    if meta["kind"] != want:
        raise CheckpointError(f"checkpoint optimizer state is {meta['kind']!r}; this run's optimizer "
                              f"{optimizer_name} needs {want!r}: resume with the same optim.name")


def dense_optimizer_states(model: torch.nn.Module, saved: SavedState, meta: dict,
                           optimizer_name: str = "AdamW"):
    """(parameter name, its whole saved state) for each parameter of a dense optimizer, read one
    parameter at a time (DeepSpeed ZeRO-1/2 keeps its own fragment of each, so a rank never holds
    more than one parameter's state extra); checked against the model first."""
    _check_kind(meta, "torch", optimizer_name)
    keys: dict[str, list[str]] = {}
    for k in saved.keys:
        if k.startswith("optim/state/"):
            name, key = k[len("optim/state/"):].rsplit("/", 1)
            keys.setdefault(name, []).append(key)
    if keys and set(keys) != {n for n, _ in model.named_parameters()}:
        raise CheckpointError("checkpoint optimizer parameters do not match the model "
                              "(a different model.preset?)")
    for name in keys:
        got = saved.read({f"optim/state/{name}/{k}": None for k in keys[name]})
        yield name, {k.rsplit("/", 1)[1]: v for k, v in got.items()}


def restore_optimizer(optimizer, model: torch.nn.Module, saved: SavedState, meta: dict) -> None:
    """Load into this rank's optimizer the state it holds, read from the checkpoint."""
    name = type(optimizer).__name__
    if hasattr(optimizer, "checkpoint_blocks"):
        _check_kind(meta, "named", name)
        optimizer.load_checkpoint(meta, saved, "optim/")
        return
    if getattr(optimizer, "state_keyed_by_name", False):
        _check_kind(meta, "named", name)
        optimizer.load_state_dict_shards([_unflatten(saved.read_prefix("optim/"))])
        return
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    _check_kind(meta, "torch", name)
    current = get_optimizer_state_dict(_resharded(model), optimizer)["state"]  # torch builds its lazy state here
    got = _unflatten(saved.read(_flatten("optim/state/", current)))["optim"]["state"]
    if set(got) != set(current):
        raise CheckpointError("checkpoint optimizer parameters do not match the model")
    set_optimizer_state_dict(model, optimizer, {"state": got, "param_groups": meta["param_groups"]})
