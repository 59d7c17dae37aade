"""scaletrain.memory_estimate / tools/estimate_memory.py: the optimizer parts against the bytes the
optimizers really allocate (torch AdamW, the block optimizer with every projection and 8-bit, at one
and two ranks), activations against autograd's saved tensors, and the CLI's JSON."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig

from scaletrain.memory_estimate import (DEFAULT_VOCAB, Setup, activation_bytes, block_shapes, estimate,
                                        model_spec, moment_bytes, selected_state_bytes)
from scaletrain.models.llama import build_model, causal_lm_loss
from scaletrain.optim.selection import ALWAYS_ROW_CHUNKS, partition_blocks
from tests.launching import REPO
from tests.optim.paper_rule import block_optimizer

PRESET, SEQ, MICRO = "llama_9m", 16, 1
# the tests' block_optimizer() defaults to BlockLLM's rule (embedding/head frozen, the rest frozen);
# the estimator's, like the trainer's, are the three kinds of parameters
BLOCKLLM = dict(frozen_patterns=("embed", "lm_head"), always_train=(), inactive="none")
BLOCKLLM_FP32 = dict(BLOCKLLM, eight_bit=False)  # the paper's rule as published (tests.optim.paper_rule)
ALWAYS = ("embed", "lm_head", "norm")


# tiny models: one intra-op thread is as fast, and immune to a busy machine's oversubscription
pytestmark = pytest.mark.usefixtures("one_thread")


def batch(seed=0, vocab=DEFAULT_VOCAB):
    return torch.randint(0, vocab, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def tensor_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))


def one_block_step(opt, model, seed=0):
    """Selection pass (if wanted) + one step, as the trainer does; returns the gradient bytes held
    after backward (before step)."""
    mb = batch(seed)
    if opt.wants_selection(0):
        with opt.selection_pass(step=0):
            causal_lm_loss(model, mb).backward()
    causal_lm_loss(model, mb).backward()
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    grad_bytes += sum(g.numel() * g.element_size() for g in getattr(opt, "_grad32", {}).values())  # bf16 runs
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_bytes


def test_default_vocab_is_the_shipped_tokenizers():
    from scaletrain.data import load_tokenizer

    assert load_tokenizer("default").vocab_size == DEFAULT_VOCAB


def test_spec_shapes_are_the_trainers_model():
    spec = model_spec(PRESET)
    model = build_model(PRESET, DEFAULT_VOCAB)
    assert spec.named_shapes == tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    assert spec.n_params == sum(p.numel() for p in model.parameters())


def test_adamw_state_equals_torch_adamw_after_a_step():
    model = build_model(PRESET, DEFAULT_VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)  # the registry's adamw on CPU
    causal_lm_loss(model, batch()).backward()
    opt.step()
    measured = sum(tensor_bytes(s) for s in opt.state.values())
    est = estimate(model_spec(PRESET), Setup(mode="adamw", zero_stage=0, world_size=1))
    assert est.max["optimizer_states"] == measured  # 8 B/param + a 4-byte 'step' per tensor
    assert est.max["gradients"] == est.max["weights"] == 4 * sum(p.numel() for p in model.parameters())


def test_adamw_zero_stages_divide_what_they_shard():
    spec, W = model_spec("llama_60m"), 8
    P = spec.n_params
    est = {st: estimate(spec, Setup(mode="adamw", zero_stage=st, world_size=W)) for st in (0, 1, 2, 3)}
    moments = {st: e.breakdown["optimizer_moments"] for st, e in est.items()}
    assert moments[0] == 8 * P and moments[1] == moments[2] == moments[3] == math.ceil(8 * P / W)
    assert est[1].breakdown["optimizer_master_weights"] == math.ceil(4 * P / W)  # DeepSpeed's fp32 partition
    assert est[1].mean["gradients"] == 4 * P and est[2].mean["gradients"] == math.ceil(4 * P / W)
    assert est[3].breakdown["weights_shard"] == math.ceil(4 * P / W)
    bf16 = estimate(spec, Setup(mode="adamw", zero_stage=2, world_size=W, dtype="bf16"))
    assert bf16.breakdown["weights_model"] == 2 * P
    assert bf16.breakdown["optimizer_master_weights"] == math.ceil(4 * P / W)


ROW_CASES = [("none", False), ("none", True), ("galore", False), ("galore", True),
             ("gradnorm_lorp", False), ("gradnorm_lorp", True)]


@pytest.mark.parametrize("projection,eight_bit", ROW_CASES)
def test_block_prediction_for_the_actual_selection_is_exact(projection, eight_bit):
    """llama_9m at density 0.05: its MLP weights exceed the budget, so row chunks compete too."""
    model = build_model(PRESET, DEFAULT_VOCAB)
    opt = block_optimizer(model.named_parameters(), lr=1e-3, density=0.05, check_every=10**9,
                         projection=projection, rank=32, eight_bit=eight_bit)
    grad_bytes = one_block_step(opt, model)
    spec = model_spec(PRESET)
    chosen = block_shapes([opt.block_by_name[n] for n in opt.selected], spec.named_shapes)
    predicted = selected_state_bytes(chosen, projection=projection, rank=32, eight_bit=eight_bit)[0]
    measured = opt.state_bytes()
    assert measured > 0 and abs(predicted["total"] - measured) <= 0.05 * measured
    assert predicted["total"] == measured  # the layout is known exactly
    if projection != "none":
        assert predicted["projection"] == sum(s["proj"].numel() * 4 for s in opt.block_state.values() if "proj" in s)
    # the worst case the budget allows bounds what this selection holds
    est = estimate(spec, Setup(mode="block", **BLOCKLLM, world_size=1, density=0.05, projection=projection, rank=32,
                               eight_bit=eight_bit))
    assert measured <= est.max["optimizer_states"] + est.max["projections"]
    assert grad_bytes <= est.max["gradients"]


@pytest.mark.parametrize("projection", ["none", "galore"])
def test_bf16_block_masters_are_predicted_exactly(projection):
    """bf16 weights: every held block adds its fp32 master (4 B/value) to the state, and the
    weights cost 2 B/param."""
    model = build_model(PRESET, DEFAULT_VOCAB).to(torch.bfloat16)
    opt = block_optimizer(model.named_parameters(), lr=1e-3, density=0.05, check_every=10**9,
                         projection=projection, rank=32)
    opt.use_master_weights()
    grad_bytes = one_block_step(opt, model)
    spec = model_spec(PRESET)
    chosen = block_shapes([opt.block_by_name[n] for n in opt.selected], spec.named_shapes)
    predicted = selected_state_bytes(chosen, projection=projection, rank=32, master=True)[0]
    assert predicted["total"] == opt.state_bytes()
    assert predicted["master"] == sum(s["master"].numel() * 4 for s in opt.block_state.values())
    est = estimate(spec, Setup(mode="block", **BLOCKLLM_FP32, world_size=1, density=0.05, projection=projection, rank=32,
                               dtype="bf16"))
    assert est.max["weights"] == 2 * spec.n_params
    assert opt.state_bytes() <= est.max["optimizer_states"] + est.max["projections"]
    assert grad_bytes <= est.max["gradients"]


@pytest.mark.parametrize("inactive,dtype", [("sign", "fp32"), ("none", "fp32"), ("sign", "bf16")])
def test_always_trained_state_and_sign_gradients_are_predicted(inactive, dtype):
    """The trainer's default kinds: always-trained tensors hold Adam state outside the budget (exact
    for the actual selection); with the sign rule every candidate holds a gradient until step()."""
    model = build_model(PRESET, DEFAULT_VOCAB)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    opt = block_optimizer(model.named_parameters(), lr=1e-3, density=0.05, frozen_patterns=(),
                         always_train=ALWAYS, inactive=inactive)
    if dtype == "bf16":
        opt.use_master_weights()
    grad_bytes = one_block_step(opt, model)
    spec = model_spec(PRESET)
    held = block_shapes([opt.block_by_name[n] for n in opt.selected], spec.named_shapes)
    predicted = selected_state_bytes(held, master=dtype == "bf16")[0]
    assert predicted["total"] == opt.state_bytes() > 0
    est = estimate(spec, Setup(mode="block", world_size=1, density=0.05, dtype=dtype, eight_bit=False,
                               always_train=ALWAYS, inactive=inactive, frozen_patterns=()))
    always = sum(p.numel() for n, p in model.named_parameters() if any(a in n for a in ALWAYS))
    assert est.info["always_params"] == always
    assert est.info["always_state_bytes"] == opt.always_state_bytes() == (12 if dtype == "bf16" else 8) * always
    assert opt.state_bytes() <= est.max["optimizer_states"] + est.max["projections"]
    assert grad_bytes <= est.max["gradients"]
    if inactive == "sign":  # every tensor held a gradient: the worst case is near what one selection holds
        assert est.max["gradients"] <= 1.1 * grad_bytes


def test_always_trained_tensors_count_in_the_most_loaded_rank():
    spec = model_spec("llama_60m")
    kinds = dict(always_train=ALWAYS, frozen_patterns=())
    one = estimate(spec, Setup(mode="block", world_size=1, density=0.05, **kinds))
    eight = estimate(spec, Setup(mode="block", world_size=8, density=0.05, **kinds))
    assert eight.mean["optimizer_states"] == math.ceil(one.mean["optimizer_states"] / 8)
    # the embedding and head are row chunks (selection.always_blocks), so no owner holds them whole
    largest = max(eight.info["largest_block_params"],
                  max(math.prod(s) for n, s in spec.named_shapes if "embed" in n) / ALWAYS_ROW_CHUNKS)
    assert eight.mean["optimizer_states"] <= eight.max["optimizer_states"]
    assert eight.max["optimizer_states"] <= one.max["optimizer_states"] / 8 + 8 * largest


def test_block_worst_case_is_the_budget_in_plain_adam():
    spec = model_spec("llama_60m")
    est = estimate(spec, Setup(mode="block", **BLOCKLLM_FP32, world_size=1, density=0.05))
    assert est.max["optimizer_states"] == 8 * est.info["budget_params"]
    est8 = estimate(spec, Setup(mode="block", **BLOCKLLM_FP32, world_size=8, density=0.05))
    blocks, budget = partition_blocks(spec.named_shapes, ("embed", "lm_head"), 0.05, 0.5)
    largest = max(b.numel for b in blocks)
    assert est8.mean["optimizer_states"] == math.ceil(8 * budget / 8)
    assert est8.max["optimizer_states"] <= 8 * budget / 8 + 8 * largest + 1


@pytest.mark.parametrize("mode", ["galore", "gradnorm_lorp"])
def test_dense_lowrank_modes_are_exact(mode):
    from scaletrain.config import OptimConfig
    from scaletrain.optim import build_optimizer

    model = build_model(PRESET, DEFAULT_VOCAB)
    opt, _ = build_optimizer(OptimConfig(name=mode, lr=1e-3, rank=32), model)
    one_block_step(opt, model)
    est = estimate(model_spec(PRESET), Setup(mode=mode, rank=32, world_size=1))
    assert est.max["optimizer_states"] + est.max["projections"] == opt.state_bytes()


def _two_rank_block():
    """Stage 2 (state on owners) and stage 0 (replicated) on the same selection, in one launch."""
    out = {}
    spec = model_spec(PRESET)
    for stage in (2, 0):
        model = build_model(PRESET, DEFAULT_VOCAB)
        opt = block_optimizer(model.named_parameters(), lr=1e-3, density=0.05, check_every=10**9,
                             projection="galore", rank=32, eight_bit=True)
        opt.zero_stage = stage
        one_block_step(opt, model, seed=dist.get_rank())
        chosen = block_shapes([opt.block_by_name[n] for n in opt.selected], spec.named_shapes)
        out[stage] = {"measured": opt.state_bytes(), "chosen": [(n, list(s)) for n, s in chosen]}
    out["zero2"] = _deepspeed_zero2_adamw_state()
    return out


def _deepspeed_zero2_adamw_state():
    """Dense AdamW under DeepSpeed ZeRO-2 (fp32): the rank's moments + step, and its fp32 master
    partition, measured after one step."""
    import deepspeed

    from scaletrain.distributed.runtime import skip_deepspeed_shm_allreduce

    skip_deepspeed_shm_allreduce()  # DeepSpeed's CPU shm all-reduce leaks /dev/shm (see runtime.py)
    model = build_model(PRESET, DEFAULT_VOCAB)
    client = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    engine, zero, _, _ = deepspeed.initialize(model=model, optimizer=client, config={
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
    engine.backward(causal_lm_loss(engine, batch(dist.get_rank())))
    engine.step()
    return {"states": sum(tensor_bytes(s) for s in zero.optimizer.state.values()),
            "master": sum(t.numel() * t.element_size() for t in zero.single_partition_of_fp32_groups)}


def test_block_and_zero2_per_rank_predictions_at_two_ranks(ranks):
    results = ranks(_two_rank_block, 2)
    for stage in (2, 0):
        chosen = [(n, tuple(s)) for n, s in results[0][stage]["chosen"]]
        assert chosen == [(n, tuple(s)) for n, s in results[1][stage]["chosen"]]  # one global selection
        measured = [r[stage]["measured"] for r in results]
        predicted = selected_state_bytes(chosen, world_size=2, zero_stage=stage, projection="galore",
                                         rank=32, eight_bit=True)
        assert [p["total"] for p in predicted] == measured
        est = estimate(model_spec(PRESET), Setup(mode="block", **BLOCKLLM, world_size=2, zero_stage=stage,
                                                 projection="galore", rank=32, eight_bit=True))
        assert max(measured) <= est.max["optimizer_states"] + est.max["projections"]
    zero2 = estimate(model_spec(PRESET), Setup(mode="adamw", zero_stage=2, world_size=2))
    for r in results:  # DeepSpeed pads its partitions to an alignment: within 0.1%
        assert r["zero2"]["states"] == pytest.approx(zero2.breakdown["optimizer_moments"]
                                                     + zero2.breakdown["optimizer_step_tensors"], rel=1e-3)
        assert r["zero2"]["master"] == pytest.approx(zero2.breakdown["optimizer_master_weights"], rel=1e-3)


def test_eight_bit_moment_layout():
    assert moment_bytes((63, 65), True) == 63 * 65 * 4  # below quant8.MIN_NUMEL: fp32
    assert moment_bytes((16, 256), True) == 4096 + 16 * 4
    assert moment_bytes((10, 500), True) == 5000 + 10 * math.ceil(500 / 256) * 4  # chunks per row
    assert moment_bytes((5000,), True) == 5000 * 4  # 1-D (norm weights): fp32


def test_fsdp_row_shards_add_up_to_the_whole_state():
    spec = model_spec(PRESET)
    blocks, _ = partition_blocks(spec.named_shapes, ("embed", "lm_head"), 0.05, 0.5)
    chosen = block_shapes(blocks, spec.named_shapes)
    whole = selected_state_bytes(chosen)[0]["total"]
    shards = selected_state_bytes(chosen, world_size=3, zero_stage=3, param_shapes=dict(spec.named_shapes))
    assert sum(s["total"] for s in shards) == whole  # plain Adam: row shards partition the state
    # 8-bit moments are chunked row by row, so their row shards partition the 8-bit state too
    whole8 = selected_state_bytes(chosen, eight_bit=True)[0]["total"]
    shards8 = selected_state_bytes(chosen, world_size=3, zero_stage=3, eight_bit=True,
                                   param_shapes=dict(spec.named_shapes))
    assert sum(s["total"] for s in shards8) == whole8 < whole / 3
    # projected states need the whole block: under FSDP2 they live on owners, as at stage 2
    kw = dict(projection="galore", rank=32)
    assert selected_state_bytes(chosen, world_size=3, zero_stage=3, **kw) == \
        selected_state_bytes(chosen, world_size=3, zero_stage=2, **kw)


def _saved_bytes(model, windows, autocast):
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            causal_lm_loss(model, windows)
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "autocast", "bf16"])
def test_activation_formula_matches_autograds_saved_tensors(tmp_path, precision):
    from transformers import LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                      num_key_value_heads=4, num_hidden_layers=2, max_position_embeddings=64,
                      tie_word_embeddings=False, use_cache=False)
    path = tmp_path / "config.json"
    cfg.to_json_file(str(path))
    spec = model_spec(hf_config=path)  # also the --hf-config path
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    micro, seq = 3, 48
    measured = _saved_bytes(model, torch.randint(0, 512, (micro, seq + 1)), precision == "autocast")
    act = activation_bytes(spec, micro, seq, precision, checkpointing=False)
    predicted = act["total"] - act["loss_transient"]
    if precision == "autocast":  # autocast's bf16 copies of the Linear weights, saved for backward
        predicted += 2 * spec.matmul_params()
    assert abs(predicted - measured) <= 64  # a few scalars (loss weights, eps) apart


def test_checkpointing_keeps_layer_inputs_only():
    spec = model_spec("llama_60m")
    full = activation_bytes(spec, 4, 256, "fp32", checkpointing=False)
    ckpt = activation_bytes(spec, 4, 256, "fp32", checkpointing=True)
    per_layer = full["layers"] // spec.num_layers
    assert ckpt["layers"] == spec.num_layers * 4 * 256 * spec.hidden_size * 4 + per_layer


def test_cli_json_and_table(tmp_path):
    out = tmp_path / "est.json"
    proc = subprocess.run(
        [sys.executable, "tools/estimate_memory.py", "--preset", "llama_60m", "--world-size", "8",
         "--mode", "block", "--projection", "galore", "--eight-bit", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "optimizer states" in proc.stdout and "GiB" in proc.stdout
    data = json.loads(out.read_text())
    assert data["model"]["name"] == "llama_60m" and data["model"]["vocab_size"] == DEFAULT_VOCAB
    assert data["setup"]["world_size"] == 8 and data["setup"]["eight_bit"] is True
    per_rank = data["per_rank_bytes"]
    assert 0 < per_rank["total"]["mean"] <= per_rank["total"]["max"]
    for col in ("mean", "max"):
        assert per_rank["total"][col] == sum(per_rank[k][col] for k in
                                             ("weights", "gradients", "optimizer_states", "projections",
                                              "activations"))
    assert per_rank["projections"]["mean"] > 0
    bad = subprocess.run([sys.executable, "tools/estimate_memory.py", "--preset", "llama_60m", "--mode",
                          "adamw", "--eight-bit"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "adamw" in bad.stderr


def test_block_moments_default_to_the_trainers():
    """The estimate of a setup that does not say follows the trainer: 8-bit moments for the block
    mode (OptimConfig's default), fp32 for the dense low-rank modes (as published)."""
    from scaletrain.optim.config import OptimConfig

    spec = model_spec(PRESET)
    default = estimate(spec, Setup(mode="block"))
    assert default.setup.eight_bit is OptimConfig().eight_bit is True
    assert estimate(spec, Setup(mode="galore")).setup.eight_bit is False
    fp32 = estimate(spec, Setup(mode="block", eight_bit=False))
    assert default.max["optimizer_states"] < fp32.max["optimizer_states"] / 3
