import pytest
import torch

from scaletrain.data import PreparedCorpus, PreparedWindowLoader, Prefetcher
from tests.data.corpus import prepared

SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    _, out = prepared(tmp_path_factory.mktemp("prefetch"))
    return PreparedCorpus(out)


def test_prefetched_batches_and_positions_are_the_loaders(corpus):
    plain = PreparedWindowLoader(corpus, SEQ, 2, 2, rank=1, world_size=2)
    ahead = Prefetcher(PreparedWindowLoader(corpus, SEQ, 2, 2, rank=1, world_size=2), depth=3)
    for _ in range(5):
        expected = plain.next_step()
        got = ahead.next_step()
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
        # The position handed out, not the thread's (which is up to 3 steps ahead).
        assert ahead.state_dict() == plain.state_dict()
        assert ahead.windows_consumed == plain.windows_consumed
    assert ahead.loader.windows_consumed > plain.windows_consumed


def test_resuming_a_prefetcher_restarts_at_the_saved_step(corpus):
    first = Prefetcher(PreparedWindowLoader(corpus, SEQ, 2, 1))
    for _ in range(3):
        first.next_step()
    state = first.state_dict()
    expected = first.next_step()
    first.close()

    resumed = Prefetcher(PreparedWindowLoader(corpus, SEQ, 2, 1))
    resumed.next_step()  # already running: loading a state stops it and drops what it loaded
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_step()[0], expected[0])


def test_a_loader_error_reaches_the_training_thread(corpus):
    class Failing:
        def next_step(self):
            raise RuntimeError("disk gone")

        def state_dict(self):
            return {}

    with pytest.raises(RuntimeError, match="disk gone"):
        Prefetcher(Failing()).next_step()
