"""The `model.*` config section of pretraining: which Llama shape to build and how to run it."""
from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config_fields import doc


@dataclass
class ModelConfig:
    # The choices repeat scaletrain.models.llama.PRESETS' names literally: importing llama here would
    # pull transformers into every config load (`--help` included).
    preset: str = doc("llama_9m", "Model size preset (GaLore's C4 study shapes).",
                      ("llama_9m", "llama_20m", "llama_60m", "llama_130m", "llama_350m",
                       "llama_1b", "llama_7b"))
    activation_checkpointing: bool = doc(False, "Recompute activations in backward to save memory.")
    compile: bool = doc(False, "torch.compile each decoder layer (as torchtitan). The layers share their "
                        "graphs; a graph is compiled per pattern of requires_grad: the block "
                        "optimizer's default (sign) mode needs three (training, and the selection "
                        "pass for the first and the other layers); with optim.inactive none each new pattern of "
                        "trainable tensors in a layer compiles once more, up to "
                        "torch._dynamo.config.recompile_limit, after which that layer runs eagerly.")
