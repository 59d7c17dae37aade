import io

import numpy as np
import pytest
import torch

from scaletrain.data import (LocalC4, PreparedCorpus, PreparedDataError, PreparedWindowLoader,
                             TrainWindowLoader, WindowPermutation, eval_windows, load_tokenizer,
                             tokenizer_fingerprint)
from scaletrain.data.prepared import prepared_eval_windows
from tests.data.corpus import prepared
from tests.data.test_loader import global_windows

SEQ = 32


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("default")


@pytest.fixture(scope="module")
def data(tmp_path_factory, tok):
    """(source directory of JSON shards, PreparedCorpus of it)."""
    src, out = prepared(tmp_path_factory.mktemp("prepared"))
    return src, PreparedCorpus(out, tokenizer_fingerprint(tok))


def all_ranks(corpus, world_size, steps, state=None, shuffle=False, seed=0):
    union = {}
    for rank in range(world_size):
        loader = PreparedWindowLoader(corpus, SEQ, 2, 2, rank, world_size, shuffle, seed)
        if state is not None:
            loader.load_state_dict(state)
        windows = global_windows(loader, steps)
        assert not set(windows) & set(union), "two ranks got the same global window"
        union.update(windows)
    return union, loader.state_dict()


def stacked(union):
    assert sorted(union) == list(range(min(union), min(union) + len(union)))
    return torch.stack([union[g] for g in sorted(union)])


def test_prepared_windows_equal_the_on_the_fly_loader_across_shards_and_epochs(data, tok):
    src, corpus = data
    prepared_loader = PreparedWindowLoader(corpus, SEQ, 2, 3)
    per_epoch = prepared_loader.windows_per_epoch
    assert len(corpus.shards) == 3 and 60 < per_epoch < 300
    steps = per_epoch // 6 + 3  # past the end of the first epoch
    on_the_fly = TrainWindowLoader(LocalC4(src), tok, SEQ, 2, 3)
    for _ in range(steps):
        for a, b in zip(prepared_loader.next_step(), on_the_fly.next_step()):
            assert torch.equal(a, b)
    assert prepared_loader.epoch == on_the_fly.epoch == 1
    assert prepared_loader.skipped_lines == 1 and on_the_fly.skipped_lines >= 1


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_n_ranks_see_the_windows_of_one_rank(data, world_size):
    _, corpus = data
    steps = 8
    union, _ = all_ranks(corpus, world_size, steps)
    one, _ = all_ranks(corpus, 1, steps * world_size)
    assert torch.equal(stacked(union), stacked(one))


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_mid_shard_and_mid_epoch_at_another_world_size(data, shuffle):
    _, corpus = data
    union, state = all_ranks(corpus, 2, steps=5, shuffle=shuffle, seed=7)  # 40 windows: in shard 1
    assert state["windows_consumed"] == 40 and state["epoch"] == 0
    buffer = io.BytesIO()
    torch.save(state, buffer)  # plain types only: survives weights_only loading
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    straight, _ = all_ranks(corpus, 1, steps=5 * 2 + 36, shuffle=shuffle, seed=7)  # into epoch 1
    for world_size, steps in ((3, 12), (1, 36), (4, 9)):
        resumed, end = all_ranks(corpus, world_size, steps, state=state, shuffle=shuffle, seed=7)
        assert sorted(resumed) == list(range(40, 40 + 144))
        assert torch.equal(stacked(resumed), stacked({g: straight[g] for g in resumed}))
        assert end["epoch"] == 1


def test_a_state_from_other_data_or_order_is_refused(data, tok):
    src, corpus = data
    loader = PreparedWindowLoader(corpus, SEQ, 2, 1, shuffle=True, shuffle_seed=1)
    loader.next_step()
    state = loader.state_dict()
    with pytest.raises(ValueError, match="shuffle_seed 1.*has 2"):
        PreparedWindowLoader(corpus, SEQ, 2, 1, shuffle=True, shuffle_seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len 32.*has 64"):
        PreparedWindowLoader(corpus, 64, 2, 1, shuffle=True, shuffle_seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="on-the-fly loader"):
        loader.load_state_dict(TrainWindowLoader(LocalC4(src), tok, SEQ, 2, 1).state_dict())
    with pytest.raises(ValueError, match="prepared"):
        TrainWindowLoader(LocalC4(src), tok, SEQ, 2, 1).load_state_dict(state)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 100, 1000, 4097])
def test_window_permutation_is_a_seeded_permutation(n):
    perm = [WindowPermutation(n, seed=3, epoch=0)(j) for j in range(n)]
    assert sorted(perm) == list(range(n))
    assert perm == [WindowPermutation(n, seed=3, epoch=0)(j) for j in range(n)]
    if n >= 64:  # small n may coincide by chance; large ones differ in most places
        other_seed = [WindowPermutation(n, seed=4, epoch=0)(j) for j in range(n)]
        other_epoch = [WindowPermutation(n, seed=3, epoch=1)(j) for j in range(n)]
        assert sum(a != b for a, b in zip(perm, other_seed)) > n // 2
        assert sum(a != b for a, b in zip(perm, other_epoch)) > n // 2
        assert sum(p == j for j, p in enumerate(perm)) < n // 8  # not the identity


def test_shuffled_epochs_serve_every_window_exactly_once(data):
    _, corpus = data
    plain = PreparedWindowLoader(corpus, SEQ, 1, 1)
    n = plain.windows_per_epoch
    in_order = plain.windows(0, n)
    shuffled = PreparedWindowLoader(corpus, SEQ, 1, 1, shuffle=True, shuffle_seed=5)
    epochs = [shuffled.windows(e * n, n) for e in range(2)]
    key = lambda rows: sorted(map(bytes, rows.astype(np.uint16)))  # noqa: E731
    for rows in epochs:
        assert key(rows) == key(in_order)
        assert not np.array_equal(rows, in_order)
    assert not np.array_equal(epochs[0], epochs[1])
    again = PreparedWindowLoader(corpus, SEQ, 1, 1, shuffle=True, shuffle_seed=5).windows(0, n)
    assert np.array_equal(again, epochs[0])


def test_shuffled_n_ranks_see_the_windows_of_one_rank(data):
    _, corpus = data
    union, _ = all_ranks(corpus, 3, steps=6, shuffle=True, seed=9)
    one, _ = all_ranks(corpus, 1, steps=18, shuffle=True, seed=9)
    assert torch.equal(stacked(union), stacked(one))


@pytest.mark.parametrize("n_windows,world_size", [(10, 3), (7, 1)])
def test_prepared_eval_windows_equal_the_on_the_fly_ones(data, tok, n_windows, world_size):
    src, corpus = data
    for rank in range(world_size):
        a = prepared_eval_windows(corpus, SEQ, n_windows, rank, world_size, micro_batch=2)
        b = eval_windows(LocalC4(src), tok, SEQ, n_windows, rank, world_size, micro_batch=2)
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="validation data has only"):
        prepared_eval_windows(corpus, SEQ, 10_000)


def test_another_tokenizer_is_refused_naming_both(data):
    _, corpus = data
    other = tokenizer_fingerprint(load_tokenizer("llama32k"))
    with pytest.raises(PreparedDataError, match="tokenized with 'default'.*--data.tokenizer default"):
        PreparedCorpus(corpus.path, other)
