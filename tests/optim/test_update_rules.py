"""The multi-tensor (foreach) AdamW update equals the per-block one bit for bit: blocks with
different step counts, weight decay, and 8-bit blocks (which take the per-block path) mixed in."""
import copy
import math

import torch

from scaletrain.optim.selection import Block
from scaletrain.optim.update_rules import AdamWRule, Hyper

HYPER = Hyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def blocks_and_tensors(rule: AdamWRule, shapes, steps):
    gen = torch.Generator().manual_seed(0)
    blocks = [Block(f"b{i}", f"p{i}", None, math.prod(s)) for i, s in enumerate(shapes)]
    weights = [torch.randn(s, generator=gen) for s in shapes]
    states = [rule.new_state(b, w) for b, w in zip(blocks, weights)]
    for st, n in zip(states, steps):
        st["step"] = float(n)
    return blocks, weights, states


def test_foreach_update_equals_per_block_update():
    shapes, steps = [(8, 4), (3,), (64, 128), (5, 5)], [0, 0, 7, 3]  # 64x128 is 8-bit below
    for eight_bit in (False, True):
        rule = AdamWRule(eight_bit=eight_bit)
        blocks, weights, states = blocks_and_tensors(rule, shapes, steps)
        one_by_one, states_one = copy.deepcopy(weights), copy.deepcopy(states)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            grads = [torch.randn(w.shape, generator=gen) for w in weights]
            rule.update_blocks(blocks, weights, grads, states, HYPER)
            for b, w, g, st in zip(blocks, one_by_one, grads, states_one):
                rule.update(b, w, g, st, HYPER)
        for w, ref in zip(weights, one_by_one):
            assert torch.equal(w, ref)
        assert [st["step"] for st in states] == [3.0, 3.0, 10.0, 6.0]
        assert ("exp_avg_q" in states[2]) == eight_bit  # the per-block path was taken for it
