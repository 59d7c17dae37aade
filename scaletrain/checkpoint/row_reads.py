"""Reading part of a saved tensor: rows [r0, r1) of a DCP tensor, or elements [start, stop) of it
flattened, without asking DCP for the rest. A load planner (DCP's public planner API) whose
destinations are row boxes: its read items are the intersections of the saved chunks with each box,
so chunks outside the box are never read (a rank resuming DeepSpeed ZeRO-1/2 from another backend's
checkpoint reads only the chunks that hold its elements). DCP's FileSystemReader reads each
overlapping chunk whole; the rows are then taken out of it."""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import LoadPlan, LoadPlanner, Metadata, ReadItem
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType


def _intersection(a: ChunkStorageMetadata, b: ChunkStorageMetadata) -> ChunkStorageMetadata | None:
    lo = [max(x, y) for x, y in zip(a.offsets, b.offsets)]
    hi = [min(x + m, y + n) for x, m, y, n in zip(a.offsets, a.sizes, b.offsets, b.sizes)]
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return ChunkStorageMetadata(offsets=torch.Size(lo), sizes=torch.Size(h - l for l, h in zip(lo, hi)))


def _minus(a: Sequence[int], b: Sequence[int]) -> torch.Size:
    return torch.Size(x - y for x, y in zip(a, b))


def _narrowed(t: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    for dim, (at, n) in enumerate(zip(offsets, lengths)):
        t = t.narrow(dim, at, n)
    return t


def box_read_items(fqn: str, box: ChunkStorageMetadata, metadata: Metadata) -> list[ReadItem]:
    """The read items that fill `box` (a region of the saved tensor `fqn`) from the saved chunks
    that overlap it, one per overlapping chunk, each no larger than the overlap; the destination
    is a tensor of the box's size (dest_offsets relative to the box)."""
    items = []
    for chunk in metadata.state_dict_metadata[fqn].chunks:
        overlap = _intersection(box, chunk)
        if overlap is not None:
            items.append(ReadItem(type=LoadItemType.TENSOR,
                                  dest_index=MetadataIndex(fqn, box.offsets),
                                  dest_offsets=_minus(overlap.offsets, box.offsets),
                                  storage_index=MetadataIndex(fqn, chunk.offsets),
                                  storage_offsets=_minus(overlap.offsets, chunk.offsets),
                                  lengths=overlap.sizes))
    return items


class RowsLoadPlanner(LoadPlanner):
    """Loads rows [r0, r1) of saved tensors: set up with {fqn: tensor of (r1 - r0, *rest)} and
    {fqn: r0}; reads only the overlap of each saved chunk with those rows."""

    def __init__(self, first_rows: dict[str, int]):
        self.first_rows = first_rows

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.state_dict, self.metadata = state_dict, metadata

    def _box(self, fqn: str) -> ChunkStorageMetadata:
        dest = self.state_dict[fqn]
        offsets = (self.first_rows[fqn],) + (0,) * (dest.dim() - 1)
        return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)

    def create_local_plan(self) -> LoadPlan:
        return LoadPlan([item for fqn in self.state_dict
                         for item in box_read_items(fqn, self._box(fqn), self.metadata)])

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise AssertionError(f"{read_item.dest_index.fqn}: a row read asks for tensors only")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        return _narrowed(self.state_dict[read_item.dest_index.fqn], read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor gave a view of the destination: the data is in place


def rows_of(start: int, stop: int, shape: Sequence[int]) -> tuple[int, int, int]:
    """(r0, r1, skip): the rows [r0, r1) of a tensor of `shape` that hold its flattened elements
    [start, stop), which begin `skip` elements into row r0."""
    row = math.prod(shape[1:])
    r0 = start // row
    return r0, -(-stop // row), start - r0 * row


def read_rows(reader: dcp.StorageReader, metadata: Metadata,
              rows: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """{fqn: (r0, r1)} -> {fqn: rows [r0, r1) of the saved tensor (a new CPU tensor)}; in this
    process only (no collective)."""
    assert all(metadata.state_dict_metadata[fqn].size for fqn in rows), "rows of a 0-d tensor"
    dest = {}
    for fqn, (r0, r1) in rows.items():
        md = metadata.state_dict_metadata[fqn]
        dest[fqn] = torch.empty((r1 - r0, *md.size[1:]), dtype=md.properties.dtype)
    if dest:
        with warnings.catch_warnings():  # no_dist is meant: say nothing about it
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(dest, storage_reader=reader, planner=RowsLoadPlanner({k: r[0] for k, r in rows.items()}),
                     no_dist=True)
    return dest


def read_flat(reader: dcp.StorageReader, metadata: Metadata,
              ranges: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """{fqn: (start, stop)} -> {fqn: the saved tensor's flattened elements [start, stop)}, read
    as the rows that hold them."""
    spans = {fqn: rows_of(lo, hi, metadata.state_dict_metadata[fqn].size) for fqn, (lo, hi) in ranges.items()}
    got = read_rows(reader, metadata, {fqn: (r0, r1) for fqn, (r0, r1, _) in spans.items()})
    return {fqn: got[fqn].reshape(-1).narrow(0, spans[fqn][2], hi - lo) for fqn, (lo, hi) in ranges.items()}
