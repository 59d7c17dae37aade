"""Building a BlockOptimizer in tests from keyword knobs, as its constructor took them before it
took an OptimConfig: the knobs not given keep OptimConfig's defaults, except the five that
default to BlockLLM's published rule here (embedding and head frozen, nothing always trained,
the rest frozen, no periodic reselection, fp32 moments), which is what these tests were written
against."""
from scaletrain.optim.blockllm import BlockOptimizer
from scaletrain.optim.config import OptimConfig

PAPER_RULE = dict(frozen_patterns=("embed", "lm_head"), always_train=(), inactive="none", reselect_every=0,
                  eight_bit=False)
NOT_KNOBS = ("max_grad_norm", "select_all", "process_group")


def block_optimizer(named_params, **kw) -> BlockOptimizer:
    extra = {k: kw.pop(k) for k in NOT_KNOBS if k in kw}
    if "betas" in kw:
        kw["beta1"], kw["beta2"] = kw.pop("betas")
    return BlockOptimizer(named_params, OptimConfig(name="block", **{**PAPER_RULE, **kw}), **extra)
