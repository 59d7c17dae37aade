"""Sharded checkpoints, in-process: each block's state is written by one rank (its owner, or
each rank its rows under FSDP2), and read back exactly by whoever holds it at another world size."""
import io

import pytest
import torch
import torch.distributed as dist

from scaletrain import checkpoint as ckpt
from tests.optim.test_blockllm import global_batches, tiny_llama, train_block
from tests.test_checkpoint import block_writers
from tests.optim.paper_rule import block_optimizer

LOWRANK_8BIT = dict(select_all=True, frozen_patterns=(), density=1.0, projection="galore", rank=8, eight_bit=True)
ROWS = dict(select_all=True, frozen_patterns=(), density=1.0)  # plain Adam: FSDP2 keeps rows
KWARGS = {"owner_8bit": LOWRANK_8BIT, "fsdp_rows": ROWS, "fsdp_rows_8bit": dict(ROWS, eight_bit=True)}


def _bytes(obj) -> bytes:  # tensors cross the process boundary as bytes
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _model(fsdp: bool):
    model = tiny_llama()
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def _save(root, kwargs, fsdp):
    """Train 2 steps on this rank's slice, save a checkpoint; return the whole block states."""
    world, rank = dist.get_world_size(), dist.get_rank()
    model = _model(fsdp)
    opt = block_optimizer(model.named_parameters(), lr=1e-2, **kwargs)
    train_block(opt, model, [[s[k * world + rank] for k in range(len(s) // world)] for s in global_batches(2, 4)])
    tensors, meta = ckpt.optimizer_shard(opt, model)
    ckpt.save_checkpoint(root, 2, rank=rank, world_size=world, sharded=tensors, keep_latest=2,
                         trainer_state={"optim": meta}, config_text="", ds_config={})
    whole = opt.state_dict()["blocks"] if fsdp else {n: dict(s) for n, s in opt.block_state.items()}
    if fsdp:  # rank 0 has them all (gathered); the others none
        return _bytes(whole)
    gathered = [None] * world
    dist.all_gather_object(gathered, _bytes(whole))
    return _bytes({n: s for part in gathered for n, s in torch.load(io.BytesIO(part)).items()})


def _load(root, kwargs, fsdp):
    """Resume at this world size; return {block: (rows held, state)} for what this rank holds."""
    model = _model(fsdp)
    opt = block_optimizer(model.named_parameters(), lr=1e-2, **kwargs)
    path = root / "step_00000002"
    ckpt.restore_optimizer(opt, model, ckpt.SavedState(path), ckpt.load_trainer_state(path)["optim"])
    held = {}
    for name, st in opt.block_state.items():
        b = opt.block_by_name[name]
        lo, hi, _ = opt._local_rows(b)
        held[name] = (lo - (b.rows[0] if b.rows else 0), hi - (b.rows[0] if b.rows else 0), st)
    return _bytes(held)


def _same(got: dict, want: dict) -> list[str]:
    """Names of blocks whose held rows differ from the whole saved state."""
    bad = []
    for name, (lo, hi, st) in got.items():
        for key, value in st.items():
            ref = want[name][key]
            ok = torch.equal(value, ref[lo:hi] if fsdp_sliced(value, ref) else ref) if torch.is_tensor(value) \
                else value == ref
            if not ok:
                bad.append(f"{name}/{key}")
    return bad


def fsdp_sliced(value, ref) -> bool:
    return value.dim() > 0 and value.shape[0] != ref.shape[0]


@pytest.mark.parametrize("case,new_world,fsdp_after", [("owner_8bit", 3, False), ("owner_8bit", 1, False),
                                                        ("fsdp_rows", 3, True), ("fsdp_rows", 1, False),
                                                        ("fsdp_rows_8bit", 3, True), ("fsdp_rows_8bit", 1, False)])
def test_block_state_written_once_and_read_back_exactly_elsewhere(ranks, tmp_path, case, new_world, fsdp_after):
    fsdp = case.startswith("fsdp_rows")
    kwargs = KWARGS[case]
    want = torch.load(io.BytesIO(ranks(_save, 2, tmp_path, kwargs, fsdp)[0]))
    writers = block_writers(tmp_path / "step_00000002")
    assert set(writers) == set(want) and set().union(*writers.values()) == {0, 1}
    if not fsdp:  # each block's state in exactly one rank's file: its owner's
        assert all(len(r) == 1 for r in writers.values())
    else:  # row shards: a block's rows written by the ranks holding them (8-bit ones too)
        assert any(len(r) == 2 for r in writers.values())
    if kwargs.get("eight_bit"):  # (matrices' moments in 8 bits)
        assert any(k.endswith("_q") for st in want.values() for k in st)
    loaded = (ranks(_load, new_world, tmp_path, kwargs, fsdp_after) if new_world > 1
              else [_load(tmp_path, kwargs, fsdp_after)])
    parts = [torch.load(io.BytesIO(b)) for b in loaded]
    assert {n for p in parts for n in p} == set(want)
    if not fsdp_after:  # whole blocks: each on exactly one rank
        assert sum(len(p) for p in parts) == len(want)
    for part in parts:
        assert _same(part, want) == []
