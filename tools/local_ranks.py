"""Start N real processes that talk over gloo on loopback, run a function on each, collect results.

Used by the tests' `ranks` fixture and by the benchmarks in tools/. Functions passed here must
be importable by module path (defined at module level), because ranks start with `spawn`.
Results travel through a queue: return plain Python values, not tensors (a tensor's shared
memory disappears with the process that made it).
"""
from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world_size, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # 2 cores shared by N ranks: oversubscription only adds noise
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        queue.put((rank, True, fn(*args)))
    except BaseException:  # report every failure to the parent, never hang it
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args, timeout: float = 600,
              context: Any = None) -> list[Any]:
    """Run `fn(*args)` on `world_size` gloo ranks; return the results ordered by rank. context:
    the multiprocessing context that starts them (default spawn: fresh interpreters; the tests
    pass a forkserver that has imported torch once, see tests/conftest.py)."""
    ctx = context or mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            (results.__setitem__(rank, value) if ok else errors.append(f"rank {rank}:\n{value}"))
            if errors:
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("a rank failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
