import functools

import pytest
import torch
import torch.multiprocessing as mp

from tools.local_ranks import run_ranks

# What every rank imports anyway: the forkserver imports it once, and each rank is forked from it
# in milliseconds instead of spending seconds of a shared core importing it again.
RANK_PRELOAD = ["torch", "torch.distributed", "transformers", "scaletrain.models.llama", "scaletrain.optim",
                "tools.local_ranks"]


@pytest.fixture(scope="session")
def rank_context():
    """Ranks start from a forkserver: a process that only imported RANK_PRELOAD (never the test
    process's state), so each rank is as fresh as a spawned one and runs the same kernels."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(RANK_PRELOAD)
    return ctx


@pytest.fixture
def ranks(rank_context):
    """`ranks(fn, world_size, *args)` runs fn on N real gloo processes, returns per-rank results."""
    return functools.partial(run_ranks, context=rank_context)


@pytest.fixture
def one_thread():
    """One intra-op thread in this process, as every rank of `ranks` has: a 1-rank reference then
    runs the same kernels with the same rounding (a 2-thread matmul sums in another order, and the
    last-bit difference grows past 1e-5 over 20 steps where a GaLore basis is refit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
