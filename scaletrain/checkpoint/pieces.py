"""Dense optimizer state saved as 1-D pieces: "optim/state/<name>/<key>@<start>-<stop>" holds the
elements [start, stop) of that state tensor flattened. DeepSpeed ZeRO-1/2 keeps a contiguous range
of each flattened parameter per rank, so each rank writes its own range as is (no gather at save);
a reader takes from the pieces the elements it needs, or the whole tensor (placed by range, viewed
as the parameter's shape, which the saved weight "model/<name>" has)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from scaletrain.checkpoint.files import CheckpointError

DENSE_STATE = "optim/state/"  # only dense state is pieced (the block state's "@" are row ranges)
_PIECE = re.compile(r"^(?P<key>.+)@(?P<start>\d+)-(?P<stop>\d+)$")


def piece_key(key: str, start: int, stop: int) -> str:
    """The DCP key of the elements [start, stop) of the flattened state tensor `key`."""
    return f"{key}@{start}-{stop}"


@dataclass(frozen=True)
class Piece:
    start: int
    stop: int
    key: str  # its own DCP key


def index_pieces(saved_keys) -> dict[str, list[Piece]]:
    """state key -> its saved pieces in order, for the dense state keys saved as pieces."""
    found: dict[str, list[Piece]] = {}
    for k in saved_keys:
        m = _PIECE.match(k) if k.startswith(DENSE_STATE) else None
        if m:
            found.setdefault(m["key"], []).append(Piece(int(m["start"]), int(m["stop"]), k))
    return {k: sorted(ps, key=lambda p: p.start) for k, ps in found.items()}


def overlapping(pieces: list[Piece], start: int, stop: int) -> list[Piece]:
    return [p for p in pieces if p.start < stop and p.stop > start]


def check_cover(key: str, pieces: list[Piece], start: int, stop: int) -> None:
    """CheckpointError unless `pieces` (in order) hold every element of [start, stop) once."""
    at = start
    for i, p in enumerate(overlapping(pieces, start, stop)):
        if p.start > at or (i > 0 and p.start < at):
            raise CheckpointError(f"{key}: its saved pieces leave out or repeat elements near {at} "
                                  f"(pieces {[(q.start, q.stop) for q in pieces]})")
        at = p.stop
    if at < stop:
        raise CheckpointError(f"{key}: its saved pieces hold elements only up to {at} of [{start}, {stop})")


def whole_shape(key: str, saved_meta: dict) -> torch.Size:
    """The shape of the whole state tensor `key` ("optim/state/<name>/<k>"): its parameter's,
    as the saved weight "model/<name>" has it."""
    name = key[len(DENSE_STATE):].rsplit("/", 1)[0]
    weight = saved_meta.get(f"model/{name}")
    if weight is None:
        raise CheckpointError(f"{key}: saved as pieces, but no saved weight model/{name} gives its shape")
    return torch.Size(weight.size)


def read_range(read_flat, key: str, pieces: list[Piece], start: int, stop: int) -> torch.Tensor:
    """The elements [start, stop) of the flattened state tensor `key` from its saved `pieces`,
    reading only the pieces that overlap them (`read_flat`: {DCP key: (lo, hi)} -> elements)."""
    check_cover(key, pieces, start, stop)
    needed = overlapping(pieces, start, stop)
    spans = {p.key: (max(p.start, start) - p.start, min(p.stop, stop) - p.start) for p in needed}
    got = read_flat(spans)
    return torch.cat([got[p.key] for p in needed]) if len(needed) != 1 else got[needed[0].key]
