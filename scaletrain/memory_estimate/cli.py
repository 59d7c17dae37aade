"""The command line: `scaletrain-estimate-memory` and tools/estimate_memory.py."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from scaletrain.memory_estimate.estimate import MODES, OPTIM_DEFAULTS, Setup, estimate
from scaletrain.memory_estimate.model import DEFAULT_VOCAB, model_spec
from scaletrain.memory_estimate.optimizer_state import PROJECTIONS


def _patterns(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scaletrain-estimate-memory",
        description="Per-rank memory (weights, gradients, optimizer states, projections, activations) "
                    "of a scaletrain run, in the style of DeepSpeed's estimate_zero2_model_states_mem_needs.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="model preset (scaletrain.models.llama.PRESETS), e.g. llama_60m")
    src.add_argument("--hf-config", "--hf_config", dest="hf_config",
                     help="a transformers LlamaConfig JSON (file, or directory with config.json)")
    p.add_argument("--vocab-size", "--vocab_size", dest="vocab_size", type=int, default=None,
                   help=f"vocabulary (default: presets {DEFAULT_VOCAB}, the shipped tokenizer's, which the "
                        "trainer uses; hf-config: its own)")
    p.add_argument("--world-size", "--world_size", dest="world_size", type=int, default=1)
    p.add_argument("--mode", "--optim", dest="mode", choices=MODES, default="adamw")
    p.add_argument("--projection", choices=PROJECTIONS, default="none",
                   help="block: low-rank states inside selected blocks")
    p.add_argument("--density", type=float, default=0.05, help="block: fraction of candidate params selected")
    p.add_argument("--rank", type=int, default=128, help="galore/gradnorm_lorp projection rank")
    p.add_argument("--eight-bit", "--eight_bit", dest="eight_bit", action=argparse.BooleanOptionalAction,
                   default=None, help="block: 8-bit Adam moments (default: the trainer's, optim.eight_bit)")
    p.add_argument("--zero-stage", "--zero_stage", dest="zero_stage", type=int, choices=(0, 1, 2, 3), default=2,
                   help="adamw: DeepSpeed ZeRO stage (3: FSDP2); block: the stage the optimizer realises "
                        "per block (3: FSDP2 row shards). Default 2")
    p.add_argument("--micro-batch", "--micro_batch", dest="micro_batch", type=int, default=4)
    p.add_argument("--seq-len", "--seq_len", dest="seq_len", type=int, default=256)
    p.add_argument("--activation-checkpointing", "--activation_checkpointing", dest="activation_checkpointing",
                   action="store_true")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16 as the ds_config's bf16.enabled")
    p.add_argument("--frozen-patterns", "--frozen_patterns", dest="frozen_patterns",
                   default=",".join(OPTIM_DEFAULTS.frozen_patterns),
                   help="block: comma-separated name substrings never trained ('' for none)")
    p.add_argument("--always-train", "--always_train", dest="always_train", default=",".join(OPTIM_DEFAULTS.always_train),
                   help="block: comma-separated name substrings trained every step with Adam ('' for none)")
    p.add_argument("--inactive", choices=("none", "sign"), default=OPTIM_DEFAULTS.inactive,
                   help="block: what the unselected blocks do (sign: they hold gradients too)")
    p.add_argument("--proj-patterns", "--proj_patterns", dest="proj_patterns", default="attn,mlp",
                   help="galore/gradnorm_lorp: comma-separated name substrings of projected weights")
    p.add_argument("--max-block-fraction", "--max_block_fraction", dest="max_block_fraction", type=float,
                   default=0.5)
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="print JSON (to stdout, or to PATH) instead of the table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        setup = Setup(mode=args.mode, world_size=args.world_size, zero_stage=args.zero_stage,
                      density=args.density, projection=args.projection, rank=args.rank,
                      eight_bit=args.eight_bit, frozen_patterns=_patterns(args.frozen_patterns),
                      always_train=_patterns(args.always_train), inactive=args.inactive,
                      proj_patterns=_patterns(args.proj_patterns), max_block_fraction=args.max_block_fraction,
                      dtype=args.dtype, micro_batch=args.micro_batch, seq_len=args.seq_len,
                      activation_checkpointing=args.activation_checkpointing)
        setup.validate()  # before building the model: bad flags fail fast
        est = estimate(model_spec(args.preset, args.hf_config, args.vocab_size), setup)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json is None:
        print(est.table())
    else:
        text = json.dumps(est.to_json(), indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
            print(est.table())
    return 0
