"""Activation memory of a transformers Llama per micro-batch: a per-token formula counted tensor
by tensor (checked against a saved-tensors hook in the tests), with and without checkpointing."""
from __future__ import annotations

from scaletrain.memory_estimate.model import ModelSpec


def activation_bytes_per_token(hidden: int, intermediate: int, heads: int, precision: str) -> int:
    """Bytes autograd saves per token per decoder layer of a transformers Llama (sdpa attention,
    RMSNorm, SwiGLU), counted tensor by tensor and checked against a saved-tensors hook in the tests
    (h = hidden, i = intermediate, a = heads):
      fp32      40h + 16i + 4a + 8   per norm: input, normalised, output (3 x 4h); sdpa: q, k, v,
                                     out (4 x 4h); MLP: gate, silu(gate), up, product (4 x 4i);
                                     2 rsqrt (8) and the attention log-sum-exp (4a)
      autocast  34h +  8i + 4a + 8   weights fp32, compute bf16 (SingleEngine's dense bf16): norms
                                     fp32 input + normalised (2 x 8h); bf16 input casts for q, k, v,
                                     gate, up (5 x 2h); sdpa q, k, v, out bf16 (4 x 2h); MLP 4 x 2i
      bf16      24h +  8i + 4a + 8   bf16 weights (DeepSpeed bf16, FSDP2 param_dtype): norms: fp32
                                     upcast input 4h + bf16 normalised and output (2 x 2h), twice;
                                     sdpa 4 x 2h; MLP 4 x 2i
    Grouped-query attention saves no more (k, v are smaller): these figures are an upper bound
    there. Eager attention (not the default) would add the a x seq_len fp32 probabilities."""
    h, i, a = hidden, intermediate, heads
    coef = {"fp32": (40, 16), "autocast": (34, 8), "bf16": (24, 8)}[precision]
    return coef[0] * h + coef[1] * i + 4 * a + 8


def head_activation_bytes_per_token(hidden: int, vocab: int, precision: str) -> int:
    """Saved bytes per token outside the decoder layers: input ids and targets (int64, 8 + 8),
    final norm (fp32: 12h; autocast: 10h; bf16: 8h) + its rsqrt (4), and the fp32 log-softmax of
    the logits the loss keeps (4V). (RoPE's cos/sin add 2 x head_dim per position, not per token.)"""
    return {"fp32": 12, "autocast": 10, "bf16": 8}[precision] * hidden + 4 * vocab + 20


def activation_bytes(spec: ModelSpec, micro_batch: int, seq_len: int, precision: str,
                     checkpointing: bool) -> dict[str, int]:
    """Activation memory of one micro-batch at its peak (end of forward / start of backward).

    Without checkpointing: layers x tokens x activation_bytes_per_token + the head's saved tensors
    + a transient 8V bytes per token at the loss (the fp32 gradients of the log-softmax and its
    input exist together at the start of backward). With checkpointing (transformers'
    per-decoder-layer, non-reentrant): only each layer's input is kept (the residual stream: 4h
    bytes per token, 2h in bf16), plus one layer's full activations while it is recomputed in
    backward, plus the head. Gradient accumulation does not add: micro-batches run one at a time.
    Not counted: temporaries inside one op (e.g. the attention kernel's workspace), allocator
    fragmentation, CUDA context."""
    tokens = micro_batch * seq_len
    h, v = spec.hidden_size, spec.vocab_size
    layer = tokens * activation_bytes_per_token(h, spec.intermediate_size, spec.num_heads, precision)
    head = tokens * head_activation_bytes_per_token(h, v, precision)
    loss_transient = tokens * 8 * v
    rope = 2 * seq_len * (h // spec.num_heads) * (2 if precision == "bf16" else 4)
    if checkpointing:
        kept = spec.num_layers * tokens * h * (2 if precision == "bf16" else 4)
        layers = kept + layer
    else:
        layers = spec.num_layers * layer
    return {"layers": layers, "head": head + rope, "loss_transient": loss_transient,
            "total": layers + head + rope + loss_transient}
