import pytest
import torch
import torch.distributed as dist

from tools.local_ranks import run_ranks


def _allreduce_rank():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_world_size(), t.item()


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    return 0


def test_ranks_really_communicate(ranks):
    assert ranks(_allreduce_rank, 3) == [(3, 6.0)] * 3  # the tests' forkserver ranks
    assert run_ranks(_allreduce_rank, 3) == [(3, 6.0)] * 3  # the default (spawn) the tools use


def test_a_failing_rank_is_reported(ranks):
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        ranks(_fail_on_rank_one, 2, timeout=60)
