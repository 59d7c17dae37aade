"""MeZO's two-point SPSA step on the sensitive coordinates."""
import pytest
import torch

from scaletrain.models.llama import causal_lm_loss
from scaletrain.zo import SPSA, ZOModel, compute_mask
from tests.zo.tiny import tiny_llama, windows

PATTERNS = ("self_attn", "mlp")


def _loss(model, w):
    """Next-token loss in the model's dtype (causal_lm_loss computes in float32)."""
    logits = model(input_ids=w[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())


def _closure(model, batches):
    def closure():
        return sum(_loss(model, b).item() for b in batches), float(len(batches))
    return closure


def _sparse(dtype=torch.float64, fmt="nf4", density=0.05, seed=0):
    model = tiny_llama(dtype=dtype, scale=3.0, seed=seed)
    mask = compute_mask(model, PATTERNS, windows(64, 2, 17), causal_lm_loss, density)
    return ZOModel(model, mask, PATTERNS, fmt, 64)


@pytest.mark.parametrize("mode", ["nf4", "dense"])
def test_projected_gradient_is_the_directional_derivative(mode):
    """g = (L(theta + eps z) - L(theta - eps z)) / 2 eps equals grad L . z (autograd), float64."""
    if mode == "dense":  # MeZO: every coordinate of the candidate weights, perturbed in place
        zm = ZOModel(tiny_llama(dtype=torch.float64, scale=3.0), None, PATTERNS, "none")
    else:
        zm = _sparse()
    batch = windows(64, 1, 25, seed=5)
    spsa = SPSA(zm.tensors, lr=0.0, eps=1e-6, samples=3, seed=7)
    before = [t.detach().clone() for t in zm.tensors]
    out = spsa.step(_closure(zm.model, batch), step=4)
    for t, b in zip(zm.tensors, before):  # restored (up to rounding of +eps, -2eps, +eps)
        torch.testing.assert_close(t, b, rtol=0, atol=1e-15)
    for t in zm.tensors:
        t.requires_grad_(True)
    grads = torch.autograd.grad(_loss(zm.model, batch[0]), zm.tensors)
    for t in zm.tensors:
        t.requires_grad_(False)
    for i, g in enumerate(out["g"]):
        dd = sum(float((gr * z).sum()) for gr, z in zip(grads, spsa.directions(spsa.seed_for(4, i))))
        assert g == pytest.approx(dd, rel=1e-6, abs=1e-9), (i, g, dd)
    assert len(set(out["g"])) == 3  # three different directions


@pytest.mark.parametrize("fmt", ["nf4", "none"])
def test_only_masked_coordinates_ever_change(fmt):
    zm = _sparse(torch.float32, fmt, density=0.02)
    model = zm.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}  # embedding, norms, head
    weights = {n: zm.effective_weight(n).clone() for n in zm.names}
    spsa = SPSA(zm.tensors, lr=1e-2, eps=1e-3, seed=1)
    batches = windows(64, 2, 17, seed=3)
    for step in range(5):
        spsa.step(_closure(model, batches), step)
    for n, p in model.named_parameters():
        assert torch.equal(p, frozen[n]), n
    changed = 0
    for n in zm.names:
        now = zm.effective_weight(n).reshape(-1)
        keep = torch.ones_like(now, dtype=torch.bool)
        keep[zm.mask.indices[n]] = False
        assert torch.equal(now[keep], weights[n].reshape(-1)[keep]), n  # bit-wise
        changed += int((now[~keep] != weights[n].reshape(-1)[~keep]).sum())
    assert changed == zm.mask.count  # every tuned coordinate moved


def test_update_is_lr_times_mean_g_z_plus_weight_decay():
    zm = _sparse(torch.float64)
    theta0 = zm.tensors[0].clone()
    lr, wd = 1e-2, 0.1
    spsa = SPSA(zm.tensors, lr=lr, eps=1e-4, samples=2, weight_decay=wd, seed=3)
    out = spsa.step(_closure(zm.model, windows(64, 2, 9, seed=2)), step=0)
    z = [next(spsa.directions(spsa.seed_for(0, i))) for i in range(2)]
    want = theta0 - lr * ((out["g"][0] * z[0] + out["g"][1] * z[1]) / 2 + wd * theta0)
    torch.testing.assert_close(zm.tensors[0], want, rtol=0, atol=1e-12)
    assert out["loss"] == pytest.approx((sum(out["loss_plus"]) + sum(out["loss_minus"])) / 4)

# 2 ranks vs 1 rank (same mask, same trajectory of g) over real gloo processes: see
# tests/test_finetune.py::test_zo_two_deepspeed_ranks_match_one_rank (the whole launch/finetune.py path).
