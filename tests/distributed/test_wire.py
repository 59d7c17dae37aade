"""The wire counter against an independent count, the loopback interface's transmitted bytes
(gloo ranks talk over lo): equal where gloo's algorithm is bandwidth-optimal, and the known gloo
excess where it is not. And every collective of a block-optimizer step goes through the counter."""
import pytest
import torch
import torch.distributed as dist

from scaletrain.distributed.wire import Wire
from tests.optim.paper_rule import block_optimizer

MIB = 2**20


def loopback_tx_bytes() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                return int(counters.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


OPS = ("all_reduce", "broadcast", "all_gather", "reduce", "reduce_scatter")


def _measure_all() -> dict:
    """Each op twice, the quieter measurement kept: other traffic on lo only ever adds bytes."""
    return {op: min((_measure(op) for _ in range(2)), key=lambda m: m["loopback"]) for op in OPS}


def _measure(op: str) -> dict:
    world, wire = dist.get_world_size(), Wire()
    n = 12 * MIB // 4 * world  # divisible by the world size
    t = torch.ones(n)
    dist.barrier()
    before = loopback_tx_bytes()
    dist.barrier()
    if op == "all_reduce":
        wire.all_reduce(t)
    elif op == "broadcast":
        wire.broadcast(t, 0)
    elif op == "reduce":
        wire.reduce(t, 0)
    elif op == "reduce_scatter":
        wire.reduce_scatter_tensor(torch.empty(n // world), t)
    elif op == "all_gather":
        wire.all_gather_into_tensor(torch.empty(n * world), t)
    dist.barrier()
    after = loopback_tx_bytes()
    counted = torch.tensor([wire.take()], dtype=torch.float64)
    dist.all_reduce(counted)  # every rank's count, summed: the total the interface saw
    return {"loopback": after - before, "counted": counted.item()}


@pytest.mark.skipif(not __import__("os").path.exists("/proc/net/dev"), reason="needs Linux /proc/net/dev")
@pytest.mark.parametrize("world", [2, 3])
def test_counted_bytes_match_the_loopback_interface(ranks, world):
    measured = ranks(_measure_all, world)[0]
    ratio = {op: m["loopback"] / m["counted"] for op, m in measured.items()}
    for op in ("all_reduce", "broadcast", "all_gather"):  # gloo sends what the count says (+ headers)
        assert 1.0 <= ratio[op] < 1.1, (op, measured[op])
    assert 1.5 < ratio["reduce"] < 2.6, measured["reduce"]  # gloo's reduce: 2.4x at 2 ranks, 1.8x at 3
    assert 1.9 < ratio["reduce_scatter"] < 2.1, measured["reduce_scatter"]  # gloo: an all-reduce


def _calls_through_wire() -> dict:
    """One block-optimizer step (ZeRO-2 layout, sign rule, GaLore + 8-bit) with torch.distributed's
    collectives and Wire's methods both counted: every collective call must be Wire's."""
    from scaletrain.models.llama import build_model, causal_lm_loss

    names = ("all_reduce", "reduce", "broadcast", "reduce_scatter_tensor", "all_gather_into_tensor",
             "all_gather", "gather", "scatter", "send", "recv")
    dist_calls, wire_calls = [], []
    for name in names:
        real = getattr(dist, name)
        setattr(dist, name, lambda *a, _real=real, _n=name, **k: (dist_calls.append(_n), _real(*a, **k))[1])
        real_wire = getattr(Wire, name)
        setattr(Wire, name, lambda self, *a, _real=real_wire, _n=name, **k: (wire_calls.append(_n), _real(self, *a, **k))[1])
    model = build_model("llama_9m", 256, seed=0)
    opt = block_optimizer(model.named_parameters(), lr=1e-3, density=0.3, reselect_every=1,
                         projection="galore", rank=8, eight_bit=True)  # (ZeRO-2 layout: the default)
    batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(dist.get_rank()))
    for step in range(2):
        if opt.wants_selection(step):
            with opt.selection_pass(step=step):
                causal_lm_loss(model, batch).backward()
        causal_lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    return {"dist": sorted(dist_calls), "wire": sorted(wire_calls), "sent": opt.wire_bytes_last_step}


def test_every_collective_of_a_block_step_goes_through_the_wire(ranks):
    for r in ranks(_calls_through_wire, 2):
        assert r["dist"] and r["dist"] == r["wire"], r
        assert r["sent"] > 0
