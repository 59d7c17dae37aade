"""ZeRO-1/2 AdamW state saved as per-rank pieces (zero_state.optimizer_shard, checkpoint/pieces.py):
each rank writes its own elements of each parameter without communication, the pieces partition
every parameter, a same-size resume reads only the rank's own pieces, and the other backends (one
plain process, FSDP2) read whole tensors assembled from the pieces."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader

from scaletrain import checkpoint as ckpt
from tests.distributed.test_zero_fragments import SHAPES, Toy, _engine, _train
from tools.local_ranks import run_ranks

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "reduce", "all_gather_object", "broadcast_object_list", "gather_object", "barrier")
STEP = "step_00000002"


class _CountCollectives:
    """Counts the torch.distributed collectives called inside it (DeepSpeed's go through them)."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self.saved = {name: getattr(dist, name) for name in COLLECTIVES}
        for name, fn in self.saved.items():
            setattr(dist, name, self._counted(name, fn))
        return self

    def _counted(self, name, fn):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)
        return counted

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _save_counting(world: int, root: str):
    """Train 2 steps and save as the trainer does; (this rank's optimizer DCP keys, the
    collectives its optimizer_shard called, those a DeepSpeed gather calls: the counter's
    check, the whole state by DeepSpeed's own gather)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    from scaletrain.trainer import optimizer_shard

    ds = _engine(world)
    _train(ds, 2)
    with _CountCollectives() as during_shard:
        tensors, meta = optimizer_shard(ds, ds.optimizer)
    ckpt.save_checkpoint(Path(root), 2, rank=ds.ctx.rank, world_size=world,
                         sharded={**ckpt.model_shard(ds.module), **tensors},
                         trainer_state={"step": 2, "optim": meta}, config_text="", ds_config={}, keep_latest=1)
    with _CountCollectives() as during_gather:
        whole = {f"{n}/{k}": safe_get_full_optimizer_state(p, k).view_as(p).tolist()
                 for n, p in ds.module.named_parameters() for k in ("exp_avg", "exp_avg_sq")}
    return sorted(tensors), during_shard.calls, len(during_gather.calls), whole


@pytest.fixture(scope="module")
def saved_at_two(tmp_path_factory, rank_context):
    root = tmp_path_factory.mktemp("zero2")
    return root, run_ranks(_save_counting, 2, 2, str(root), context=rank_context)


def _ranges(keys) -> dict[str, list[tuple[int, int]]]:
    out = {}
    for k in keys:
        if "@" in k:
            base, span = k.split("@")
            out.setdefault(base, []).append(tuple(map(int, span.split("-"))))
    return out


def test_each_rank_saves_its_own_pieces_without_communication(saved_at_two):
    _, per_rank = saved_at_two
    for keys, calls, gather_calls, _ in per_rank:
        assert calls == [] and gather_calls > 0  # the counter sees DeepSpeed's collectives
        assert all(k.startswith("optim/state/") for k in keys)
    mine = [set(keys) for keys, *_ in per_rank]
    assert not mine[0] & mine[1]  # no piece, no step written twice
    pieces = _ranges(mine[0] | mine[1])
    for name, shape in SHAPES.items():  # each parameter's elements, every one exactly once
        for key in ("exp_avg", "exp_avg_sq"):
            spans = sorted(pieces[f"optim/state/{name}/{key}"])
            assert spans[0][0] == 0 and spans[-1][1] == torch.Size(shape).numel()
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), spans
        assert sum(f"optim/state/{name}/step" in m for m in mine) == 1
    assert all(len(_ranges(m)) > 0 for m in mine)  # both ranks hold some


def test_pieces_read_as_whole_tensors_in_one_plain_process(saved_at_two):
    root, per_rank = saved_at_two
    saved = ckpt.SavedState(root / STEP)
    assert not any("@" in k for k in saved.keys)
    got = saved.read_prefix("optim/state/")
    for key, value in per_rank[0][3].items():  # DeepSpeed's own gather, on the saving ranks
        name = key.split("/")[0]
        assert got[key].shape == SHAPES[name] and torch.equal(got[key], torch.tensor(value)), key
        pieces = saved.read({p.key: None for p in saved.pieces[f"optim/state/{key}"]})
        assert torch.equal(got[key].reshape(-1), torch.cat([pieces[p.key] for p in saved.pieces[f"optim/state/{key}"]]))
    assert all(float(got[f"{n}/step"]) == 2 for n in SHAPES)


def test_a_plain_torch_adamw_resumes_from_pieces(saved_at_two):
    """restore_optimizer's torch path (set_optimizer_state_dict) gets the assembled tensors."""
    root, per_rank = saved_at_two
    path = root / STEP
    model = Toy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    saved = ckpt.SavedState(path)
    ckpt.restore_model(model, saved)
    ckpt.restore_optimizer(optimizer, model, saved, ckpt.load_trainer_state(path)["optim"])
    for name, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], torch.tensor(per_rank[0][3][f"{name}/{key}"])), (name, key)


