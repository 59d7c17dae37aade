import pytest
import torch

from scaletrain.models.llama import PRESETS, build_model, causal_lm_loss, count_params, llama_config


@pytest.mark.parametrize("preset, millions", [("llama_9m", 9.0), ("llama_20m", 19.5), ("llama_60m", 58.1)])
def test_presets_have_the_papers_parameter_counts(preset, millions):
    assert round(count_params(build_model(preset, 32000)) / 1e6, 1) == millions


def test_every_preset_builds_a_config_and_unknown_ones_are_named():
    for name in PRESETS:
        assert llama_config(name, 100).vocab_size == 100
    with pytest.raises(ValueError, match="llama_6m"):
        llama_config("llama_6m", 100)


def test_same_seed_same_weights_and_checkpointing_keeps_gradients():
    windows = torch.randint(0, 256, (2, 17))
    grads = []
    for ckpt in (False, True):
        model = build_model("llama_9m", 256, seed=3, activation_checkpointing=ckpt)
        causal_lm_loss(model, windows).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_loss_is_next_token_cross_entropy():
    model = build_model("llama_9m", 64, seed=0)
    w = torch.randint(0, 64, (1, 9))
    logits = model(input_ids=w[:, :-1]).logits[0]
    expected = torch.nn.functional.cross_entropy(logits, w[0, 1:])
    torch.testing.assert_close(causal_lm_loss(model, w), expected)


def block_default_losses(model, steps: int = 4) -> list[float]:
    """The block optimizer's default mode (sign rest), a selection pass every 2 steps."""
    from scaletrain.config import OptimConfig
    from scaletrain.optim import build_optimizer
    from tests.optim.test_blockllm import train_block

    optimizer, _ = build_optimizer(OptimConfig(name="block", lr=3e-3, density=0.25, reselect_every=2), model)
    batch = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    return train_block(optimizer, model, [[batch]] * steps)


@pytest.mark.slow
def test_compiled_layers_train_as_eager_and_compile_a_bounded_number_of_graphs():
    """model.compile: the same losses as eager under the block default, and reselections do not
    recompile: three selections, three graphs in all, one for training and two for the selection
    pass (the always-trained norms inside each layer stop requiring grad there, and so does layer
    0's input, the embedding's output), whatever blocks are selected."""
    from torch._dynamo.utils import counters

    from scaletrain.models.llama import compile_layers

    torch._dynamo.reset()
    counters.clear()
    eager = build_model("llama_9m", 256, seed=0)
    compiled = build_model("llama_9m", 256, seed=0)
    compile_layers(compiled)
    want = block_default_losses(eager, steps=6)  # selections at steps 0, 2, 4
    got = block_default_losses(compiled, steps=6)
    assert got == pytest.approx(want, rel=1e-4)
    assert counters["stats"]["unique_graphs"] == 3
