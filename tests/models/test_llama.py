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
