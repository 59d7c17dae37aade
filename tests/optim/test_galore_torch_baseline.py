"""optim.name galore_torch: galore-torch's GaLoreAdamW with GaLore's param grouping, its basis
counted as state, and a name-keyed state that resumes bit-identically."""
import copy
import io

import pytest
import torch

pytest.importorskip("galore_torch")
from galore_torch import GaLoreAdamW  # noqa: E402

from scaletrain.config import OptimConfig  # noqa: E402
from scaletrain.models.llama import build_model, causal_lm_loss  # noqa: E402
from scaletrain.optim import build_optimizer  # noqa: E402
from scaletrain.optim.schedule import build_scheduler  # noqa: E402
from scaletrain.trainer import optimizer_state_bytes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 64
# gap 2: the basis is refit at steps 0, 2, 4, so a few steps cross refits
CFG = OptimConfig(name="galore_torch", lr=1e-2, rank=8, update_proj_gap=2, proj_scale=0.25)


def tiny_model():
    return build_model("llama_9m", VOCAB, seed=0)


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 17), generator=g) for _ in range(n)]


def by_hand(model):
    """GaLoreAdamW set up as GaLore's C4 script, independently of the builder."""
    lowrank = [p for n, p in model.named_parameters() if p.dim() == 2 and ("attn" in n or "mlp" in n)]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and ("attn" in n or "mlp" in n))]
    return GaLoreAdamW([{"params": rest}, {"params": lowrank, "rank": 8, "update_proj_gap": 2,
                                           "scale": 0.25, "proj_type": "std"}],
                       lr=1e-2, eps=1e-8, no_deprecation_warning=True)


def step_both(pairs, mb):
    """One step of every (model, optimizer) pair with the first model's gradients."""
    (m0, _), *_ = pairs
    causal_lm_loss(m0, mb).backward()
    grads = [p.grad.clone() for p in m0.parameters()]
    for model, opt in pairs:
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)


def assert_same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_matches_galore_torch_by_hand_and_changes_weights():
    ours, ref = tiny_model(), tiny_model()
    initial = copy.deepcopy(ours.state_dict())
    opt, syncs_grads = build_optimizer(CFG, ours)
    assert syncs_grads is False  # the engine all-reduces, as for adamw
    pairs = [(ours, opt), (ref, by_hand(ref))]
    for mb in batches(5):
        step_both(pairs, mb)
    assert_same_weights(ours, ref)
    for name, p in ours.named_parameters():
        assert not torch.equal(p, initial[name]), f"{name} did not move"


def test_projects_attention_and_mlp_only_and_counts_the_basis():
    model = tiny_model()
    opt, _ = build_optimizer(CFG, model)
    step_both([(model, opt)], batches(1)[0])
    params = dict(model.named_parameters())
    q, emb = params["model.layers.0.self_attn.q_proj.weight"], params["model.embed_tokens.weight"]
    assert 8 in opt.state[q]["exp_avg"].shape and opt.state[q]["exp_avg"].numel() < q.numel()
    assert opt.state[emb]["exp_avg"].shape == emb.shape
    expected = sum(s["exp_avg"].nbytes + s["exp_avg_sq"].nbytes + s["projector"].ortho_matrix.nbytes
                   if "projector" in s else s["exp_avg"].nbytes + s["exp_avg_sq"].nbytes
                   for s in opt.state.values())
    assert optimizer_state_bytes(opt) == expected


def test_lr_schedule_scales_every_group():
    opt, _ = build_optimizer(CFG, tiny_model())
    sched = build_scheduler(opt, total_steps=10, warmup_steps=4, min_lr_ratio=0.1)
    assert len(opt.param_groups) == 2
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(CFG.lr / 4)] * 2
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(CFG.lr / 2)] * 2


def test_saved_state_loads_weights_only_and_resumes_bit_identically():
    whole = tiny_model()
    whole_opt, _ = build_optimizer(CFG, whole)
    data = batches(6)
    for mb in data[:3]:
        step_both([(whole, whole_opt)], mb)
    buf = io.BytesIO()
    torch.save(whole_opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # as the checkpoint loads it: no pickled objects
    resumed = copy.deepcopy(whole)
    resumed_opt, _ = build_optimizer(CFG, resumed)
    resumed_opt.load_state_dict_shards([saved, saved])
    for mb in data[3:]:  # crosses the refit at step 4
        step_both([(whole, whole_opt), (resumed, resumed_opt)], mb)
    assert_same_weights(whole, resumed)


def test_another_optimizers_state_is_refused():
    from scaletrain.checkpoint import CheckpointError

    opt, _ = build_optimizer(CFG, tiny_model())
    with pytest.raises(CheckpointError, match="not galore_torch's"):
        opt.load_state_dict_shards([{"blocks": {}, "selected": []}])


def test_flat_partitions_are_refused_with_the_fix():
    """DeepSpeed ZeRO-1/2 gives the client optimizer flat 1-D partitions instead of the weights."""
    opt, _ = build_optimizer(CFG, tiny_model())
    flat = torch.nn.Parameter(torch.zeros(16))
    flat.grad = torch.ones(16)
    opt.param_groups[1]["params"] = [flat]
    with pytest.raises(RuntimeError, match="zero_optimization.stage 0"):
        opt.step()
