"""The optimizer modes the tools compare, declared once: mode name -> the `launch/pretrain.py`
options that select it (the trainer's own language, so a mode is exactly what a user would type).

tools/bench_train.py and tools/quality_run.py pass these options to real trainer runs;
tools/bench_optim.py builds the same optimizer in-process from them (optim_overrides). What is a
tool's own stays in the tool: quality_run.py's peak LR, description and GaLore recipe per mode (and
its BlockLLM mode, the whole paper config), bench_optim.py's ZeRO stage per mode.

optim.always_train / optim.inactive are the block optimizer's kinds of parameters: always trained
with Adam (default embedding, head, norms), and what the unselected blocks do (none: frozen; sign:
signSGD, the default).
"""
from __future__ import annotations

MODES: dict[str, tuple[str, ...]] = {
    "adamw": ("--optim.name", "adamw"),
    "adamw_compiled": ("--optim.name", "adamw", "--model.compile", "true"),
    "galore_torch": ("--optim.name", "galore_torch"),  # galore-torch's GaLoreAdamW, the external reference
    "galore": ("--optim.name", "galore"),  # our dense GaLore: every block, nothing frozen
    "gradnorm_lorp": ("--optim.name", "gradnorm_lorp"),
    # the default: always-trained Adam + Adam on 5% of the body + signSGD on the rest, 8-bit moments
    "block": ("--optim.name", "block"),
    "block_compiled": ("--optim.name", "block", "--model.compile", "true"),
    "block_8bit": ("--optim.name", "block", "--optim.eight_bit", "true"),  # (= block: the name earlier results use)
    "block_fp32": ("--optim.name", "block", "--optim.eight_bit", "false"),  # the default before 8-bit
    "block_sample": ("--optim.name", "block", "--optim.selection", "sample"),  # importance sampling (MISA)
    "block_frozen": ("--optim.name", "block", "--optim.inactive", "none"),  # unselected blocks skip weight grads
    "block_noalways": ("--optim.name", "block", "--optim.always_train", "[]"),
    "block_galore": ("--optim.name", "block", "--optim.projection", "galore", "--optim.eight_bit", "false"),
    "block_galore_8bit": ("--optim.name", "block", "--optim.projection", "galore", "--optim.eight_bit", "true"),
    "block_galore_8bit_frozen": ("--optim.name", "block", "--optim.projection", "galore", "--optim.eight_bit", "true",
                                 "--optim.inactive", "none"),
    "block_gradnorm_lorp": ("--optim.name", "block", "--optim.projection", "gradnorm_lorp",
                            "--optim.eight_bit", "false"),
    # configs/blockllm_paper.yaml's rule for which blocks train: embedding and head frozen, no
    # always-trained blocks, the unselected frozen, no periodic reselection
    "blockllm": ("--optim.name", "block", "--optim.frozen_patterns", "[embed, lm_head]", "--optim.always_train", "[]",
                 "--optim.inactive", "none", "--optim.reselect_every", "0", "--optim.eight_bit", "false"),
}


def option_pairs(mode: str) -> list[tuple[str, str]]:
    """The mode's options as (dotted key, value) pairs."""
    opts = MODES[mode]
    return [(opts[i][2:], opts[i + 1]) for i in range(0, len(opts), 2)]


def optim_overrides(mode: str) -> dict[str, str] | None:
    """{optim key: value as typed on the command line} for a mode that sets only optim.* keys;
    None for one that sets others too (e.g. model.compile), which needs the whole trainer."""
    pairs = option_pairs(mode)
    if not all(key.startswith("optim.") for key, _ in pairs):
        return None
    return {key.removeprefix("optim."): value for key, value in pairs}
