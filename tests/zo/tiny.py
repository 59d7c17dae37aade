"""Tiny Llamas for the zeroth-order tests (fast on 2 CPU cores)."""
from __future__ import annotations

import types

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm


def _rms_norm_in_input_dtype(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def tiny_llama(vocab: int = 64, hidden: int = 32, layers: int = 2, dtype=torch.float32, seed: int = 0,
               scale: float = 1.0) -> LlamaForCausalLM:
    """Random weights; `scale` > 1 widens them so the loss is far from uniform (a less flat surface).
    In float64 the RMS norms compute in float64 too (transformers' cast them to float32, which
    would put float32 rounding noise into finite differences)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                      num_key_value_heads=4, num_hidden_layers=layers, max_position_embeddings=128,
                      use_cache=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    model = LlamaForCausalLM(cfg).to(dtype)
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(scale)
    if dtype == torch.float64:
        for m in model.modules():
            if isinstance(m, LlamaRMSNorm):
                m.forward = types.MethodType(_rms_norm_in_input_dtype, m)
    return model.eval()


def windows(vocab: int, n: int, length: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, length), generator=g) for _ in range(n)]
