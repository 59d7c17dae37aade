"""ZeRO-1/2 fragments from public attributes (zero_fragments.py), cross-checked against DeepSpeed's
own per-parameter mapping (read here, in the test only, from its private `_hp_mapping`), and the
fragment-wise load: state saved at one world size and loaded at another equals the saved state."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from scaletrain import checkpoint as ckpt

SHAPES = {"embed": (11, 4), "up": (5, 7), "up_bias": (5,), "down": (3, 5), "norm": (3,)}


class Toy(torch.nn.Module):
    """Odd sizes, so ZeRO's partition boundaries fall inside parameters."""

    def __init__(self):
        super().__init__()
        for name, shape in SHAPES.items():
            self.register_parameter(name, torch.nn.Parameter(torch.randn(shape)))

    def forward(self, x):
        h = torch.tanh(self.embed[x].sum(1) @ self.up[:, :4].T + self.up_bias)
        return (h @ self.down.T * self.norm).sum()


def _engine(world: int, alignment: bool = False, seed: int = 0):
    from scaletrain.distributed.engines.deepspeed_engine import DeepSpeedEngine
    from scaletrain.distributed.runtime import DistContext

    torch.manual_seed(seed)
    model = Toy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
          "zero_optimization": {"stage": 2, "parameter_alignment": alignment},
          "zero_allow_untested_optimizer": True}
    rank = dist.get_rank()
    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    return DeepSpeedEngine(model, optimizer, scheduler, ds, ctx, syncs_grads=False)


def _train(ds, steps: int) -> None:
    for s in range(steps):
        x = torch.randint(0, 11, (1, 3), generator=torch.Generator().manual_seed(100 * s + ds.ctx.rank))
        ds.engine.backward(ds.engine(x))
        ds.engine.step()


def _ours_and_deepspeeds(world: int, alignment: bool):
    from scaletrain.distributed.engines.zero_fragments import local_fragments

    ds = _engine(world, alignment)
    names = {id(p): n for n, p in ds.module.named_parameters()}
    ours = {n: (f.start, f.stop, f.flat_start) for n, f in local_fragments(ds.engine.optimizer, names).items()}
    theirs = {}
    for name, p in ds.module.named_parameters():
        mapping = p._hp_mapping  # DeepSpeed's own (private) mapping: for this cross-check only
        if mapping is not None:
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            theirs[name] = (lp.start, lp.start + lp.numel, hp.start)
    return ours, theirs


@pytest.mark.parametrize("world,alignment", [(1, False), (2, False), (3, False), (2, True)])
def test_fragments_match_deepspeeds_mapping(ranks, world, alignment):
    per_rank = ranks(_ours_and_deepspeeds, world, world, alignment)
    for ours, theirs in per_rank:
        assert ours == theirs
    for name, shape in SHAPES.items():  # together the ranks hold every element once
        held = sorted((start, stop) for ours, _ in per_rank for n, (start, stop, _) in ours.items() if n == name)
        assert held[0][0] == 0 and held[-1][1] == torch.Size(shape).numel()
        assert all(a[1] == b[0] for a, b in zip(held, held[1:]))


def _save(world: int, root: str):
    from scaletrain.trainer import optimizer_shard

    ds = _engine(world)
    _train(ds, 2)
    tensors, meta = optimizer_shard(ds, ds.optimizer)
    ckpt.save_checkpoint(Path(root), 2, rank=ds.ctx.rank, world_size=world,
                         sharded={**ckpt.model_shard(ds.module), **tensors},
                         trainer_state={"step": 2, "optim": meta}, config_text="", ds_config={}, keep_latest=1)


def _load_and_gather(world: int, root: str, trained: bool):
    """Load the checkpoint into a fresh engine (or one with state of its own: trained) as the
    trainer does; the whole state DeepSpeed then gives for each parameter, and what this rank read."""
    from deepspeed.utils import safe_get_full_optimizer_state

    ds = _engine(world, seed=1)
    if trained:
        _train(ds, 1)
    path = Path(root) / "step_00000002"
    saved = ckpt.SavedState(path)
    ckpt.restore_model(ds.module, saved)
    ranges = ds.optimizer_state_ranges()
    ds.load_optimizer_states(*ckpt.dense_optimizer_fragments(ds.module, saved, ckpt.load_trainer_state(path)["optim"],
                                                             ranges))
    got = {f"{n}/{k}": safe_get_full_optimizer_state(p, k).view_as(p).tolist()
           for n, p in ds.module.named_parameters() for k in ("exp_avg", "exp_avg_sq")}
    step = [st["step"].item() for st in ds.engine.optimizer.optimizer.state.values()]
    return got, step, ranges


@pytest.mark.parametrize("saved_at,loaded_at,trained", [(2, 3, False), (3, 1, True)])
def test_state_saved_at_one_world_size_loads_fragmentwise_at_another(ranks, tmp_path, saved_at, loaded_at, trained):
    ranks(_save, saved_at, saved_at, str(tmp_path))
    saved = ckpt.SavedState(tmp_path / "step_00000002")
    want = saved.read_prefix("optim/state/")
    per_rank = ranks(_load_and_gather, loaded_at, loaded_at, str(tmp_path), trained)
    for got, step, _ in per_rank:
        assert step and all(s == 2 for s in step)
        for key, value in got.items():
            assert torch.equal(torch.tensor(value), want[key]), key
    if loaded_at > 1:  # some rank skips a parameter wholly in the others' partitions
        assert any(len(ranges) < len(SHAPES) for _, _, ranges in per_rank)
