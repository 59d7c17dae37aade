"""The block optimizer: exact AdamW at density 1, global selection over real gloo ranks,
frozen blocks untouched, state size, BlockLLM's patience rule, name-keyed state round trip."""
import hashlib
import io

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from scaletrain.models.llama import causal_lm_loss
from scaletrain.optim.selection import BlockSelector, partition_blocks, reselection_due
from scaletrain.optim.selecting import SelectsBlocks
from tests.optim.paper_rule import block_optimizer

VOCAB, MICRO = 128, 2


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, num_key_value_heads=4,
                                        num_hidden_layers=2, max_position_embeddings=64,
                                        tie_word_embeddings=False))


def global_batches(steps, micro_batches, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, VOCAB, (MICRO, 17), generator=g) for _ in range(micro_batches)]
            for _ in range(steps)]


def train_block(opt, model, batches_per_step, first_step=0):
    """The trainer's step, by hand: selection pass when wanted, accumulate, step, record loss
    (any optimizer: the selection calls only for one that SelectsBlocks)."""
    selects = isinstance(opt, SelectsBlocks)
    losses = []
    for step, micro in enumerate(batches_per_step, start=first_step):
        if selects and opt.wants_selection(step):
            with opt.selection_pass(step=step):
                for mb in micro:
                    causal_lm_loss(model, mb).backward()
        total = 0.0
        for mb in micro:
            loss = causal_lm_loss(model, mb)
            (loss / len(micro)).backward()
            total += loss.item() / len(micro)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dist.is_initialized():
            t = torch.tensor([total], dtype=torch.float64)
            dist.all_reduce(t)
            total = t.item() / dist.get_world_size()
        if selects:
            opt.record_loss(total)
        losses.append(total)
    return losses


def test_density_one_equals_torch_adamw_bit_for_bit():
    a, b = tiny_llama(), tiny_llama()
    ours = block_optimizer(a.named_parameters(), lr=1e-2, weight_decay=0.1, density=1.0,
                          frozen_patterns=(), check_every=10**9)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for step, (mb,) in enumerate(global_batches(20, 1)):
        if ours.wants_selection(step):
            with ours.selection_pass(step=step):
                causal_lm_loss(a, mb).backward()
            assert len(ours.selected) == len(list(a.parameters()))
        for model, opt in ((a, ours), (b, ref)):
            causal_lm_loss(model, mb).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_frozen_blocks_get_no_gradient_and_never_move():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = block_optimizer(model.named_parameters(), lr=1e-2, density=0.1, check_every=10**9)
    for step, (mb,) in enumerate(global_batches(5, 1)):
        if opt.wants_selection(step):
            with opt.selection_pass(step=step):
                causal_lm_loss(model, mb).backward()
        causal_lm_loss(model, mb).backward()
        selected_params = {opt.block_by_name[n].param for n in opt.selected}
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in selected_params), n
        opt.step()
        opt.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (n in selected_params), n
    assert "model.embed_tokens.weight" not in selected_params and "lm_head.weight" not in selected_params


def test_state_bytes_are_exact_and_within_density_budget():
    model = tiny_llama()
    opt = block_optimizer(model.named_parameters(), lr=1e-2, density=0.2, check_every=10**9)
    train_block(opt, model, global_batches(3, 1))
    exact = sum(t.numel() * t.element_size() for s in opt.block_state.values() for t in s.values()
                if torch.is_tensor(t))
    assert opt.stats()["optim_state_bytes"] == exact > 0
    n_params = sum(p.numel() for p in model.parameters())
    assert exact <= 8 * 0.2 * n_params
    assert opt.stats()["selected_params"] <= opt.budget


def test_selector_skips_an_overflowing_block_and_breaks_ties_by_name():
    blocks, budget = partition_blocks([("a", torch.Size([10])), ("b", torch.Size([6])),
                                       ("c", torch.Size([4])), ("d", torch.Size([4]))], (), 0.5, 1.0)
    assert budget == 12
    sel = BlockSelector(blocks, budget)
    # 'b' ranks first and fits (6); 'a' (10) would overflow and is skipped; 'c','d' tie -> by name
    assert sel.select({"a": 5.0, "b": 9.0, "c": 1.0, "d": 1.0}, step=1) == ["b", "c"]


