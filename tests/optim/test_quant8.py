"""8-bit moments: the codebook, the round-trip error bound, moments and loss against fp32."""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scaletrain.data import TrainWindowLoader, c4_source, load_tokenizer
from scaletrain.optim import quant8
from tests.optim.test_blockllm import global_batches, train_block
from tests.optim.paper_rule import block_optimizer


def test_codebooks_fit_a_byte_and_cover_the_range():
    for signed in (True, False):
        book = quant8.dynamic_codebook(signed)
        distinct = book.unique()
        assert book.numel() == 256 and torch.all(book[1:] >= book[:-1])
        assert distinct.numel() == (255 if signed else 256)  # signed: 1.0 twice (bitsandbytes' 256)
        assert book.max() == 1.0 and book.min() == (-1.0 if signed else 0.0) and 0.0 in book


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_is_within_half_a_codebook_step(signed):
    torch.manual_seed(0)
    x = torch.randn(10_000) * torch.logspace(-4, 0, 10_000)  # many magnitudes, as Adam moments
    x = x if signed else x.abs()
    codes, absmax = quant8.quantize(x, signed)
    assert codes.dtype == torch.uint8 and absmax.numel() == -(-x.numel() // quant8.CHUNK)
    y = quant8.dequantize(codes, absmax, signed)
    # bound: half the widest gap between neighbouring codebook entries, times the chunk's absmax
    book = quant8.dynamic_codebook(signed)
    half_gap = ((book[1:] - book[:-1]).max() / 2).item()
    scale = absmax.repeat_interleave(quant8.CHUNK)[: x.numel()]
    assert torch.all((x - y).abs() <= half_gap * scale + 1e-12)
    assert half_gap <= (0.0071 if signed else 0.0036)
    # exact where the codebook is exact: zero and each chunk's absmax
    assert torch.all(y[x == 0] == 0)


@pytest.mark.parametrize("cols", [256, 300, 40])
def test_matrices_are_chunked_by_rows_so_any_rows_quantize_as_inside_the_whole(cols):
    """What lets an FSDP2 rank keep its rows of an 8-bit state: rows a..b of a matrix get the
    codes and absmax of rows a..b of the whole matrix's, whatever the row width (a row's last
    chunk is short where the width is not a multiple of CHUNK)."""
    torch.manual_seed(0)
    x = torch.randn(37, cols) * torch.logspace(-6, 0, cols)
    codes, absmax = quant8.quantize(x, True)
    assert absmax.shape == (37, -(-cols // quant8.CHUNK)) == quant8.absmax_shape(x.shape)
    assert torch.equal(absmax[:, 0], x[:, :quant8.CHUNK].abs().amax(dim=1))
    for a, b in [(0, 13), (13, 26), (26, 37), (5, 6)]:
        part_codes, part_absmax = quant8.quantize(x[a:b], True)
        assert torch.equal(part_codes, codes[a:b]) and torch.equal(part_absmax, absmax[a:b])
    y = quant8.dequantize(codes, absmax, True)
    assert torch.equal(quant8.dequantize(codes[5:9], absmax[5:9], True), y[5:9])
    assert (x - y).abs().max() <= 0.0071 * x.abs().max()
    empty_codes, empty_absmax = quant8.quantize(x[:0], True)  # an FSDP2 rank with no rows
    assert empty_codes.shape == (0, cols) and quant8.dequantize(empty_codes, empty_absmax, True).shape == (0, cols)


def test_a_state_saved_flat_chunked_still_dequantizes_and_is_rechunked_by_rows():
    """8-bit states saved before row chunking (one flat run of chunks, 1-D absmax) decode as they
    were written, and update_rules.chunked_by_rows re-quantizes them row by row for FSDP2."""
    from scaletrain.optim.update_rules import chunked_by_rows

    torch.manual_seed(0)
    x = torch.randn(10, 300)
    flat_codes, flat_absmax = quant8.quantize(x.reshape(-1), True)  # the old layout
    old = quant8.dequantize(flat_codes.view(10, 300), flat_absmax, True)
    assert torch.equal(old, quant8.dequantize(flat_codes, flat_absmax, True).view(10, 300))
    assert (old - x).abs().max() <= 0.0071 * x.abs().max()
    st = chunked_by_rows({"exp_avg_q": flat_codes.view(10, 300), "exp_avg_absmax": flat_absmax, "step": 3.0})
    assert st["exp_avg_absmax"].shape == (10, 2) and st["step"] == 3.0
    assert torch.equal(quant8.dequantize(st["exp_avg_q"], st["exp_avg_absmax"], True),
                       quant8.dequantize(*quant8.quantize(old, True), True))


@pytest.mark.parametrize("signed", [True, False])
def test_table_lookup_gives_the_binary_search_codes(signed):
    """nearest_codes (the lookup) against torch.bucketize over the midpoints, on values of every
    magnitude, the codebook entries, the midpoints themselves (ties go to the lower entry) and the
    float neighbours of each midpoint."""
    torch.manual_seed(0)
    x = torch.rand(200_000) * torch.logspace(-12, 0, 200_000)
    mids = quant8._midpoints(signed)
    x = torch.cat([x, quant8.dynamic_codebook(signed), mids, torch.nextafter(mids, torch.tensor(2.0)),
                   torch.nextafter(mids, torch.tensor(-2.0)), torch.tensor([0.0, 1.0])])
    if signed:
        x = torch.cat([x, -x])
    x = x.clamp(-1.0 if signed else 0.0, 1.0)
    assert torch.equal(quant8.nearest_codes(x, signed).long(), torch.bucketize(x, mids))


def test_bitsandbytes_cpu_kernel_is_not_used_because_it_misses_zero():
    """Why the CPU path stays pure torch: bitsandbytes' CPU kernel, given the same codebook, does
    not give back an exact zero (a zero moment, e.g. an embedding row never seen, would move).
    If a bitsandbytes release fixes this, this test fails: then use its CPU kernel too."""
    bnb = pytest.importorskip("bitsandbytes.functional", reason="needs bitsandbytes")
    assert not quant8.uses_bitsandbytes(torch.device("cpu"))
    x = torch.zeros(quant8.CHUNK)
    x[0] = 1.0  # one chunk: absmax 1, the rest exact zeros
    codes, state = bnb.quantize_blockwise(x, code=quant8.dynamic_codebook(True), blocksize=quant8.CHUNK)
    theirs = bnb.dequantize_blockwise(codes, state)
    ours = quant8.dequantize(*quant8.quantize(x, True), True)
    assert torch.equal(ours, x)
    assert (theirs[1:] != 0).all()


def test_eight_bit_moments_track_fp32_moments():
    """The same 30 gradients (of many magnitudes) into an 8-bit and an fp32 optimizer: the
    dequantized moments stay within a stated bound of the fp32 ones: 5% in norm (the signed
    codebook has 64 steps in its top decade; rounding errors accumulate over re-quantizations)."""
    torch.manual_seed(0)
    grads = [torch.randn(64, 128) * torch.logspace(-5, -1, 128) for _ in range(30)]
    opts = []
    for eight_bit in (True, False):
        w = torch.zeros(64, 128, requires_grad=True)
        opt = block_optimizer([("w", w)], lr=1e-3, select_all=True, frozen_patterns=(), density=1.0,
                             eight_bit=eight_bit)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        opts.append(opt)
    st8, st32 = opts[0].block_state["w"], opts[1].block_state["w"]
    assert "exp_avg_q" in st8 and "exp_avg" not in st8
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        deq = quant8.dequantize(st8[f"{key}_q"], st8[f"{key}_absmax"], signed)
        assert ((deq - st32[key]).norm() / st32[key].norm()).item() <= 0.05, key
    assert opts[0].state_bytes() <= 0.26 * opts[1].state_bytes()  # (1 + 4/256) / 4 bytes a value


@pytest.fixture(scope="module")
def c4_batches():
    """52 steps of 8 x 65-token windows of the shipped C4 sample, through the shipped tokenizer."""
    tok = load_tokenizer("default")
    loader = TrainWindowLoader(c4_source("local", None, split="train"), tok, 64, 8, 1, 0, 1)
    return tok.vocab_size, [loader.next_step() for _ in range(52)]


def _c4_run(vocab, batches, eight_bit, projection):
    torch.manual_seed(0)  # 64-wide, so the projections' moments (4096+ values) are quantized
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=4, num_key_value_heads=4,
                                         num_hidden_layers=2, max_position_embeddings=128,
                                         tie_word_embeddings=False))
    opt = block_optimizer(model.named_parameters(), lr=3e-3, select_all=True, frozen_patterns=(),
                         density=1.0, eight_bit=eight_bit, projection=projection, rank=16)
    return train_block(opt, model, batches)


@pytest.mark.parametrize("projection", ["none", "galore"])
def test_eight_bit_loss_curve_within_one_percent_of_fp32(c4_batches, projection):
    l8, l32 = (_c4_run(*c4_batches, eight_bit, projection) for eight_bit in (True, False))
    assert l32[-1] < 0.85 * l32[0]  # it learns
    assert max(abs(a - b) / b for a, b in zip(l8, l32)) <= 0.01


def _fsdp_or_one_rank_run(fsdp: bool, world: int = 3, steps: int = 3):
    """The same 6 micro-batches a step as 1 rank or as `world` FSDP2 ranks (each its slice), every
    block on 8-bit Adam; returns (losses, whole block states) as bytes."""
    import torch.distributed as dist
    from tests.test_checkpoint_shards import _bytes, _model

    model = _model(fsdp)
    opt = block_optimizer(model.named_parameters(), lr=1e-2, select_all=True, frozen_patterns=(), density=1.0,
                          eight_bit=True, max_grad_norm=1.0)
    batches = global_batches(steps, 6)
    if fsdp:
        assert opt.fsdp_rows  # 8-bit moments keep FSDP2's row layout
        r = dist.get_rank()
        batches = [[s[k * world + r] for k in range(len(s) // world)] for s in batches]
    losses = train_block(opt, model, batches)
    return _bytes((losses, opt.state_dict()["blocks"] if fsdp else {n: dict(s) for n, s in opt.block_state.items()}))


def test_fsdp2_row_shards_of_8bit_states_match_one_rank(ranks):
    """Under FSDP2 each rank updates its rows of every 8-bit state (3 ranks: uneven rows). The
    gathered states equal one rank's up to single-code flips: FSDP's reduce-scatter sums
    gradients in another order, and a moment within rounding of a code boundary may round to its
    neighbour (at most 1 code in 1,000 here; the losses agree to 1e-6)."""
    import io

    got_losses, got = torch.load(io.BytesIO(ranks(_fsdp_or_one_rank_run, 3, True)[0]))
    want_losses, want = torch.load(io.BytesIO(_fsdp_or_one_rank_run(False)))
    np.testing.assert_allclose(got_losses, want_losses, rtol=0, atol=1e-6)
    assert set(got) == set(want)
    codes = [k for st in want.values() for k in st if k.endswith("_q")]
    assert codes  # the embedding and head are quantized
    for name, st in want.items():
        for key, value in st.items():
            if key.endswith("_q"):
                flips = (got[name][key].int() - value.int()).abs()
                assert flips.max() <= 1 and flips.sum() <= value.numel() // 1000, (name, key)
            elif torch.is_tensor(value):  # (absmax; fp32 moments of small matrices, which a
                # flipped code's update has moved by a little)
                torch.testing.assert_close(got[name][key], value, rtol=1e-2, atol=1e-8)
