import io
import json
import time

import pytest
import torch

from scaletrain.data import (
    DEFAULT_TRAIN_PATH,
    LocalC4,
    TokenStream,
    TrainWindowLoader,
    eval_windows,
    load_tokenizer,
)

SEQ = 64


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("default")


@pytest.fixture(scope="module")
def source():
    return LocalC4(DEFAULT_TRAIN_PATH)


@pytest.fixture
def tiny_source(tmp_path):
    """Five short documents: an epoch is only a few windows long."""
    texts = [r.text for _, r in zip(range(5), LocalC4(DEFAULT_TRAIN_PATH).documents())]
    path = tmp_path / "tiny.json"
    path.write_text("".join(json.dumps({"text": t[:300]}) + "\n" for t in texts))
    return LocalC4(path)


def reference_windows(source, tok, seq_len, n):
    """Windows 0..n-1 packed independently of the loader: per-epoch stream, tail dropped."""
    stream = []
    for r in source.documents():
        stream += tok.encode(r.text) + [tok.eos_id]
    w = seq_len + 1
    epoch = [stream[i : i + w] for i in range(0, len(stream) - w + 1, w)]
    return torch.tensor([epoch[g % len(epoch)] for g in range(n)]), len(epoch)


def tiny_prefix(source, n_docs):
    """The first n_docs documents of a source, as a source (enough for the reference windows)."""

    class Prefix:
        def documents(self, shard=0, line=0):
            return (r for _, r in zip(range(n_docs), source.documents()))

    return Prefix()


def global_windows(loader, steps):
    """{global window index: window} for this rank's next `steps` steps, from the documented formula."""
    m, a, w, r = loader.micro_batch, loader.grad_accum, loader.world_size, loader.rank
    out = {}
    for _ in range(steps):
        base = loader.windows_consumed
        for k, micro in enumerate(loader.next_step()):
            assert micro.shape == (m, loader.seq_len + 1) and micro.dtype == torch.long
            for i in range(m):
                out[base + (k * w + r) * m + i] = micro[i]
    return out


