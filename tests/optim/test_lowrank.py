"""Low-rank states inside blocks: GaLore against galore-torch, GradNormLoRP's chain rule and its
full-rank limit, the randomized SVD, 2/3 ranks against 1 for each projection, and projected
8-bit state resharded exactly to another world size."""
import io

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from scaletrain.models.llama import causal_lm_loss
from scaletrain.optim.lowrank import GaLoreProjector
from scaletrain.optim.update_rules import GradNormLoRPRule
from tests.optim.test_blockllm import VOCAB, global_batches, tiny_llama, train_block
from tests.optim.paper_rule import block_optimizer

RANK, GAP = 8, 4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_dense_galore_matches_galore_torch_given_the_same_gradients():
    galore_torch = pytest.importorskip("galore_torch", reason="galore-torch is a dev dependency")
    ours_model, ref_model = tiny_llama(), tiny_llama()
    ours = block_optimizer(ours_model.named_parameters(), lr=1e-2, weight_decay=0.01, select_all=True,
                          frozen_patterns=(), density=1.0, projection="galore", rank=RANK,
                          update_proj_gap=GAP, proj_scale=0.25, svd="full")
    lowrank = [p for n, p in ref_model.named_parameters() if p.dim() == 2 and ("attn" in n or "mlp" in n)]
    rest = [p for p in ref_model.parameters() if all(p is not q for q in lowrank)]
    ref = galore_torch.GaLoreAdamW(
        [{"params": rest}, {"params": lowrank, "rank": RANK, "update_proj_gap": GAP, "scale": 0.25,
                            "proj_type": "std"}], lr=1e-2, weight_decay=0.01, eps=1e-8,
        no_deprecation_warning=True)
    assert not ours.block_state  # no state before the first update
    for (mb,) in global_batches(10, 1):  # refits at updates 1, 5 and 9
        causal_lm_loss(ours_model, mb).backward()
        for p, q in zip(ours_model.parameters(), ref_model.parameters()):
            q.grad = p.grad.clone()  # the same gradients for both
        ours.step()
        ref.step()
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        for (name, p), q in zip(ours_model.named_parameters(), ref_model.parameters()):
            assert _rel(p.detach(), q.detach()) <= 1e-5, name
    n_proj = sum("proj" in s for s in ours.block_state.values())
    assert n_proj == len(lowrank) == 14  # 2 layers x (q, k, v, o, gate, up, down)


def test_projector_shape_rule_and_moment_size():
    proj = GaLoreProjector(rank=4, scale=1.0)
    tall, wide = torch.randn(24, 10), torch.randn(10, 24)
    assert proj.side(tall.shape) == "right" and proj.basis_shape(tall.shape) == (4, 10)
    assert proj.side(wide.shape) == "left" and proj.basis_shape(wide.shape) == (10, 4)
    for g in (tall, wide):
        basis = proj.fit(g)
        low = proj.project(g, basis)
        assert low.shape == proj.moment_shape(g.shape)
        back = proj.project_back(low, basis, g.shape)
        # the top-4 SVD reconstruction is the best rank-4 approximation
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        assert torch.allclose(back, best, atol=1e-5)
    assert not proj.applies_to(torch.Size([4, 100])) and not proj.applies_to(torch.Size([100]))


def test_randomized_svd_is_seeded_and_captures_the_top_subspace():
    torch.manual_seed(0)
    g = torch.randn(256, 16) @ torch.randn(16, 96) + 0.01 * torch.randn(256, 96)  # rank ~16 + noise
    full, fast = GaLoreProjector(16, 1.0, "full"), GaLoreProjector(16, 1.0, "lowrank")
    state = torch.get_rng_state()
    a, b = fast.fit(g, "w", 3), fast.fit(g, "w", 3)
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())  # no global RNG use
    energy = lambda basis: (fast.project(g, basis).norm() / g.norm()).item()  # noqa: E731
    assert energy(a) >= energy(full.fit(g)) - 1e-3


def test_gradnorm_chain_rule_matches_autograd():
    torch.manual_seed(0)
    w = torch.randn(6, 9, dtype=torch.float64)
    g_mag = w.norm(dim=1, keepdim=True).requires_grad_(True)
    v = (w / w.norm(dim=1, keepdim=True)).requires_grad_(True)
    target = torch.randn(6, 9, dtype=torch.float64)
    w_of = lambda g, v: g * v / v.norm(dim=1, keepdim=True)  # noqa: E731
    w_leaf = w.clone().requires_grad_(True)
    ((w_leaf - target) ** 3).sum().backward()
    ((w_of(g_mag, v) - target) ** 3).sum().backward()
    mag, direction, grad_mag, grad_dir = GradNormLoRPRule.split_gradient(w, w_leaf.grad)
    assert torch.allclose(grad_mag, g_mag.grad, rtol=1e-10)
    assert torch.allclose(grad_dir, v.grad, rtol=1e-10)
    # and back: grad W = D grad m + grad D / m
    assert torch.allclose(direction * grad_mag + grad_dir / mag, w_leaf.grad, rtol=1e-10)


