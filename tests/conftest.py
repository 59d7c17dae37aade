import pytest
import torch

from tools.local_ranks import run_ranks


@pytest.fixture
def ranks():
    """`ranks(fn, world_size, *args)` runs fn on N real gloo processes, returns per-rank results."""
    return run_ranks


@pytest.fixture
def one_thread():
    """One intra-op thread in this process, as every rank of `ranks` has: a 1-rank reference then
    runs the same kernels with the same rounding (a 2-thread matmul sums in another order, and the
    last-bit difference grows past 1e-5 over 20 steps where a GaLore basis is refit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