def all_ranks(source, tok, world_size, steps, state=None, micro_batch=2, grad_accum=2, seq_len=SEQ):
    """Union of every rank's windows (ranks simulated in one process), and each rank's end state."""
    union, states = {}, []
    for rank in range(world_size):
        loader = TrainWindowLoader(source, tok, seq_len, micro_batch, grad_accum, rank, world_size)
        if state is not None:
            loader.load_state_dict(state)
        windows = global_windows(loader, steps)
        assert not set(windows) & set(union), "two ranks got the same global window"
        union.update(windows)
        states.append(loader.state_dict())
    return union, states


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_packing_is_lossless(source, tok):
    loader = TrainWindowLoader(source, tok, SEQ, micro_batch=2, grad_accum=3)
    windows = torch.cat([torch.cat(loader.next_step()) for _ in range(20)])
    ids = windows.flatten().tolist()
    assert len(ids) == 20 * 6 * (SEQ + 1)

    expected = []
    texts = []
    for r in source.documents():
        expected += tok.encode(r.text) + [tok.eos_id]
        texts.append(r.text)
        if len(expected) >= len(ids):
            break
    assert ids == expected[: len(ids)]

    # Text of every document the windows cover completely, split at EOS.
    decoded, start = [], 0
    for end, t in enumerate(ids):
        if t == tok.eos_id:
            decoded.append(tok.decode(ids[start:end]))
            start = end + 1
    assert len(decoded) >= 3
    assert decoded == texts[: len(decoded)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_are_disjoint_and_cover_the_global_stream(source, tok, world_size):
    steps = 3
    union, states = all_ranks(source, tok, world_size, steps)
    n = steps * 2 * 2 * world_size
    assert sorted(union) == list(range(n))
    reference, _ = reference_windows(tiny_prefix(source, 60), tok, SEQ, n)
    assert torch.equal(torch.stack([union[g] for g in range(n)]), reference)
    for state in states[1:]:  # the cursor is global: the same on every rank
        assert_states_equal(state, states[0])


def test_one_rank_accumulating_equals_two_ranks(source, tok):
    one = TrainWindowLoader(source, tok, SEQ, micro_batch=2, grad_accum=2)
    two = [TrainWindowLoader(source, tok, SEQ, 2, grad_accum=1, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        single = one.next_step()
        split = [loader.next_step()[0] for loader in two]
        assert torch.equal(torch.stack(single), torch.stack(split))


def test_resume_matches_an_uninterrupted_run(source, tok):
    straight = TrainWindowLoader(source, tok, SEQ, micro_batch=2, grad_accum=2)
    expected = [straight.next_step() for _ in range(8)][5:]

    first = TrainWindowLoader(source, tok, SEQ, micro_batch=2, grad_accum=2)
    for _ in range(5):
        first.next_step()
    state = first.state_dict()
    assert state["windows_consumed"] == 20 and state["line"] > 0 and len(state["carry"]) > 0

    # Plain types and tensors only: survives torch.save / weights_only torch.load.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = TrainWindowLoader(source, tok, SEQ, micro_batch=2, grad_accum=2)
    resumed.load_state_dict(state)
    for batches in expected:
        assert all(torch.equal(a, b) for a, b in zip(resumed.next_step(), batches))
    assert_states_equal(resumed.state_dict(), straight.state_dict())


class CountingTokenizer:
    """A real tokenizer that counts the documents it encodes."""

    def __init__(self, tok):
        self.tok, self.vocab_size, self.eos_id, self.calls = tok, tok.vocab_size, tok.eos_id, 0

    def encode(self, text):
        self.calls += 1
        return self.tok.encode(text)

    def decode(self, ids):
        return self.tok.decode(ids)


def test_resume_does_not_retokenize_earlier_documents(source, tok):
    loader = TrainWindowLoader(source, tok, SEQ, micro_batch=4, grad_accum=4)
    for _ in range(10):
        loader.next_step()
    state = loader.state_dict()
    assert state["line"] > 20

    counting = CountingTokenizer(tok)
    resumed = TrainWindowLoader(source, counting, SEQ, micro_batch=4, grad_accum=4)
    resumed.load_state_dict(state)
    counting.calls = 0  # the fingerprint check encodes a few probe strings
    resumed.next_step()
    assert counting.calls < 10


def test_state_saved_at_two_ranks_loads_at_one_and_three(source, tok):
    _, states = all_ranks(source, tok, world_size=2, steps=3)
    state = states[0]
    start = state["windows_consumed"]
    assert start == 3 * 2 * 2 * 2

    n_after = 2 * 2 * 2 * 3  # windows of the continuation at world size 2
    reference, _ = reference_windows(tiny_prefix(source, 80), tok, SEQ, start + n_after)
    for world_size, steps in ((1, 6), (3, 2), (2, 3)):
        union, _ = all_ranks(source, tok, world_size, steps, state=state)
        assert sorted(union) == list(range(start, start + n_after))
        assert torch.equal(torch.stack([union[g] for g in sorted(union)]), reference[start:])


def test_epochs_restart_from_the_first_document_and_resume_across_the_boundary(tiny_source, tok):
    seq_len = 32
    reference, per_epoch = reference_windows(tiny_source, tok, seq_len, 40)
    assert 4 <= per_epoch <= 30

    straight = TrainWindowLoader(tiny_source, tok, seq_len, micro_batch=1, grad_accum=2)
    states, windows = [], []
    for _ in range(20):
        states.append(straight.state_dict())
        windows += straight.next_step()
    assert torch.equal(torch.cat(windows), reference)
    assert straight.epoch == 40 // per_epoch - (40 % per_epoch == 0) and straight.epoch >= 1

    # Resume from every saved step, across every epoch boundary.
    for step, state in enumerate(states):
        resumed = TrainWindowLoader(tiny_source, tok, seq_len, micro_batch=1, grad_accum=2)
        resumed.load_state_dict(state)
        assert resumed.epoch == max(2 * step - 1, 0) // per_epoch  # epoch of the last window served
        assert torch.equal(torch.cat(resumed.next_step()), reference[2 * step : 2 * step + 2])


def test_mismatched_state_fails_loudly(source, tok):
    loader = TrainWindowLoader(source, tok, SEQ, micro_batch=2, grad_accum=1)
    loader.next_step()
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seq_len 64.*seq_len 128"):
        TrainWindowLoader(source, tok, 128, 2, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="different tokenizer"):
        TrainWindowLoader(source, load_tokenizer("llama32k"), SEQ, 2, 1).load_state_dict(state)


@pytest.mark.parametrize("n_windows,world_size", [(10, 3), (3, 4), (7, 1)])
def test_eval_windows_split_exactly_the_first_n(source, tok, n_windows, world_size):
    reference, _ = reference_windows(tiny_prefix(source, 30), tok, SEQ, n_windows)
    union = {}
    for rank in range(world_size):
        batches = eval_windows(source, tok, SEQ, n_windows, rank, world_size, micro_batch=2)
        assert all(b.shape[0] <= 2 and b.shape[1] == SEQ + 1 for b in batches)
        rows = torch.cat(batches) if batches else torch.empty(0, SEQ + 1, dtype=torch.long)
        for j, row in zip(range(rank, n_windows, world_size), rows):
            union[j] = row
        assert len(rows) == len(range(rank, n_windows, world_size))
    assert torch.equal(torch.stack([union[j] for j in range(n_windows)]), reference)


def test_eval_asking_for_more_windows_than_exist_fails(tiny_source, tok):
    with pytest.raises(ValueError, match="validation data has only"):
        eval_windows(tiny_source, tok, 32, 1000)


def test_a_whole_epoch_of_the_sample_tokenizes_in_seconds(source, tok):
    start = time.perf_counter()
    stream = TokenStream(source, tok, 257)
    windows = 0
    while stream.epoch == 0:
        stream.skip_windows(1)
        windows += 1
    assert windows > 2000
    assert time.perf_counter() - start < 10
