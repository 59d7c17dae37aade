"""The model's side of a memory estimate: exact parameter names and shapes (the transformers
model built on the meta device, no memory) and the unit sizes FSDP2 gathers."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VOCAB = 8192  # the shipped default tokenizer (c4-sample-8192.model); the trainer uses its size


@dataclass(frozen=True)
class ModelSpec:
    """Parameter names and shapes (as `model.named_parameters()` lists them) and the sizes the
    activation formula needs."""
    name: str
    named_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    vocab_size: int

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in self.named_shapes)

    @property
    def n_tensors(self) -> int:
        return len(self.named_shapes)

    def layer_params(self) -> int:
        """Parameters of the largest decoder layer (the unit FSDP2 gathers)."""
        per_layer: dict[str, int] = {}
        for name, shape in self.named_shapes:
            parts = name.split(".")
            if "layers" in parts:
                key = ".".join(parts[: parts.index("layers") + 2])
                per_layer[key] = per_layer.get(key, 0) + math.prod(shape)
        return max(per_layer.values(), default=0)

    def root_params(self) -> int:
        """Parameters outside the decoder layers (embedding, final norm, head): FSDP2's root unit."""
        return sum(math.prod(s) for n, s in self.named_shapes if "layers" not in n.split("."))

    def matmul_params(self) -> int:
        """2-D weights used by nn.Linear (all but the embedding): autocast keeps a bf16 copy each."""
        return sum(math.prod(s) for n, s in self.named_shapes if len(s) == 2 and "embed_tokens" not in n)


def model_spec(preset: str | None = None, hf_config: str | Path | None = None,
               vocab_size: int | None = None) -> ModelSpec:
    """Shapes of the model the trainer builds for `preset` (vocabulary: `vocab_size`, default the
    shipped tokenizer's 8192), or of a transformers LlamaConfig JSON (a file or a directory holding
    config.json; its own vocabulary unless `vocab_size` is given). Built on the meta device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (preset is None) == (hf_config is None):
        raise ValueError("give exactly one of preset or hf_config")
    if preset is not None:
        from scaletrain.models.llama import llama_config

        config = llama_config(preset, vocab_size or DEFAULT_VOCAB)
        name = preset
    else:
        path = Path(hf_config)
        if path.is_dir():
            path = path / "config.json"
        config = LlamaConfig.from_json_file(str(path))
        if vocab_size:
            config.vocab_size = vocab_size
        name = str(hf_config)
    config.use_cache = False
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    return ModelSpec(name, shapes, config.hidden_size, config.intermediate_size,
                     config.num_attention_heads, config.num_hidden_layers, config.vocab_size)
