"""Llama size presets from GaLore's C4 study, built as plain `transformers.LlamaForCausalLM`.

The shapes are GaLore's configs (jiaweizzhao/GaLore, configs/llama_*.json); the vocabulary comes
from the tokenizer, so with a 32,000-piece tokenizer the parameter counts equal the papers'.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int


PRESETS: dict[str, LlamaShape] = {
    "llama_9m": LlamaShape(128, 352, 4, 4),
    "llama_20m": LlamaShape(256, 688, 4, 4),
    "llama_60m": LlamaShape(512, 1376, 8, 8),
    "llama_130m": LlamaShape(768, 2048, 12, 12),
    "llama_350m": LlamaShape(1024, 2736, 16, 24),
    "llama_1b": LlamaShape(2048, 5461, 32, 24),
    "llama_7b": LlamaShape(4096, 11008, 32, 32),
}

MAX_POSITIONS = 1024  # GaLore's max_sequence_length


def llama_config(preset: str, vocab_size: int, max_positions: int = MAX_POSITIONS) -> LlamaConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    s = PRESETS[preset]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_attention_heads,
        num_hidden_layers=s.num_hidden_layers,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        initializer_range=0.02,
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def build_model(preset: str, vocab_size: int, *, seed: int = 0,
                activation_checkpointing: bool = False,
                max_positions: int = MAX_POSITIONS,
                device: torch.device | str = "cpu") -> LlamaForCausalLM:
    """A freshly initialised Llama; the same seed gives the same weights on every rank of one
    device kind. device: where the weights are created and initialised (on a GPU a 7B model
    initialises in seconds instead of minutes on the host; the values differ from a CPU init)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(preset, vocab_size, max_positions))
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def compile_layers(model: LlamaForCausalLM) -> None:
    """torch.compile each decoder layer in place (torchtitan's per-block compile): the layers share
    one code object, so one compiled graph serves all of them; embedding, norm, head and loss stay
    eager. Compile before FSDP wraps the layers."""
    for layer in model.model.layers:
        layer.compile()


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def causal_lm_loss(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of (batch, seq_len + 1) windows: input w[:-1], target w[1:]."""
    logits = model(input_ids=windows[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())
