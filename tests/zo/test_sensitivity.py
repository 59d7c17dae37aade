"""Fisher-diagonal sensitivity and the top-k mask."""
import io

import pytest
import torch

from scaletrain.models.llama import causal_lm_loss
from scaletrain.zo.sensitivity import Mask, candidate_names, compute_mask, fisher_diagonal, top_mask
from tests.zo.tiny import tiny_llama, windows


def test_candidates_are_the_attention_and_mlp_projections():
    model = tiny_llama()
    names = candidate_names(model, ("self_attn", "mlp"))
    assert len(names) == 2 * 7
    assert {n.split(".")[-2] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}
    assert "lm_head.weight" in candidate_names(model, ("",))


def test_fisher_is_the_sum_of_per_sequence_squared_gradients():
    model = tiny_llama()
    seqs = windows(64, 3, 17)
    names = candidate_names(model, ("self_attn", "mlp"))
    fisher, spans = fisher_diagonal(model, names, seqs, causal_lm_loss)
    params = dict(model.named_parameters())
    want = {n: torch.zeros_like(params[n]) for n in names}
    for s in seqs:  # reference: plain autograd, one sequence at a time
        grads = torch.autograd.grad(causal_lm_loss(model, s), [params[n] for n in names])
        for n, g in zip(names, grads):
            want[n] += g.square()
    for n in names:
        a, k = spans[n]
        torch.testing.assert_close(fisher[a:a + k].view_as(params[n]), want[n], rtol=1e-5, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # every gradient freed at once


def test_global_and_per_matrix_top_k():
    g = torch.Generator().manual_seed(0)
    spans = {"a": (0, 100), "b": (100, 300), "c": (400, 50)}
    shapes = {"a": [10, 10], "b": [10, 30], "c": [5, 10]}
    fisher = torch.rand(450, generator=g)
    fisher[100:400] *= 3  # matrix b is the most sensitive
    mask = top_mask(fisher, spans, shapes, 0.1, "global")
    assert sum(i.numel() for i in mask.values()) == 45  # exactly round(density x candidates)
    chosen = torch.cat([i + spans[n][0] for n, i in mask.items()])
    assert set(chosen.tolist()) == set(torch.topk(fisher, 45).indices.tolist())
    assert mask["b"].numel() > 30 and all(bool((i[1:] > i[:-1]).all()) for i in mask.values() if i.numel() > 1)
    per = top_mask(fisher, spans, shapes, 0.1, "per_matrix")
    assert [per[n].numel() for n in "abc"] == [10, 30, 5]
    with pytest.raises(ValueError):
        top_mask(fisher, spans, shapes, 0.0)


def test_mask_round_trips_through_a_weights_only_file():
    model = tiny_llama()
    mask = compute_mask(model, ("self_attn", "mlp"), windows(64, 2, 9), causal_lm_loss, 0.01)
    assert mask.count == round(0.01 * mask.candidates)
    assert 0.0 < mask.meta["fisher_share"] <= 1.0
    buf = io.BytesIO()
    torch.save(mask.state_dict(), buf)
    buf.seek(0)
    back = Mask.from_state_dict(torch.load(buf, weights_only=True))
    assert back.names == mask.names and back.density == mask.density
    assert all(torch.equal(back.indices[n], mask.indices[n]) for n in mask.names)
    assert back.checksum() == mask.checksum()
