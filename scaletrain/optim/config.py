"""The optimizer's config section (optim.*), owned here and shared by pretraining and fine-tuning."""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from scaletrain.config_fields import ConfigError, doc, require


@dataclass
class OptimConfig:
    name: str = doc("adamw", "Optimizer, by name from the registry scaletrain.optim.OPTIMIZERS "
                    "(adamw: dense baseline; block: BlockLLM selection; galore, gradnorm_lorp: "
                    "the published low-rank methods on every block, no selection).")
    lr: float = doc(3e-3, "Peak learning rate.")
    beta1: float = doc(0.9, "Adam beta1.")
    beta2: float = doc(0.999, "Adam beta2.")
    eps: float = doc(1e-8, "Adam epsilon.")
    weight_decay: float = doc(0.0, "Decoupled (AdamW) weight decay.")
    density: float = doc(0.05, "block: fraction of trainable parameters updated at a time "
                         "(BlockLLM's sparsity_level is 1 - density).")
    patience: int = doc(100, "block: BlockLLM's reselection patience (losses compared).")
    check_every: int = doc(1000, "block: check the patience rule every N steps (BlockLLM's update_freq).")
    reselect_every: int = doc(50, "block: also reselect every N steps regardless of loss (0: off, "
                              "BlockLLM's patience rule only).")
    frozen_patterns: list = doc([], "block: parameter-name substrings never trained (BlockLLM "
                                "freezes embedding and head: configs/blockllm_paper.yaml); a tensor "
                                "in neither this nor optim.always_train competes for selection "
                                "(in row chunks if larger than the budget).")
    always_train: list = doc(["embed", "lm_head", "norm"], "block: parameter-name substrings trained "
                             "every step with Adam (8-bit moments with optim.eight_bit), outside the "
                             "selection budget, state on one owner; [] for BlockLLM's setting.")
    inactive: str = doc("sign", "block: what the candidate blocks that are not selected do each step: "
                        "sign (FRUGAL: state-free signSGD on the averaged gradient, every block moves "
                        "every step) or none (BlockLLM/BAdam: frozen, no gradient computed).",
                        ("none", "sign"))
    inactive_lr_scale: float = doc(1.0, "block: the sign step's LR as a multiple of the scheduled LR.")
    max_block_fraction: float = doc(0.5, "block: largest row chunk of a big tensor, as a fraction "
                                    "of the parameter budget.")
    selection: str = doc("greedy", "block: how blocks are chosen at a selection: greedy (BlockLLM: "
                         "highest gradient norm, discounted by past visits, first, until the budget is "
                         "full) or sample (MISA-style importance sampling: drawn without replacement with "
                         "probability proportional to a moving average of each block's gradient norm; "
                         "the draw is seeded by the step, so every rank draws alike).",
                         ("greedy", "sample"))
    keep_state_on_reselect: bool = doc(False, "block: keep Adam moments of blocks that stay "
                                       "selected (BlockLLM resets all).")
    projection: str = doc("none", "block: Adam inside each selected 2-D block in a rank-r subspace "
                          "of its gradient (galore) or of its weight-normalised direction's "
                          "gradient (gradnorm_lorp); none: full Adam.",
                          ("none", "galore", "gradnorm_lorp"))
    rank: int = doc(128, "galore/gradnorm_lorp: projection rank r (GaLore uses 128 at llama_60m).")
    update_proj_gap: int = doc(200, "galore/gradnorm_lorp: refit the projection every N updates "
                               "of a block (and when it is reselected).")
    proj_scale: float = doc(0.25, "galore/gradnorm_lorp: scale of the projected-back update (GaLore's alpha).")
    svd: str = doc("lowrank", "galore/gradnorm_lorp: basis from torch.svd_lowrank (lowrank: "
                   "randomized, seeded per block; speed and captured gradient norm against full: README, "
                   "tools/bench_svd.py; matrices with a side under "
                   "2 (rank + 10) still get the full SVD) or torch.linalg.svd (full, as galore-torch).",
                   ("full", "lowrank"))
    proj_patterns: list = doc(["attn", "mlp"], "galore/gradnorm_lorp: parameter-name substrings of "
                              "the 2-D weights that are projected (GaLore: attention and MLP).")
    eight_bit: bool = doc(True, "block: store the Adam moments of matrices in 8 bits (blockwise "
                          "dynamic quantization, 256 values of a row per scale; bitsandbytes' kernels "
                          "on CUDA); false: fp32 moments. The dense galore/gradnorm_lorp modes keep "
                          "fp32 moments, as published.")
    debug_checks: bool = doc(False, "Assert cross-rank invariants (identical selections) every step.")


def check_optim(o: OptimConfig, names: list[str]) -> None:
    """optim.*, shared by pretraining and fine-tuning; names: the accepted optim.name values."""
    if o.name not in names:
        close = difflib.get_close_matches(o.name, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"config key 'optim.name' is {o.name!r}{hint}; choose one of {names}")
    require(o.rank > 0, "optim.rank", "must be positive")
    require(o.update_proj_gap > 0, "optim.update_proj_gap", "must be positive")
    require(o.proj_scale > 0, "optim.proj_scale", "must be positive")
    require(o.lr > 0, "optim.lr", "must be positive")
    require(0.0 <= o.beta1 < 1.0, "optim.beta1", "must be in [0, 1)")
    require(0.0 <= o.beta2 < 1.0, "optim.beta2", "must be in [0, 1)")
    require(o.eps > 0, "optim.eps", "must be positive")
    require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    require(0.0 < o.density <= 1.0, "optim.density", "must be in (0, 1]")
    require(o.patience > 0, "optim.patience", "must be positive")
    require(o.check_every > 0, "optim.check_every", "must be positive")
    require(o.reselect_every >= 0, "optim.reselect_every", "must be >= 0 (0: off)")
    require(0.0 < o.max_block_fraction <= 1.0, "optim.max_block_fraction", "must be in (0, 1]")
    require(o.inactive_lr_scale > 0, "optim.inactive_lr_scale", "must be positive")
    both = sorted(set(o.always_train) & set(o.frozen_patterns))
    require(not both, "optim.always_train", f"shares {both} with optim.frozen_patterns: a tensor is "
            "either always trained or never; remove it from one list")
