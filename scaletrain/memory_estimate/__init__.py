"""Per-rank memory estimate for a scaletrain run, in the style of DeepSpeed's
`estimate_zero2_model_states_mem_needs`: weights, gradients, optimizer states, projection
matrices and activations, in bytes and GiB.

    scaletrain-estimate-memory --preset llama_7b --world-size 8 --mode block --density 0.05
    python tools/estimate_memory.py --hf-config path/to/config.json --mode adamw --zero-stage 2 --json

The model's parameter shapes are exact: the transformers model is built on the meta device (no
memory), from a preset (`scaletrain.models.llama`) or a LlamaConfig JSON. The optimizer parts follow
the optimizers' own layouts (scaletrain.optim.layout, update_rules, quant8; torch.optim.AdamW;
DeepSpeed ZeRO-1/2 partitions; FSDP2 shards), and tests/test_memory_estimate.py checks them
against the tensors the optimizers really allocate. Weights, gradients and activations are stated
approximations (see `activation_bytes_per_token` and the notes each estimate prints).

Modes:
  adamw          torch.optim.AdamW on every parameter, under DeepSpeed ZeRO stage 0/1/2, or FSDP2
                 (stage 3: parameters, gradients and states sharded)
  block          scaletrain's BlockOptimizer: `density` of the candidate parameters selected,
                 optionally with a GaLore / GradNormLoRP projection and 8-bit moments inside blocks
  galore, gradnorm_lorp
                 the dense low-rank methods: every block selected, nothing frozen, density 1
Which blocks a selection picks depends on gradients, so for `block` the estimate is the worst
case allowed by the budget; `selected_state_bytes` gives the exact figure for a known selection.

The package, one concern a module:
  model            ModelSpec / model_spec: parameter shapes from a preset or LlamaConfig
  optimizer_state  block optimizer state bytes per block and per rank (asks the optimizer's
                   update rules and layout)
  activations      activation bytes per token and per micro-batch
  estimate         Setup, Estimate and estimate(): the per-rank sum
  cli              the command line
"""
from __future__ import annotations

from scaletrain.memory_estimate.activations import (activation_bytes, activation_bytes_per_token,
                                                    head_activation_bytes_per_token)
from scaletrain.memory_estimate.cli import build_parser, main
from scaletrain.memory_estimate.estimate import (BUCKET_MIB, COMPONENTS, GIB, MODES, STEP_TENSOR_BYTES, Estimate,
                                                 Setup, estimate)
from scaletrain.memory_estimate.model import DEFAULT_VOCAB, ModelSpec, model_spec
from scaletrain.memory_estimate.optimizer_state import (PROJECTIONS, block_layout, block_shapes, block_state_bytes,
                                                        moment_bytes, selected_state_bytes)

__all__ = ["BUCKET_MIB", "COMPONENTS", "DEFAULT_VOCAB", "GIB", "MODES", "PROJECTIONS", "STEP_TENSOR_BYTES",
           "Estimate", "ModelSpec", "Setup", "activation_bytes", "activation_bytes_per_token", "block_layout",
           "block_shapes", "block_state_bytes", "build_parser", "estimate", "head_activation_bytes_per_token",
           "main", "model_spec", "moment_bytes", "selected_state_bytes"]
