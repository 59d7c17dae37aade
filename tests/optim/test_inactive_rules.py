"""The block optimizer's three kinds of parameters: always-trained tensors (Adam every step,
outside the budget), chosen blocks (Adam) and the rest (inactive rule: frozen or signSGD).
Sign steps over real gloo ranks equal one rank at every ZeRO stage."""
import hashlib
import math

import pytest
import torch
import torch.distributed as dist

from scaletrain.models.llama import causal_lm_loss
from scaletrain.optim.comm import pack_signs, unpack_signs
from scaletrain.optim.selection import ALWAYS_ROW_CHUNKS
from tests.optim.test_blockllm import global_batches, tiny_llama, train_block
from tests.optim.paper_rule import block_optimizer

ALWAYS = ("embed", "lm_head", "norm")
FRUGAL = dict(frozen_patterns=(), always_train=ALWAYS, inactive="sign", density=0.2, reselect_every=7)


def test_sign_codes_round_trip_with_zeros():
    x = torch.tensor([1.5, -2.0, 0.0, 3e-30, -0.0, -7.0, 0.0, 1.0])
    assert torch.equal(unpack_signs(pack_signs(x)), torch.sign(x))
    assert pack_signs(x).numel() == 2  # four values a byte


def test_always_trained_tensors_are_outside_the_budget_and_update_every_step():
    model = tiny_llama()
    opt = block_optimizer(model.named_parameters(), lr=1e-2, **FRUGAL)
    always = {n for n, _ in model.named_parameters() if any(p in n for p in ALWAYS)}
    assert {b.param for b in opt.always_blocks} == always
    chunked = [b for b in opt.always_blocks if b.rows]  # matrices in row chunks, spread over owners
    assert {b.param for b in chunked} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert len(chunked) == 2 * ALWAYS_ROW_CHUNKS
    assert not always & {b.param for b in opt.blocks}  # they never compete
    n_candidates = sum(p.numel() for n, p in model.named_parameters() if n not in always)
    assert opt.budget == int(0.2 * n_candidates)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_block(opt, model, global_batches(8, 1))
    assert {b.name for b in opt.always_blocks} <= set(opt.selected)
    assert not always & {opt.block_by_name[n].param for n in opt.chosen}
    assert all(b.name in opt.block_state for b in opt.always_blocks)  # Adam state for each
    assert opt.stats()["always_state_bytes"] == sum(8 * p.numel() for n, p in model.named_parameters()
                                                    if n in always)
    for n, p in model.named_parameters():  # with the sign rule every tensor moves
        assert not torch.equal(p, before[n]), n


def test_inactive_blocks_take_exactly_one_sign_step_and_chosen_ones_adam():
    model, probe = tiny_llama(), tiny_llama()
    opt = block_optimizer(model.named_parameters(), lr=1e-2, weight_decay=0.1, **FRUGAL)
    (mb,) = global_batches(1, 1)[0]
    with opt.selection_pass(step=0):
        causal_lm_loss(model, mb).backward()
    causal_lm_loss(probe, mb).backward()  # the same gradient, on an untouched copy
    grads = {n: p.grad for n, p in probe.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    causal_lm_loss(model, mb).backward()
    opt.step()
    inactive = {b.param for b in opt._inactive_blocks()} - {opt.block_by_name[n].param for n in opt.selected}
    assert inactive
    for n, p in model.named_parameters():
        if n in inactive:
            expected = before[n] * (1 - 1e-2 * 0.1) - 1e-2 * torch.sign(grads[n])
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
        else:  # Adam's first step moves each coordinate by lr * g / (|g| + eps) plus decay
            step = (before[n] * (1 - 1e-2 * 0.1) - p.detach()).abs()
            assert step.max() <= 1e-2 + 1e-6 and step.max() > 0.5e-2, n


def test_frozen_rest_gets_no_gradient_with_always_trained_tensors():
    model = tiny_llama()
    opt = block_optimizer(model.named_parameters(), lr=1e-2, **dict(FRUGAL, inactive="none"))
    train_block(opt, model, global_batches(1, 1))
    (mb,) = global_batches(1, 1, seed=5)[0]
    causal_lm_loss(model, mb).backward()
    adam = {opt.block_by_name[n].param for n in opt.selected}
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in adam), n


