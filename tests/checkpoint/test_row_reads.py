"""Reading part of a saved tensor (row_reads.py, rows_reader.py): the values equal the whole-tensor
read's, only the chunks that overlap the rows are asked for, and only the rows' bytes are read."""
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, TensorProperties,
                                                   TensorStorageMetadata)

from scaletrain.checkpoint.row_reads import box_read_items, read_flat, read_rows, rows_of
from scaletrain.checkpoint.rows_reader import RowsReader

BIG = (1000, 256)  # 1 MB of fp32: a few rows of it are ~1% of the whole


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    tensors = {"big": torch.randn(BIG), "vector": torch.randn(7), "bf16": torch.randn(50, 3).to(torch.bfloat16),
               "transposed": torch.randn(6, 4).t(), "step": torch.tensor(3.0)}
    dcp.save(tensors, storage_writer=FileSystemWriter(str(tmp_path)), no_dist=True)
    return tmp_path, tensors


@pytest.mark.parametrize("reader", [FileSystemReader, RowsReader])
def test_rows_and_flat_ranges_equal_the_whole_read(saved, reader):
    path, want = saved
    md = reader(str(path)).read_metadata()
    rows = {"big": (10, 20), "vector": (1, 4), "bf16": (5, 9), "transposed": (1, 3)}
    got = read_rows(reader(str(path)), md, rows)
    for k, (r0, r1) in rows.items():
        assert torch.equal(got[k], want[k][r0:r1]), k
    spans = {"big": (300, 2000), "vector": (0, 7), "bf16": (4, 5), "transposed": (3, 17)}
    got = read_flat(reader(str(path)), md, spans)
    for k, (lo, hi) in spans.items():
        assert torch.equal(got[k], want[k].reshape(-1)[lo:hi]), k


def test_rows_reader_reads_only_the_rows_bytes(saved):
    path, _ = saved
    md = FileSystemReader(str(path)).read_metadata()
    row_bytes = BIG[1] * 4
    reader = RowsReader(str(path))
    before = _bytes_read()
    read_rows(reader, md, {"big": (10, 20)})
    read = _bytes_read() - before
    assert reader.rows_bytes == 10 * row_bytes
    assert read < 10 * row_bytes + 32 * 1024  # plus the chunk's zip directory and pickle
    before = _bytes_read()
    read_rows(FileSystemReader(str(path)), md, {"big": (10, 20)})
    assert _bytes_read() - before > BIG[0] * row_bytes  # DCP's own reader: the whole chunk


def test_rows_reader_leaves_a_non_contiguous_chunk_to_dcp(saved):
    path, want = saved
    md = FileSystemReader(str(path)).read_metadata()
    reader = RowsReader(str(path))
    assert torch.equal(read_rows(reader, md, {"transposed": (1, 3)})["transposed"], want["transposed"][1:3])
    assert reader.rows_bytes == 0


def _two_chunks() -> Metadata:
    """A (10, 3) tensor saved as rows [0, 4) and [4, 10) (as by two row-sharded ranks)."""
    chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([4, 3])),
              ChunkStorageMetadata(torch.Size([4, 0]), torch.Size([6, 3]))]
    tensor = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([10, 3]), chunks)
    return Metadata(state_dict_metadata={"w": tensor})


def test_read_items_cover_only_the_overlapping_chunks():
    md = _two_chunks()
    box = lambda r0, r1: ChunkStorageMetadata(torch.Size([r0, 0]), torch.Size([r1 - r0, 3]))  # noqa: E731
    [item] = box_read_items("w", box(5, 7), md)
    assert (item.storage_index.offset, item.storage_offsets, item.dest_offsets, item.lengths) == \
        (torch.Size([4, 0]), torch.Size([1, 0]), torch.Size([0, 0]), torch.Size([2, 3]))
    first, second = box_read_items("w", box(2, 6), md)
    assert (first.storage_offsets, first.dest_offsets, first.lengths) == ((2, 0), (0, 0), (2, 3))
    assert (second.storage_offsets, second.dest_offsets, second.lengths) == ((0, 0), (2, 0), (2, 3))


def test_rows_of_a_flat_range():
    assert rows_of(0, 12, (4, 3)) == (0, 4, 0)
    assert rows_of(4, 5, (4, 3)) == (1, 2, 1)
    assert rows_of(2, 7, (4, 3)) == (0, 3, 2)
    assert rows_of(3, 5, (7,)) == (3, 5, 0)
