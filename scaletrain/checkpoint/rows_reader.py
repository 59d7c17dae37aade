"""A DCP FileSystemReader that reads only the asked-for rows' bytes of a saved chunk.

DCP's FileSystemReader answers every read item by torch.load-ing the whole saved chunk and then
narrowing it: asking for rows [r0, r1) of a tensor saved as one chunk still reads (and holds) all
of it. Each chunk is a torch.save archive, a zip file whose storage record (`<archive>/data/<key>`)
is stored uncompressed and row-major; the tensor's size, stride and storage offset are in its
pickle, which `torch.load` under `torch.serialization.skip_data` reads without the storage bytes.
So for an item asking for whole rows of a contiguous chunk this reader seeks to those rows and
reads just them; anything else (other slices, transformed or compressed chunks, a big-endian
archive) goes to FileSystemReader as before."""
from __future__ import annotations

import dataclasses
import io
import math
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, LoadPlan
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then the file name and extra field lengths


class _Slice(io.RawIOBase):
    """The bytes [start, start + length) of an open file, as a seekable file of their own."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.at = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.at

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.at = {io.SEEK_SET: 0, io.SEEK_CUR: self.at, io.SEEK_END: self.length}[whence] + offset
        return self.at

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.at))
        self.f.seek(self.start + self.at)
        got = self.f.readinto(memoryview(buffer)[:n])
        self.at += got
        return got

    def fill(self, buffer) -> bool:
        """Read exactly len(buffer) bytes (a short read is retried); False at the end."""
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            got = self.readinto(view[done:])
            if not got:
                return False
            done += got
        return True


def _storage_record(archive: zipfile.ZipFile) -> zipfile.ZipInfo | None:
    """The archive's one storage record, if it has exactly one, stored uncompressed."""
    records = [i for i in archive.infolist() if i.filename.rsplit("/", 2)[-2:-1] == ["data"]]
    if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED:
        return None
    return records[0]


def _little_endian(archive: zipfile.ZipFile) -> bool:
    names = [n for n in archive.namelist() if n.endswith("/byteorder")]
    order = archive.read(names[0]).decode() if names else "little"  # archives without it are little
    return order == "little" == sys.byteorder


def chunk_layout(chunk: _Slice) -> tuple[torch.Tensor, int] | None:
    """(a meta tensor with the saved chunk's size, stride, storage offset and dtype, where its
    storage bytes start in `chunk`), or None where rows cannot be read by offset."""
    try:
        archive = zipfile.ZipFile(chunk)
    except zipfile.BadZipFile:
        return None
    record = _storage_record(archive)
    if record is None or not _little_endian(archive):
        return None
    chunk.seek(0)
    try:
        with torch.serialization.skip_data():  # the pickle only: size, stride, offset, dtype
            layout = torch.load(chunk, map_location="meta", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError):
        return None  # not a plain tensor: FileSystemReader's business
    if not torch.is_tensor(layout):
        return None
    chunk.seek(record.header_offset)
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(chunk.read(_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04" or not layout.is_contiguous():
        return None
    return layout, record.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _whole_rows(item: ReadItem, shape: torch.Size) -> bool:
    return all(at == 0 and n == size for at, n, size in zip(item.storage_offsets[1:], item.lengths[1:], shape[1:]))


def _read_into(chunk: _Slice, target: torch.Tensor, dtype: torch.dtype, nbytes: int) -> bool:
    """Read nbytes of `dtype` elements at the chunk's position into `target`: straight into its
    memory where it is a contiguous CPU tensor of that dtype, else through a buffer."""
    if nbytes == 0:
        return True
    if target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous():
        return chunk.fill(memoryview(target.view(-1).view(torch.uint8).numpy()))
    raw = bytearray(nbytes)
    if not chunk.fill(raw):
        return False
    target.copy_(torch.frombuffer(raw, dtype=dtype).view(target.shape))
    return True


class RowsReader(FileSystemReader):
    """FileSystemReader that reads whole-row slices of a saved chunk as just those rows' bytes.
    `rows_bytes` counts the tensor bytes it read that way (the rest is FileSystemReader's)."""

    def __init__(self, path):
        super().__init__(path)
        self.rows_bytes = 0

    def read_data(self, plan: LoadPlan, planner):
        rest = [item for item in plan.items if not self._read_rows(item, planner)]
        return super().read_data(dataclasses.replace(plan, items=rest), planner)

    def _read_rows(self, item: ReadItem, planner) -> bool:
        info = self.storage_data[item.storage_index]
        if item.type != LoadItemType.TENSOR or getattr(info, "transform_descriptors", None):
            return False
        with open(Path(self.path) / info.relative_path, "rb", buffering=0) as f:
            chunk = _Slice(f, info.offset, info.length)
            found = chunk_layout(chunk)
            if found is None or found[0].dim() == 0 or not _whole_rows(item, found[0].shape):
                return False
            layout, data_at = found
            row_bytes = math.prod(layout.shape[1:]) * layout.element_size()
            chunk.seek(data_at + layout.storage_offset() * layout.element_size() + item.storage_offsets[0] * row_bytes)
            target = planner.resolve_tensor(item).detach()
            nbytes = item.lengths[0] * row_bytes
            if not _read_into(chunk, target, layout.dtype, nbytes):
                return False
        planner.commit_tensor(item, target)
        self.rows_bytes += nbytes
        return True