def test_config_rejects_a_pattern_both_frozen_and_always_trained():
    with pytest.raises(ValueError, match="both frozen_patterns and always_train"):
        block_optimizer(tiny_llama().named_parameters(), lr=1e-2, frozen_patterns=("embed",),
                       always_train=("embed",), inactive="sign")


def _run(world, steps, stage, kw):
    rank = dist.get_rank() if dist.is_initialized() else 0
    model = tiny_llama()
    opt = block_optimizer(model.named_parameters(), lr=1e-2, debug_checks=world > 1, max_grad_norm=1.0, **kw)
    opt.zero_stage = stage
    per_rank = [[step[k * world + rank] for k in range(len(step) // world)]
                for step in global_batches(steps, 12)]
    losses = train_block(opt, model, per_rank)
    inactive = sum(b.numel for b in opt._inactive_blocks())
    adam_bytes = sum(opt.block_by_name[n].numel * 4 for n in opt.selected)
    return {"losses": losses, "history": opt.selection_history, "wire": opt.wire_bytes_last_step,
            "state_bytes": opt.state_bytes(), "inactive": inactive, "adam_bytes": adam_bytes,
            "grad_norm": opt.last_grad_norm,
            "weights_sha": hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                                   for p in model.parameters())).hexdigest()}


@pytest.fixture(scope="module")
def one_rank_sign():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every rank (see conftest.one_thread)
    try:
        return {k: _run(1, 16, 2, kw) for k, kw in (("plain", FRUGAL),
                                                    ("galore8", dict(FRUGAL, projection="galore", rank=4,
                                                                     eight_bit=True)))}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("world,stage,kind", [(2, 0, "plain"), (3, 2, "plain"), (3, 1, "galore8")])
def test_sign_rule_over_ranks_equals_one_rank(ranks, one_rank_sign, world, stage, kind):
    kw = FRUGAL if kind == "plain" else dict(FRUGAL, projection="galore", rank=4, eight_bit=True)
    ref = one_rank_sign[kind]
    results = ranks(_run, world, world, 16, stage, kw)
    assert len(ref["history"]) == 3  # reselected at 7 and 14
    for r in results:
        assert r["history"] == ref["history"]
        # a coordinate whose averaged gradient is within rounding of zero can take the other sign at
        # another world size (another summation order) and move by 2 lr, so runs agree to about 1e-3
        # (signs applied to the wrong weights diverge by far more)
        assert max(abs(a - b) for a, b in zip(r["losses"], ref["losses"])) <= 5e-3
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0  # (the flips above move it by %)
    assert len({r["weights_sha"] for r in results}) == 1  # every rank applied the same signs
    if stage > 0:
        assert sum(r["state_bytes"] for r in results) == ref["state_bytes"]
    # bytes: the Adam part as before; the sign part, at every stage, a reduce-scatter of fp32
    # values and an all-gather of 2-bit codes, each (W-1)/W of the padded buffer (one bucket at
    # this size; stage 0 adds the shards' squared norm, 8 bytes, inside the tolerance)
    n = results[0]["inactive"]
    padded = -(-n // (4 * world)) * 4 * world
    sign_part = (world - 1) * (padded * 4 + padded // 4) // world
    adam_part = {0: 2, 1: 3, 2: 2}[stage] * (world - 1) * results[0]["adam_bytes"] / world
    for r in results:
        assert abs(r["wire"] - (sign_part + adam_part)) <= 16 * world, (r["wire"], sign_part + adam_part)
    if stage in (0, 2):  # less than DDP's all-reduce of every gradient (the sign part: about half)
        ddp = 2 * (world - 1) / world * 4 * sum(p.numel() for p in tiny_llama().parameters())
        assert results[0]["wire"] < ddp