def _sampling_selector():
    blocks, budget = partition_blocks([(f"b{i}", torch.Size([4])) for i in range(10)], (), 0.2, 1.0)
    return BlockSelector(blocks, budget, policy="sample")  # budget 8: two blocks a selection


def test_sampling_is_seeded_by_the_step_and_fills_the_budget():
    norms = {f"b{i}": float(i + 1) for i in range(10)}
    first, again = _sampling_selector(), _sampling_selector()
    draws = [first.select(norms, step) for step in range(0, 500, 50)]
    assert draws == [again.select(norms, step) for step in range(0, 500, 50)]  # what every rank draws
    assert all(len(d) == 2 for d in draws)  # 2 x 4 values: the budget, full
    assert len({tuple(d) for d in draws}) > 3  # another step, another draw (greedy repeats one)


def test_sampling_follows_the_moving_average_of_the_norms():
    """Over many draws, a block is chosen about in proportion to its norm; a block whose norm
    was zero at every pass is never chosen while others can fill the budget."""
    counts = {f"b{i}": 0 for i in range(10)}
    sel = _sampling_selector()
    norms = {f"b{i}": (0.0 if i == 0 else 8.0 if i == 9 else 1.0) for i in range(10)}
    for step in range(400):
        for name in sel.select(norms, step):
            counts[name] += 1
    assert counts["b0"] == 0
    assert counts["b9"] > 3 * max(counts[f"b{i}"] for i in range(1, 9))
    assert sel.importance == pytest.approx(norms)  # a constant norm is its own average
    sel.select({**norms, "b1": 5.0}, 400)
    assert sel.importance["b1"] == pytest.approx(3.0)  # halfway to the new norm (IMPORTANCE_DECAY)


