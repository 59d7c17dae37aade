"""Fine-tuning's model: where it comes from (a scaletrain checkpoint or a transformers directory),
loading it, and how a task scores it (loss and accuracy over label words or completions)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from scaletrain import checkpoint as ckpt
from scaletrain.config_fields import ConfigError
from scaletrain.data import load_tokenizer
from scaletrain.data.tasks import Batch, Task, make_batch
from scaletrain.distributed.runtime import DistContext, all_reduce_sum
from scaletrain.ds_config import resolve_path
from scaletrain.models.llama import PRESETS, llama_config

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")
HF_TOKENIZER = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class ModelPathError(ConfigError):
    """model.path names nothing loadable; the message says why and what to point it at."""



@dataclass
class ModelSource:
    kind: str  # "scaletrain" | "hf"
    path: Path
    config: dict  # the checkpoint's config.yaml ({} for transformers directories)


def resolve_model(spec: str) -> ModelSource:
    """A scaletrain checkpoint (step dir, checkpoints/ root, run dir) or a transformers directory."""
    if not spec:
        raise ModelPathError("config key 'model.path' is empty: point it at a scaletrain run or checkpoint "
                             "(e.g. python launch/pretrain.py --run_dir runs/tiny, then --model.path "
                             "runs/tiny) or at a transformers model directory (tools/export_hf.py writes one)")
    p = resolve_path(spec)
    if not p.is_dir():
        raise ModelPathError(f"config key 'model.path': no such directory {spec!r}")
    if (p / "config.json").is_file():
        if not any((p / f).is_file() for f in HF_WEIGHTS):
            raise ModelPathError(f"config key 'model.path': {p} is a transformers model directory "
                                 f"(config.json) without weights ({' / '.join(HF_WEIGHTS[::2])}); export "
                                 f"it again with tools/export_hf.py or point model.path at one with weights")
        return ModelSource("hf", p, {})
    try:
        if (p / "checkpoints").is_dir():
            found = ckpt.find_checkpoint("auto", p)
        elif (p / "latest").is_file() or (p / "manifest.json").is_file():
            found = ckpt.find_checkpoint(str(p), p)
        elif (p / "dcp").is_dir() or (p / "config.yaml").is_file():
            ckpt.verify(p)  # an incomplete checkpoint: the error names what is missing
            found = p
        else:
            found = None
    except ckpt.CheckpointError as e:
        raise ModelPathError(f"config key 'model.path': {e}; the model weights (dcp/) must "
                             f"be there: point model.path at an intact step_* directory or its run "
                             f"directory") from None
    if found is None:
        raise ModelPathError(f"config key 'model.path': {p} holds no model: neither a scaletrain checkpoint "
                             f"(step_*/ with manifest.json and dcp/, a checkpoints/ root, or a "
                             f"run directory) nor a transformers directory (config.json + weights)")
    return ModelSource("scaletrain", found, yaml.safe_load((found / "config.yaml").read_text()) or {})


def load_model(source: ModelSource, tokenizer_spec: str = "auto"):
    """(LlamaForCausalLM in fp32, tokenizer, tokenizer spec, preset or 'custom')."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if source.kind == "hf":
        model = LlamaForCausalLM.from_pretrained(source.path, dtype=torch.float32)
        if tokenizer_spec == "auto":
            if not any((source.path / f).is_file() for f in HF_TOKENIZER):
                raise ModelPathError(f"config key 'model.tokenizer': {source.path} has no tokenizer files; "
                                     f"name one with --model.tokenizer")
            from scaletrain.data.tokenizer import HFTokenizer

            return model, HFTokenizer(str(source.path)), str(source.path), "custom"
        return model, load_tokenizer(tokenizer_spec), tokenizer_spec, "custom"
    cfg = source.config
    weights = ckpt.load_model_state(source.path)
    model_cfg = cfg.get("model", {})
    if "llama_config" in model_cfg:  # written by a fine-tuning run
        model = LlamaForCausalLM(LlamaConfig(**model_cfg["llama_config"]))
    else:
        vocab = weights["model.embed_tokens.weight"].shape[0]
        model = LlamaForCausalLM(llama_config(model_cfg["preset"], vocab))
    model.load_state_dict(weights, strict=True)
    spec = cfg.get("data", {}).get("tokenizer", "default") if tokenizer_spec == "auto" else tokenizer_spec
    tokenizer = load_tokenizer(spec)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ModelPathError(f"config key 'model.tokenizer': {spec!r} has {tokenizer.vocab_size} pieces, the "
                             f"model's vocabulary {model.config.vocab_size}")
    preset = model_cfg.get("preset", "custom")
    return model, tokenizer, spec, preset if preset in PRESETS else "custom"



def task_loss(model, batch: Batch, task: Task) -> tuple[torch.Tensor, float, float, float]:
    """(mean loss of the micro-batch, summed loss, correct, weight).

    Classification: weight = examples, loss = cross-entropy over the label words' scores.
    Completion: weight = completion tokens, loss = their mean next-token loss."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, logits_to_keep=batch.keep)
    logp = F.log_softmax(out.logits.float(), dim=-1)  # (N, keep, V)
    if task.single_token:  # one row per example, the next token's log-probability
        cand = torch.tensor([c[0] for c in task.candidates], device=logp.device)
        scores = logp[:, -1, :].index_select(1, cand)  # (B, K)
    else:
        width = batch.keep - 1  # continuation tokens are the last `width` of each row
        target = batch.input_ids[:, -width:]
        tok = logp[:, :-1, :].gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (N, width)
        on = torch.arange(width, device=tok.device).unsqueeze(0) >= (width - batch.cont_len).unsqueeze(1)
        if task.kind == "completion":
            n_tok = on.sum()
            nll = -(tok * on).sum()
            hits = ((logp[:, :-1, :].argmax(-1) == target) & on).sum()
            return nll / n_tok, float(nll), float(hits), float(n_tok)
        scores = (tok * on).sum(1).view(batch.n_examples, len(task.candidates))
    losses = F.cross_entropy(scores, batch.labels, reduction="none")
    correct = (scores.argmax(1) == batch.labels).sum()
    return losses.mean(), float(losses.sum()), float(correct), float(batch.n_examples)


@torch.no_grad()
def evaluate(model, task: Task, examples, ctx: DistContext, batch_size: int, autocast=None) -> dict:
    """Held-out loss and accuracy over every rank's share (examples j with j % W == rank)."""
    was = model.training
    model.eval()
    loss_sum = correct = weight = 0.0
    for i in range(0, len(examples), batch_size):
        batch = make_batch(task, examples[i:i + batch_size]).to(ctx.device)
        with autocast or contextlib.nullcontext():
            _, s, c, w = task_loss(model, batch, task)
        loss_sum, correct, weight = loss_sum + s, correct + c, weight + w
    model.train(was)
    loss_sum, correct, weight = all_reduce_sum([loss_sum, correct, weight], ctx)
    return {"eval_loss": loss_sum / max(weight, 1.0), "eval_accuracy": correct / max(weight, 1.0),
            "eval_examples": weight}