def test_gradnorm_at_full_rank_equals_dense_adam_on_magnitude_and_direction():
    """No projection (rank >= the smaller side): our update on W equals torch.optim.Adam on the
    reparametrised model W = g * V / ||V|| with V renormalised after each step."""
    torch.manual_seed(0)
    w0, x, y = torch.randn(12, 20) * 0.3, torch.randn(32, 20), torch.randn(32, 12)
    loss_of = lambda w: ((x @ w.T - y) ** 2).mean()  # noqa: E731
    w = w0.clone().requires_grad_(True)
    ours = block_optimizer([("mlp.weight", w)], lr=1e-2, density=1.0, frozen_patterns=(),
                          select_all=True, projection="gradnorm_lorp", rank=64)
    g = w0.norm(dim=1, keepdim=True).clone().requires_grad_(True)
    v = (w0 / g.detach()).clone().requires_grad_(True)
    ref = torch.optim.Adam([g, v], lr=1e-2, foreach=False)
    for _ in range(10):
        loss_of(w).backward()
        ours.step()
        ours.zero_grad(set_to_none=True)
        loss_of(g * v / v.norm(dim=1, keepdim=True)).backward()
        ref.step()
        ref.zero_grad(set_to_none=True)
        with torch.no_grad():
            v /= v.norm(dim=1, keepdim=True)
        assert _rel(w.detach(), (g * v).detach()) <= 1e-5
    assert "proj" not in ours.block_state["mlp.weight"]


def test_gradnorm_with_projection_keeps_small_state_and_trains():
    model = tiny_llama()
    opt = block_optimizer(model.named_parameters(), lr=1e-2, select_all=True, frozen_patterns=(),
                         density=1.0, projection="gradnorm_lorp", rank=RANK, update_proj_gap=GAP)
    losses = train_block(opt, model, global_batches(1, 1) * 15)  # fit one batch
    assert losses[-1] < 0.9 * losses[0]
    st = opt.block_state["model.layers.0.mlp.down_proj.weight"]  # 32 x 64: left side
    assert st["proj"].shape == (32, RANK) and st["exp_avg"].shape == (RANK, 64)
    assert st["mag_exp_avg"].shape == (32,)


def _projected_run(world, projection, keep_state, steps=20):
    rank = dist.get_rank() if dist.is_initialized() else 0
    model = tiny_llama()
    opt = block_optimizer(model.named_parameters(), lr=1e-2, density=0.3, reselect_every=7,
                         keep_state_on_reselect=keep_state, projection=projection, rank=RANK,
                         update_proj_gap=GAP, debug_checks=world > 1)
    per_rank = [[step[k * world + rank] for k in range(len(step) // world)]
                for step in global_batches(steps, 6)]
    losses = train_block(opt, model, per_rank)
    return {"losses": losses, "history": opt.selection_history, "owned": sorted(opt.block_state),
            "projectors": sorted(n for n, s in opt.block_state.items() if "proj" in s),
            "state_bytes": opt.state_bytes()}


@pytest.mark.parametrize("projection", ["galore", "gradnorm_lorp"])
def test_two_and_three_ranks_match_one_rank(ranks, one_thread, projection):
    ref = _projected_run(1, projection, keep_state=True)
    assert ref["projectors"], "the selection should include projected blocks"
    for world in (2, 3):
        results = ranks(_projected_run, world, world, projection, True)
        for r in results:
            assert r["history"] == ref["history"]
            assert max(abs(a - b) for a, b in zip(r["losses"], ref["losses"])) <= 1e-5
        # projectors exist only on their owners: each exactly once across ranks
        assert sorted(n for r in results for n in r["projectors"]) == ref["projectors"]
        assert sum(r["state_bytes"] for r in results) == ref["state_bytes"]


def _wide_llama():
    """64 wide: at rank 32 the MLP moments have 128 x 32 = 4,096 values, so they are 8-bit."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                        num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                                        max_position_embeddings=64, tie_word_embeddings=False))


def _projected_8bit(model):  # every block, spread over the ranks by owner
    return block_optimizer(model.named_parameters(), lr=1e-2, select_all=True, frozen_patterns=(),
                          density=1.0, projection="galore", rank=32, update_proj_gap=GAP, eight_bit=True)


def _saved_projected_state(world):
    """2 ranks train with GaLore + 8-bit moments; each returns its optimizer state_dict."""
    model = _wide_llama()
    opt = _projected_8bit(model)
    rank = dist.get_rank()
    train_block(opt, model, [[step[k * world + rank] for k in range(len(step) // world)]
                             for step in global_batches(6, 4)])
    return _bytes(opt.state_dict())


def _bytes(obj) -> bytes:  # tensors cross the process boundary as bytes (the queue shares fds)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def _reload(world, shards):
    opt = _projected_8bit(_wide_llama())
    opt.load_state_dict_shards(shards)
    return _bytes(opt.block_state)


@pytest.mark.parametrize("new_world", [1, 3])
def test_projected_8bit_state_reshards_exactly_to_another_world_size(ranks, new_world):
    shards = [_load(b) for b in ranks(_saved_projected_state, 2, 2)]
    saved = {n: st for shard in shards for n, st in shard["blocks"].items()}
    assert sum(len(s["blocks"]) for s in shards) == len(saved)  # each block saved once, by its owner
    assert any("proj" in st and "exp_avg_q" in st for st in saved.values())
    loaded = [_load(b) for b in (ranks(_reload, new_world, new_world, shards) if new_world > 1
                                 else [_reload(1, shards)])]
    assert sorted(n for part in loaded for n in part) == sorted(saved)  # each on exactly one rank
    for part in loaded:
        for name, st in part.items():
            assert st.keys() == saved[name].keys()
            for key, value in st.items():
                assert torch.equal(value, saved[name][key]) if torch.is_tensor(value) else value == saved[name][key]