def test_large_tensors_compete_as_row_chunks():
    model = tiny_llama()
    opt = block_optimizer(model.named_parameters(), lr=1e-2, density=0.05, frozen_patterns=(),
                         max_block_fraction=0.5)
    chunks = [b for b in opt.blocks if b.rows is not None]
    assert {b.param for b in chunks} >= {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(b.numel <= 0.5 * opt.budget for b in chunks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_block(opt, model, global_batches(3, 1))
    for b in (opt.block_by_name[n] for n in opt.selected if opt.block_by_name[n].rows):
        w, w0 = dict(model.named_parameters())[b.param], before[b.param]
        rows = torch.zeros(w.shape[0], dtype=torch.bool)
        rows[b.rows[0]:b.rows[1]] = True
        other_selected = [c for c in (opt.block_by_name[n] for n in opt.selected)
                          if c.param == b.param and c.rows]
        for c in other_selected:
            rows[c.rows[0]:c.rows[1]] = True
        assert torch.equal(w[~rows], w0[~rows])  # rows of unselected chunks never move


@pytest.mark.parametrize("history, patience, fires", [
    ([5.0, 4.0, 3.0, 2.0], 3, False),   # improving: last-3 mean 3.0 < overall 3.5
    ([1.0, 2.0, 3.0, 4.0], 2, True),    # worsening: last-2 mean 3.5 > overall 2.5
    ([2.0, 3.0, 3.0, 3.0], 3, True),    # stalled after a rise: last-3 mean 3.0 > overall 2.75
    ([4.0, 4.0, 4.0], 3, False),        # not more than `patience` losses yet
    ([2.0, 1.0, 1.0, 1.0, 1.0], 4, False),  # flat tail: equal means do not fire
])
def test_patience_rule_fires_exactly_when_recent_mean_exceeds_overall_mean(history, patience, fires):
    overall, recent = sum(history) / len(history), sum(history[-patience:]) / patience
    assert fires == (len(history) > patience and recent > overall)  # the cases say what they claim
    assert reselection_due(history, patience) == (len(history) > patience and recent > overall)


def test_check_every_gates_the_patience_rule():
    model = tiny_llama()
    opt = block_optimizer(model.named_parameters(), lr=1e-2, density=0.2, patience=2, check_every=4)
    opt.wants_selection(0)
    opt._apply_selection([opt.blocks[0].name])
    for loss in (1.0, 2.0, 3.0):  # getting worse: the rule holds from the 3rd loss on
        opt.record_loss(loss)
    assert not opt.wants_selection(3)  # rule holds, but 3 is not a check step
    assert opt.wants_selection(4)


def test_state_dict_round_trip_weights_only_continues_bit_identically():
    batches = global_batches(12, 1)
    a = tiny_llama()
    opt_a = block_optimizer(a.named_parameters(), lr=1e-2, density=0.2, reselect_every=4)
    train_block(opt_a, a, batches[:6])
    buf = io.BytesIO()
    torch.save({"opt": opt_a.state_dict(), "model": a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b = tiny_llama(seed=99)
    b.load_state_dict(saved["model"])
    opt_b = block_optimizer(b.named_parameters(), lr=1e-2, density=0.2, reselect_every=4)
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.selected == opt_a.selected
    rest_a = [train_block_at(opt_a, a, batches[step], step) for step in range(6, 12)]
    rest_b = [train_block_at(opt_b, b, batches[step], step) for step in range(6, 12)]
    assert len(opt_b.selection_history) == 3  # it reselected at step 8 after loading, like a
    assert rest_a == rest_b


def train_block_at(opt, model, micro, step):
    if opt.wants_selection(step):
        with opt.selection_pass(step=step):
            for mb in micro:
                causal_lm_loss(model, mb).backward()
    loss = causal_lm_loss(model, micro[0])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    opt.record_loss(loss.item())
    return [loss.item()]


def _ranked_run(world, steps, keep_state=False, stage=2, selection="greedy"):
    """Each rank trains on its slice of the same global batches (micro-batches k*W + r)."""
    rank = dist.get_rank()
    model = tiny_llama()
    opt = block_optimizer(model.named_parameters(), lr=1e-2, density=0.2, reselect_every=7,
                         keep_state_on_reselect=keep_state, debug_checks=True, selection=selection)
    opt.zero_stage = stage
    per_rank = [[step[k * world + rank] for k in range(len(step) // world)]
                for step in global_batches(steps, 12)]
    losses = train_block(opt, model, per_rank)
    selected_bytes = sum(opt.block_by_name[n].numel * 4 for n in opt.selected)
    return {"losses": losses, "history": opt.selection_history, "wire": opt.wire_bytes_last_step,
            "owned": sorted(opt.block_state), "state_bytes": opt.state_bytes(),
            "selected_grad_bytes": selected_bytes,
            "weights_sha": hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                                   for p in model.parameters())).hexdigest()}


def _one_rank(keep_state, selection="greedy"):
    model = tiny_llama()
    opt = block_optimizer(model.named_parameters(), lr=1e-2, density=0.2, reselect_every=7,
                         keep_state_on_reselect=keep_state, selection=selection)
    losses = train_block(opt, model, global_batches(20, 12))
    return {"losses": losses, "history": opt.selection_history, "state_bytes": opt.state_bytes(),
            "owned": sorted(opt.block_state),
            "largest_state": max(opt.block_by_name[n].numel for n in opt.selected) * 8}


@pytest.fixture(scope="module")
def one_rank_result():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every rank: same kernels, same rounding (see conftest.one_thread)
    try:
        return _one_rank(keep_state=False)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("world,stage", [(w, s) for w in (2, 3, 4) for s in (0, 1, 2)])
def test_selection_and_losses_match_one_rank(ranks, one_rank_result, world, stage):
    results = ranks(_ranked_run, world, world, 20, False, stage)
    ref = one_rank_result
    assert len(ref["history"]) == 3  # steps 0, 7, 14: reselection is covered
    for r in results:
        assert r["history"] == ref["history"]  # same blocks, same order, every selection
        assert max(abs(a - b) for a, b in zip(r["losses"], ref["losses"])) <= 1e-5
    # every rank ends with bit-identical weights (owners' broadcasts; identical updates at stage 0)
    assert len({r["weights_sha"] for r in results}) == 1
    owned = [name for r in results for name in r["owned"]]
    grad_bytes = results[0]["selected_grad_bytes"]
    if stage == 0:  # DDP-like: every rank holds every selected block's state
        assert all(r["owned"] == ref["owned"] and r["state_bytes"] == ref["state_bytes"] for r in results)
        hand = 2 * (world - 1) * grad_bytes / world  # ring all-reduce
    else:  # ZeRO for selected blocks: each block's state on exactly one rank, bytes add up, balanced
        assert sorted(owned) == ref["owned"]
        assert sum(r["state_bytes"] for r in results) == ref["state_bytes"]
        assert max(r["state_bytes"] for r in results) <= ref["state_bytes"] / world + ref["largest_state"]
        # stage 2: reduce-to-owner + broadcast, (W-1)/W of each buffer each; stage 1: all-reduce + broadcast
        hand = (2 if stage == 2 else 3) * (world - 1) * grad_bytes / world
    assert all(abs(r["wire"] - hand) <= 8 * world for r in results), ([r["wire"] for r in results], hand)


def test_sampled_selection_over_ranks_equals_one_rank(ranks, one_thread):
    """selection "sample": the draw depends only on the step and the all-reduced norms, so 3 ranks
    choose what one rank chooses."""
    ref = _one_rank(keep_state=False, selection="sample")
    greedy = _one_rank(keep_state=False)
    assert ref["history"] != greedy["history"]
    for r in ranks(_ranked_run, 3, 3, 20, False, 2, "sample"):
        assert r["history"] == ref["history"]
        assert max(abs(a - b) for a, b in zip(r["losses"], ref["losses"])) <= 1e-5


def test_sampling_state_round_trips_through_the_optimizer_state():
    model = tiny_llama()
    opt = block_optimizer(model.named_parameters(), lr=1e-2, density=0.2, reselect_every=2, selection="sample")
    train_block(opt, model, global_batches(3, 1))
    saved = opt.state_dict()
    assert saved["importance"] and saved["importance"] == opt.selector.importance
    fresh = block_optimizer(tiny_llama().named_parameters(), lr=1e-2, density=0.2, reselect_every=2,
                            selection="sample")
    fresh.load_state_dict(saved)
    assert fresh.selector.importance == opt.selector.importance


def test_kept_state_moves_to_its_new_owner(ranks, one_thread):
    """keep_state_on_reselect: a block that stays selected but changes owner keeps its moments."""
    ref = _one_rank(keep_state=True)
    results = ranks(_ranked_run, 3, 3, 20, True)
    for r in results:
        assert max(abs(a - b) for a, b in zip(r["losses"], ref["losses"])) <= 1e-5
    assert sum(r["state_bytes"] for r in results) == ref["state_bytes"]


def _wire_ratio_llama20m():
    from scaletrain.models.llama import build_model

    world = dist.get_world_size()
    model = build_model("llama_20m", 32000, seed=0)
    opt = block_optimizer(model.named_parameters(), lr=1e-3, density=0.05)
    batch = torch.randint(0, 32000, (1, 17), generator=torch.Generator().manual_seed(dist.get_rank()))
    train_block(opt, model, [[batch]] * 2)
    ddp_allreduce = 2 * (world - 1) / world * sum(p.numel() * 4 for p in model.parameters())
    return opt.wire_bytes_last_step / ddp_allreduce


def test_wire_bytes_at_two_ranks_are_a_small_fraction_of_ddp(ranks):
    ratios = ranks(_wire_ratio_llama20m, 2)
    assert all(0 < r <= 0.12 for r in ratios), ratios


def test_selection_with_a_non_finite_gradient_norm_keeps_the_current_selection(caplog):
    """A NaN in one block's gradient during a selection pass (a bad batch, an overflow) must not
    decide the selection: the blocks chosen before stay, and the log says why."""
    model = tiny_llama()
    opt = block_optimizer(model.named_parameters(), lr=1e-2, density=0.3, frozen_patterns=(),
                         always_train=(), reselect_every=1)
    batch = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    assert opt.wants_selection(0)
    with opt.selection_pass(step=0):
        causal_lm_loss(model, batch).backward()
    before = list(opt.chosen)
    assert opt.wants_selection(1)
    with opt.selection_pass(step=1):
        loss = causal_lm_loss(model, batch)
        (loss * torch.tensor(float("nan"))).backward()
    assert opt.chosen == before
    assert "selection at step 1 skipped: gradient norm not finite" in caplog.text
