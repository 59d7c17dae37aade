"""Reading part of a saved tensor (row_reads.py): the values equal the whole-tensor read's, and
only the chunks that overlap the rows are read (each whole, by DCP's FileSystemReader)."""
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, TensorProperties,
                                                   TensorStorageMetadata)

from scaletrain.checkpoint.row_reads import box_read_items, read_flat, read_rows, rows_of

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


def test_rows_and_flat_ranges_equal_the_whole_read(saved):
    path, want = saved
    md = FileSystemReader(str(path)).read_metadata()
    rows = {"big": (10, 20), "vector": (1, 4), "bf16": (5, 9), "transposed": (1, 3)}
    got = read_rows(FileSystemReader(str(path)), md, rows)
    for k, (r0, r1) in rows.items():
        assert torch.equal(got[k], want[k][r0:r1]), k
    spans = {"big": (300, 2000), "vector": (0, 7), "bf16": (4, 5), "transposed": (3, 17)}
    got = read_flat(FileSystemReader(str(path)), md, spans)
    for k, (lo, hi) in spans.items():
        assert torch.equal(got[k], want[k].reshape(-1)[lo:hi]), k


def _save_row_halves(world: int, root: str) -> None:
    """BIG saved as `world` row chunks, one per rank (as FSDP2's DTensor row shards)."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    torch.manual_seed(0)  # the same whole on every rank: each keeps its own rows of it
    mesh = init_device_mesh("cpu", (world,))
    dcp.save({"big": distribute_tensor(torch.randn(BIG), mesh, [Shard(0)], src_data_rank=None)},
             storage_writer=FileSystemWriter(root))


def test_only_the_overlapping_chunks_are_read(ranks, tmp_path):
    """DCP's FileSystemReader reads each overlapping saved chunk whole, and no other chunk."""
    ranks(_save_row_halves, 2, 2, str(tmp_path))
    torch.manual_seed(0)
    whole, half = torch.randn(BIG), BIG[0] // 2
    md = FileSystemReader(str(tmp_path)).read_metadata()
    assert len(md.state_dict_metadata["big"].chunks) == 2
    chunk_bytes = half * BIG[1] * 4
    for (r0, r1), chunks in [((half + 10, half + 20), 1), ((half - 1, half + 1), 2)]:
        before = _bytes_read()
        got = read_rows(FileSystemReader(str(tmp_path)), md, {"big": (r0, r1)})
        read = _bytes_read() - before
        assert torch.equal(got["big"], whole[r0:r1])
        assert chunks * chunk_bytes <= read < chunks * chunk_bytes + 64 * 1024, (r0, r1, read)


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