def test_pieces_that_miss_elements_are_a_clear_error(saved_at_two):
    root, _ = saved_at_two
    saved = ckpt.SavedState(root / STEP)
    key = "optim/state/embed/exp_avg"
    saved.pieces[key] = saved.pieces[key][1:]
    with pytest.raises(ckpt.CheckpointError, match="embed/exp_avg: its saved pieces"):
        saved.read({key: None})
    with pytest.raises(ckpt.CheckpointError, match="embed/exp_avg: its saved pieces"):
        saved.read_flat({key: (0, 3)})


def _load_recording_reads(world: int, root: str):
    """Resume the engine at `world` ranks as the trainer does; the DCP keys of the optimizer
    state this rank's reads asked the storage for, and the keys this rank had saved."""
    fsqns = []
    read_data = FileSystemReader.read_data

    def recording(self, plan, planner):
        fsqns.extend(item.storage_index.fqn for item in plan.items)
        return read_data(self, plan, planner)

    ds = _engine(world, seed=1)
    path = Path(root) / STEP
    saved = ckpt.SavedState(path)
    ckpt.restore_model(ds.module, saved)
    FileSystemReader.read_data = recording
    try:
        ds.load_optimizer_states(*ckpt.dense_optimizer_fragments(
            ds.module, saved, ckpt.load_trainer_state(path)["optim"], ds.optimizer_state_ranges()))
    finally:
        FileSystemReader.read_data = read_data
    return sorted(set(fsqns))


def test_a_rank_resuming_at_the_same_size_reads_only_its_own_pieces(ranks, saved_at_two):
    root, per_rank = saved_at_two
    read = ranks(_load_recording_reads, 2, 2, str(root))
    for (saved_keys, *_), got in zip(per_rank, read):
        pieces = [k for k in got if "@" in k]
        assert pieces == sorted(k for k in saved_keys if "@" in k)
        assert len(got) == len(pieces) + 1  # and one step


def _load_into_fsdp2(world: int, root: str):
    """FSDP2 at `world` ranks resumes AdamW from the ZeRO pieces (DTensor targets); the whole
    moments it then holds."""
    from torch.distributed.fsdp import fully_shard

    model = Toy()
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    path = Path(root) / STEP
    saved = ckpt.SavedState(path)
    ckpt.restore_model(model, saved)
    ckpt.restore_optimizer(optimizer, model, saved, ckpt.load_trainer_state(path)["optim"])
    return {f"{n}/{k}": optimizer.state[p][k].full_tensor().tolist()
            for n, p in model.named_parameters() for k in ("exp_avg", "exp_avg_sq")}


def test_fsdp2_resumes_from_pieces_at_another_size(ranks, saved_at_two):
    root, per_rank = saved_at_two
    for got in ranks(_load_into_fsdp2, 3, 3, str(root)):
        assert got == per_rank[0][3]


def _save_blocking_and_background(world: int, root: str):
    """The pieces are views of ZeRO's flat state: a background save (which snapshots them) and a
    blocking save (DCP copies each as it writes it) give the same files; their checksums."""
    import json

    from scaletrain.trainer import optimizer_shard

    ds = _engine(world)
    _train(ds, 2)
    saver = ckpt.AsyncCheckpointer(world)
    sums = []
    for kind in ("blocking", "background"):
        tensors, meta = optimizer_shard(ds, ds.optimizer)
        kwargs = dict(rank=ds.ctx.rank, world_size=world, sharded={**ckpt.model_shard(ds.module), **tensors},
                      trainer_state={"step": 2, "optim": meta}, config_text="", ds_config={}, keep_latest=1)
        if kind == "blocking":
            ckpt.save_checkpoint(Path(root) / kind, 2, **kwargs)
        else:
            saver.save(Path(root) / kind, 2, **kwargs)
            saver.wait()
        files = json.loads((Path(root) / kind / STEP / "manifest.json").read_text())["files"]
        sums.append({f: v["sha256"] for f, v in files.items() if f.startswith("dcp/")})
    return sums


def test_background_save_of_pieces_is_byte_identical(ranks, tmp_path):
    for blocking, background in ranks(_save_blocking_and_background, 2, 2, str(tmp_path)):
        assert blocking == background and len(blocking) == 3  # two ranks' files and .metadata
