"""Export a scaletrain checkpoint as a transformers model directory.

    python tools/export_hf.py runs/<run>/checkpoints/latest out/hf_model
    python tools/export_hf.py runs/<run> out/hf_model          # the run's newest intact checkpoint

The result (model.safetensors, config.json, generation_config.json, tokenizer files) loads with
`LlamaForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`. The checkpoint
is verified against its manifest first; an existing, non-empty output directory is refused.

Checkpoints are sharded (torch.distributed.checkpoint, one file per saving rank, FSDP2 weights
split across them): the weights are consolidated offline, in this one process, by reading only
the "model/" entries of the DCP metadata into whole CPU tensors (the optimizer state is not read).
To consolidate everything into one torch.save file instead, DCP has
`torch.distributed.checkpoint.format_utils.dcp_to_torch_save(<step>/dcp, out.pt)`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scaletrain import checkpoint as ckpt  # noqa: E402
from scaletrain.data.tokenizer import SHIPPED  # noqa: E402


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, a checkpoints/ root or `latest` file, or a run directory."""
    if path.name == "latest" and path.is_file():
        path = path.parent
    if (path / "checkpoints").is_dir():
        found = ckpt.find_checkpoint("auto", path)
        if found is None:
            raise ckpt.CheckpointError(f"{path}: no checkpoint in this run directory")
        return found
    return ckpt.find_checkpoint(str(path), path)


def export_tokenizer(spec: str, out: Path) -> None:
    from transformers import AutoTokenizer, LlamaTokenizer

    model_file = SHIPPED.get(spec) or (Path(spec).expanduser() if Path(spec).expanduser().is_file() else None)
    if model_file is None:  # a transformers tokenizer name: save it as it is
        AutoTokenizer.from_pretrained(spec).save_pretrained(out)
        return
    with tempfile.TemporaryDirectory() as tmp:  # transformers converts a sentencepiece file
        shutil.copy(model_file, Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp, add_bos_token=False, legacy=False)
    tok.save_pretrained(out)


def export(checkpoint: Path, out: Path) -> Path:
    from transformers import LlamaForCausalLM

    from scaletrain.models.llama import llama_config

    path = resolve_checkpoint(checkpoint)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"export_hf: {out} exists and is not empty; choose a new output directory")
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    weights = ckpt.load_model_state(path)  # consolidated from every rank's shard
    vocab = weights["model.embed_tokens.weight"].shape[0]
    model = LlamaForCausalLM(llama_config(cfg["model"]["preset"], vocab))
    model.load_state_dict(weights, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    export_tokenizer(cfg["data"]["tokenizer"], out)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="checkpoint dir, checkpoints/latest, or run dir")
    p.add_argument("out", type=Path, help="new transformers model directory")
    args = p.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out)
    except ckpt.CheckpointError as e:
        raise SystemExit(f"export_hf: {e}") from None
    print(f"exported {path} -> {args.out}")


if __name__ == "__main__":
    main()
