"""bf16 with the block optimizer: bf16 weights everywhere, fp32 masters of the selected blocks on
their owners only, fp32 gradient accumulation and reduction; distributed runs equal one rank."""
import io

import pytest
import torch
import torch.distributed as dist

from tests.optim.test_blockllm import global_batches, tiny_llama, train_block
from tests.optim.paper_rule import block_optimizer

STEPS, MICRO_BATCHES = 20, 12


def _run(world: int, bf16: bool, stage: int = 2, keep_state: bool = True) -> dict:
    """Each rank trains on its slice (micro-batches k*W + r) of the same global batches."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = block_optimizer(model.named_parameters(), lr=1e-2, density=0.2, reselect_every=7,
                         keep_state_on_reselect=keep_state, debug_checks=world > 1)
    opt.zero_stage = stage
    if bf16:
        model.to(torch.bfloat16)
        opt.use_master_weights()
    per_rank = [[step[k * world + rank] for k in range(len(step) // world)]
                for step in global_batches(STEPS, MICRO_BATCHES)]
    losses = train_block(opt, model, per_rank)
    trained = {opt.block_by_name[n].param for h in opt.selection_history for n in h}
    params = dict(model.named_parameters())
    return {
        "losses": losses, "history": opt.selection_history, "owned": sorted(opt.block_state),
        "state_bytes": opt.state_bytes(),
        "masters": {n: (str(st["master"].dtype),
                        torch.equal(opt._weight(opt.block_by_name[n]), st["master"].to(params[opt.block_by_name[n].param].dtype)))
                    for n, st in opt.block_state.items() if "master" in st},
        "owned_params": sum(opt.block_by_name[n].numel for n in opt.block_state),
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "frozen_unchanged": all(torch.equal(params[n].detach().float(), before[n].to(params[n].dtype).float())
                                for n in params if n not in trained),
    }


@pytest.fixture(scope="module")
def one_rank():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every rank of `ranks`: the same kernels, the same rounding
    try:
        return _run(1, bf16=True), _run(1, bf16=False)
    finally:
        torch.set_num_threads(threads)


def test_bf16_weights_with_fp32_masters_track_fp32(one_rank):
    bf16, fp32 = one_rank
    assert bf16["dtypes"] == ["torch.bfloat16"]
    assert bf16["history"][0] == fp32["history"][0]  # same first selection from the same weights
    # the bf16 forward/backward follows the fp32 run closely (loss of random tokens ~ ln 128)
    assert max(abs(a - b) / b for a, b in zip(bf16["losses"], fp32["losses"])) <= 5e-3
    # one fp32 master per held block, and every bf16 weight is its master rounded
    assert bf16["masters"] and set(bf16["masters"]) == set(bf16["owned"])
    assert all(dtype == "torch.float32" and rounded for dtype, rounded in bf16["masters"].values())
    # the masters are the only extra state: 4 bytes per held parameter
    assert bf16["state_bytes"] == fp32["state_bytes"] + 4 * bf16["owned_params"]
    assert bf16["frozen_unchanged"]


@pytest.mark.parametrize("world,stage", [(2, 0), (2, 1), (2, 2), (3, 2), (4, 2)])
def test_bf16_ranks_match_one_rank(ranks, one_rank, world, stage):
    """fp32 accumulation and reduction, masters on owners: W ranks reproduce one rank's losses.
    Each micro-batch's loss is scaled by 1 / (its rank's micro-batches) before a bf16 backward; at
    W = 2 and 4 the scales differ from one rank's 1/12 by a power of two (exact in bf16), so the
    runs agree to fp32 tolerance; at W = 3 (1/4 vs 1/12) the backward rounds differently, and
    the runs agree to bf16's precision (2^-8 relative)."""
    ref = one_rank[0]
    results = ranks(_run, world, world, True, stage)
    tol = 1e-5 if world in (2, 4) else 2 ** -8 * max(ref["losses"])
    for r in results:
        assert r["history"] == ref["history"]
        assert max(abs(a - b) for a, b in zip(r["losses"], ref["losses"])) <= tol
        assert all(dtype == "torch.float32" and rounded for dtype, rounded in r["masters"].values())
    if stage == 0:  # replicated: every rank holds every selected block's master
        assert all(r["owned"] == ref["owned"] for r in results)
    else:  # each master exists on exactly one rank (moved with its state on reselection)
        assert sorted(n for r in results for n in r["masters"]) == sorted(ref["masters"])
        assert sum(r["state_bytes"] for r in results) == ref["state_bytes"]


def _saved(opt, model) -> dict:
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_masters_are_saved_and_resume_bit_identically():
    batches = global_batches(12, 2)
    a = tiny_llama().to(torch.bfloat16)
    opt_a = block_optimizer(a.named_parameters(), lr=1e-2, density=0.2, reselect_every=4,
                           keep_state_on_reselect=True)
    opt_a.use_master_weights()
    train_block(opt_a, a, batches[:6])
    saved = _saved(opt_a, a)
    assert all(st["master"].dtype == torch.float32 for st in saved["opt"]["blocks"].values())

    b = tiny_llama(seed=99).to(torch.bfloat16)
    b.load_state_dict(saved["model"])
    opt_b = block_optimizer(b.named_parameters(), lr=1e-2, density=0.2, reselect_every=4,
                           keep_state_on_reselect=True)
    opt_b.use_master_weights()
    opt_b.load_state_dict(saved["opt"])
    rest_a = train_block(opt_a, a, batches[6:], first_step=6)
    rest_b = train_block(opt_b, b, batches[6:], first_step=6)
    assert rest_a == rest_b

    # an fp32 run resuming the bf16 state takes the exact fp32 masters as its weights
    c = tiny_llama(seed=7)
    c.load_state_dict({k: v.float() for k, v in saved["model"].items()})
    opt_c = block_optimizer(c.named_parameters(), lr=1e-2, density=0.2, reselect_every=4,
                           keep_state_on_reselect=True)
    opt_c.load_state_dict(saved["opt"])
    for name, st in saved["opt"]["blocks"].items():
        assert torch.equal(opt_c._weight(opt_c.block_by_name[name]), st["master"])
        assert "master" not in opt_c.block_state[name]


def test_master_weights_must_be_enabled_before_the_first_update():
    model = tiny_llama()
    opt = block_optimizer(model.named_parameters(), lr=1e-2, density=0.2)
    train_block(opt, model, global_batches(1, 1))
    with pytest.raises(RuntimeError, match="before the first update"):
        opt.use_master_weights()
