"""Finding and reading: verify a checkpoint against its manifest (the ranks share the hashing),
find the newest intact one for `--resume auto`, and read any subset of its DCP state into this
process only (SavedState), plus the trainer state and this rank's RNG."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from scaletrain.checkpoint.files import (DCP_DIR, FORMAT_VERSION, STEP_DIR, CheckpointError, CheckpointFormatError,
                                         _rank_files, _sha256, _tensors_as_numbers, set_rng_state)
from scaletrain.checkpoint.pieces import index_pieces, read_range, whole_shape
from scaletrain.checkpoint.row_reads import read_flat

log = logging.getLogger("scaletrain")


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
    tensors land on the CPU unless a target on another device is given). Dense state saved as
    pieces (pieces.py: DeepSpeed ZeRO-1/2's per-rank ranges) is one key in `keys`, and reads
    of it give the whole tensor or the asked-for elements, whoever saved it."""

    def __init__(self, path: Path):
        self.dir = path / DCP_DIR
        self.metadata = FileSystemReader(str(self.dir)).read_metadata()
        self.meta = self.metadata.state_dict_metadata
        self.pieces = index_pieces(self.meta)  # state key -> its saved pieces
        in_pieces = {p.key for ps in self.pieces.values() for p in ps}
        self.keys = {k[:-6] if k.endswith(":float") else k for k in self.meta if k not in in_pieces}
        self.keys |= set(self.pieces)

    def empty(self, key: str) -> Any:
        """A CPU tensor of the saved size and dtype to read `key` into."""
        md = self.meta[key]
        return torch.empty(tuple(md.size), dtype=md.properties.dtype)

    def _check_saved(self, keys) -> None:
        """Each key is in `keys`, or is a saved DCP key as such (a piece's own key)."""
        missing = [k for k in keys if k not in self.keys and k not in self.meta]
        if missing:
            raise CheckpointError(f"{self.dir.parent}: no saved {missing[0]!r} ({len(missing)} "
                                  f"missing; saved with another optimizer or model?)")

    def read(self, targets: dict) -> dict:
        """Fill `targets` (key -> tensor/DTensor of the saved shape, or None for a fresh CPU
        tensor) from the checkpoint; returns them with numbers restored."""
        self._check_saved(targets)
        flat = {}
        for k, v in targets.items():
            if k not in self.pieces:
                key = k if k in self.meta else f"{k}:float"
                flat[key] = self.empty(key) if v is None else v
        if flat:
            with warnings.catch_warnings():  # no_dist is meant: say nothing about it
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(flat, storage_reader=FileSystemReader(str(self.dir)), no_dist=True)
        got = _tensors_as_numbers(flat)
        return {k: self._whole(k, v) if k in self.pieces else got[k] for k, v in targets.items()}

    def _whole(self, key: str, target) -> torch.Tensor:
        """The state tensor `key` assembled from all its pieces, into `target` if given."""
        shape = whole_shape(key, self.meta)
        whole = read_range(self._read_flat_saved, key, self.pieces[key], 0, shape.numel()).view(shape)
        return whole if target is None else _fill(target, whole)

    def read_flat(self, ranges: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
        """{key: (start, stop)} -> {key: the saved tensor's flattened elements [start, stop)},
        reading only what holds them: the overlapping pieces (of a tensor saved as pieces), or
        the overlapping saved chunks (row_reads.py), each whole, then taking the elements."""
        self._check_saved(ranges)
        got = self._read_flat_saved({k: r for k, r in ranges.items() if k not in self.pieces})
        for k, (start, stop) in ranges.items():
            if k in self.pieces:
                got[k] = read_range(self._read_flat_saved, k, self.pieces[k], start, stop)
        return got

    def _read_flat_saved(self, ranges: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
        """read_flat of keys as saved in DCP (a piece's own key, or a tensor's)."""
        return read_flat(FileSystemReader(str(self.dir)), self.metadata, ranges) if ranges else {}

    def read_prefix(self, prefix: str) -> dict:
        """Everything saved under `prefix`, keys without it (whole tensors, on the CPU)."""
        got = self.read({k: None for k in sorted(self.keys) if k.startswith(prefix)})
        return {k[len(prefix):]: v for k, v in got.items()}


def _fill(target, whole: torch.Tensor):
    """Copy the whole tensor into `target`: a tensor, or a DTensor (its own shard of it, cut out
    by each rank alone: src_data_rank=None, no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        mine = distribute_tensor(whole.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(mine.to_local())
    else:
        target.copy_(whole)
    return target


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
