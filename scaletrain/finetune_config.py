"""The fine-tuning run configuration (`launch/finetune.py`): typed dataclasses, a YAML/JSON file and
dotted CLI overrides, with the pretraining config's machinery (scaletrain.config_parse) and its rules:
every field documented (`--help`), a misspelt key or bad value is a ConfigError naming the field
(exit 2 before anything starts). `optim` is the pretraining OptimConfig, so every optimizer of the
registry (scaletrain.optim.OPTIMIZERS) fine-tunes too; `optim.name zo` selects zeroth-order
tuning, configured under `zo.*`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from scaletrain.checkpoint.config import CheckpointConfig, check_checkpoint
from scaletrain.config_fields import doc, require
from scaletrain.config_parse import build_config, check_choices, config_help
from scaletrain.ds_config import load_ds_config
from scaletrain.optim.config import OptimConfig, check_optim
from scaletrain.train_args import TrainArgs, check_train_args

ZO = "zo"
HINTS = {
    "zo.sparsity": "zo.density (the fraction of coordinates tuned; SensZOQ's 0.1% is 0.001)",
    "zo.lr": "optim.lr (shared by every optimizer, zo included)",
    "train.batch_size": "train_micro_batch_size_per_gpu in the deepspeed_config JSON",
    "model.preset": "model.path (fine-tuning starts from a checkpoint or transformers directory)",
}


@dataclass
class FTModelConfig:
    path: str = doc("", "Model to fine-tune: a scaletrain checkpoint (a step_* directory, a checkpoints/ "
                    "root or a run directory: its newest intact checkpoint) or a transformers model "
                    "directory (config.json + weights, e.g. from tools/export_hf.py).")
    tokenizer: str = doc("auto", "auto: the checkpoint's data.tokenizer, or the transformers directory's "
                         "own tokenizer; else as pretraining's data.tokenizer (default, llama32k, a "
                         ".model path, a transformers name).")


@dataclass
class TaskDataConfig:
    source: str = doc("files", "files: data.train_path / data.val_path; hub: `datasets.load_dataset("
                      "data.hub_name, data.hub_config)` (needs network).", ("files", "hub"))
    train_path: str = doc("sst2", "Training set: JSON lines (.jsonl/.json) or TSV with a header; 'sst2' is "
                          "the shipped 2,000-phrase SST-2 subset.")
    val_path: str = doc("sst2", "Held-out set, same formats; 'sst2' is the shipped GLUE SST-2 validation "
                        "set (872 sentences).")
    hub_name: str = doc("glue", "data.source hub: dataset name.")
    hub_config: str = doc("sst2", "data.source hub: dataset configuration ('' for none).")
    train_split: str = doc("train", "data.source hub: training split.")
    val_split: str = doc("validation", "data.source hub: held-out split.")
    task: str = doc("classification", "classification: label-word scoring with the causal LM (loss: "
                    "cross-entropy over the label words' log-likelihoods; accuracy: their argmax); "
                    "completion: next-token loss on the completion field.", ("classification", "completion"))
    text_field: str = doc("sentence", "Field with the input text (classification) or the prompt (completion).")
    label_field: str = doc("label", "classification: field with the class index 0..K-1.")
    completion_field: str = doc("completion", "completion: field with the target text.")
    template: str = doc("{text} It was", "Prompt; {text} is the text field (LM-BFF/MeZO's SST-2 template).")
    label_words: list = doc(["terrible", "great"], "classification: the word for class k at index k "
                            "(MeZO's SST-2 words).")
    max_len: int = doc(128, "Tokens per sequence (prompt cut from the left).")
    train_examples: int = doc(0, "Use only the first N training rows (0: all).")
    val_examples: int = doc(0, "Use only the first N held-out rows (0: all).")


@dataclass
class FTTrainConfig(TrainArgs):
    steps: int = doc(1000, "Optimizer steps (a ZO step costs 2 x zo.samples forward passes).")
    warmup_steps: int = doc(0, "Linear LR warm-up steps, then cosine decay to min_lr_ratio.")
    min_lr_ratio: float = doc(1.0, "Cosine decays the LR to this fraction (1.0: constant, as MeZO).")
    eval_every: int = doc(0, "Evaluate on the held-out set every N steps (0: at the start and end only).")
    eval_batch_size: int = doc(32, "Held-out examples per forward pass.")


@dataclass
class ZOConfig:
    density: float = doc(0.001, "Fraction of the candidate linear-weight coordinates tuned (SensZOQ: "
                         "0.001); 1: every coordinate, i.e. MeZO (needs zo.quant none).")
    eps: float = doc(1e-3, "SPSA perturbation scale (MeZO: 1e-3).")
    samples: int = doc(1, "SPSA directions per step, averaged (MeZO: 1).")
    weight_decay: float = doc(0.0, "theta -= lr * (g z + weight_decay * theta), tuned coordinates only.")
    quant: str = doc("nf4", "Frozen weights of the candidate matrices: nf4 or int4 (blockwise 4-bit, "
                     "absmax scale per block), or none (fp32).", ("nf4", "int4", "none"))
    quant_block: int = doc(64, "Values per 4-bit quantization block (one fp32 scale each).")
    scope: str = doc("global", "Top-k over all candidate matrices together (global) or in each "
                     "matrix (per_matrix).", ("global", "per_matrix"))
    patterns: list = doc(["self_attn", "mlp"], "Candidate 2-D weights: names containing one of these "
                         "(default: q/k/v/o and gate/up/down projections; '' matches every 2-D weight).")
    mask: str = doc("compute", "compute: Fisher mask from calibration text before tuning; or a "
                    "checkpoint directory / .pt file with a saved mask (reused across tasks, as SensZOQ).")
    calib_path: str = doc("default", "Calibration text (C4 JSON lines); 'default': the shipped C4 sample.")
    calib_sequences: int = doc(64, "Calibration sequences (one backward each; split over ranks).")
    calib_seq_len: int = doc(256, "Tokens per calibration sequence.")
    debug_checks: bool = doc(False, "Assert every rank derived the same mask.")


def _ft_optim() -> OptimConfig:
    return OptimConfig(name=ZO, lr=1e-4)


def _ft_checkpoint() -> CheckpointConfig:
    return CheckpointConfig(every_steps=0)


@dataclass
class FinetuneConfig:
    name: str = doc("", "Run name; default: a timestamp.")
    run_dir: str = doc("", "Where logs, metrics and checkpoints go; default runs/<name>.")
    seed: int = doc(0, "Seed of the data order and of the SPSA directions.")
    backend: str = doc("auto", "deepspeed | single; auto: deepspeed under a launcher, single under plain "
                       "python.", ("auto", "deepspeed", "single"))
    deepspeed_config: str = doc("ds_configs/finetune.json", "DeepSpeed JSON: micro-batch (examples), "
                                "accumulation, precision, ZeRO stage, clipping.")
    model: FTModelConfig = field(default_factory=FTModelConfig)
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    train: FTTrainConfig = field(default_factory=FTTrainConfig)
    optim: OptimConfig = field(default_factory=_ft_optim,
                               metadata={"doc": "optimizer; optim.name zo: zeroth-order (zo.*)"})
    zo: ZOConfig = field(default_factory=ZOConfig)
    checkpoint: CheckpointConfig = field(default_factory=_ft_checkpoint)


def load_finetune_config(argv: list[str]) -> FinetuneConfig:
    """`--config FILE` (optional) then `--dotted.key value` overrides, validated."""
    cfg = build_config(FinetuneConfig, argv, HINTS)
    validate(cfg)
    return cfg


def validate(cfg: FinetuneConfig) -> None:
    from scaletrain.optim import OPTIMIZERS

    check_choices(cfg)
    check_optim(cfg.optim, sorted(OPTIMIZERS) + [ZO])
    require(cfg.optim.name != ZO or cfg.optim.density == OptimConfig().density, "optim.density",
           "is the block optimizer's; with optim.name zo set zo.density")
    require(0.0 < cfg.zo.density <= 1.0, "zo.density",
           f"is {cfg.zo.density}: must be in (0, 1] (the fraction of coordinates tuned; SensZOQ uses "
           f"0.001, 1 is dense MeZO)")
    require(cfg.zo.density < 1.0 or cfg.zo.quant == "none", "zo.quant",
           "must be none when zo.density is 1 (dense MeZO tunes every weight, so none can stay 4-bit)")
    require(cfg.zo.eps > 0, "zo.eps", "must be positive")
    require(cfg.zo.samples >= 1, "zo.samples", "must be >= 1")
    require(cfg.zo.weight_decay >= 0, "zo.weight_decay", "must be >= 0")
    require(cfg.zo.quant_block > 0 and cfg.zo.quant_block % 2 == 0, "zo.quant_block",
           "must be a positive even number (two 4-bit codes per byte)")
    require(cfg.zo.calib_sequences > 0, "zo.calib_sequences", "must be positive")
    require(0 < cfg.zo.calib_seq_len <= 1024, "zo.calib_seq_len", "must be in 1..1024")
    require(bool(cfg.zo.patterns), "zo.patterns", "must name at least one pattern ('' matches all)")
    check_train_args(cfg.train)
    require(cfg.train.eval_batch_size > 0, "train.eval_batch_size", "must be positive")
    require(cfg.data.max_len >= 4, "data.max_len", "must be >= 4")
    require(cfg.data.train_examples >= 0, "data.train_examples", "must be >= 0 (0: all)")
    require(cfg.data.val_examples >= 0, "data.val_examples", "must be >= 0 (0: all)")
    require("{text}" in cfg.data.template, "data.template", "needs a {text} placeholder")
    check_checkpoint(cfg.checkpoint)
    load_ds_config(cfg.deepspeed_config)


def help_text() -> str:
    return config_help(FinetuneConfig, "launch/finetune.py", "YAML/JSON fine-tuning config (configs/finetune_*.yaml)")


def to_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
