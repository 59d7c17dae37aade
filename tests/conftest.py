import pytest

from scaletrain.dist.local_ranks import run_ranks


@pytest.fixture
def ranks():
    """`ranks(fn, world_size, *args)` runs fn on N real gloo processes, returns per-rank results."""
    return run_ranks
