"""Blockwise 4-bit weights (NF4 / int4) and the dense-and-sparse linear layer."""
import pytest
import torch

from scaletrain.zo.quant4 import Quant4, SparseDeltaLinear, error_bound, int4_levels, nf4_levels

# QLoRA's published NF4 table (Dettmers et al. 2023, appendix E)
NF4_PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def test_level_tables():
    torch.testing.assert_close(nf4_levels(torch.float64), torch.tensor(NF4_PUBLISHED, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    assert int4_levels(torch.float64).tolist() == [k / 7 for k in range(-7, 8)]
    assert error_bound("int4") == pytest.approx(1 / 14)
    assert error_bound("nf4") == pytest.approx((1.0 - 0.6961928) / 2, abs=1e-6)  # the gap at -1


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
@pytest.mark.parametrize("shape", [(96, 130), (7, 9), (1, 64)])
def test_round_trip_within_bound_and_nearest_level(fmt, shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 3  # heavy-tailed blocks
    w.view(-1)[::17] = 0.0
    q = Quant4.quantize(w, fmt, block=64)
    back = q.dequantize()
    assert back.shape == w.shape and q.codes.dtype == torch.uint8
    n = w.numel()
    n_blocks = -(-n // 64)
    assert q.codes.numel() == n_blocks * 32 and q.scales.numel() == n_blocks  # two codes a byte
    assert q.nbytes == n_blocks * (32 + 4)
    flat = torch.nn.functional.pad(w.reshape(-1), (0, n_blocks * 64 - n)).view(n_blocks, 64)
    absmax = flat.abs().amax(1, keepdim=True).expand(-1, 64).reshape(-1)[:n]
    err = (back - w).reshape(-1).abs()
    assert bool((err <= error_bound(fmt) * absmax + 1e-7).all())
    # the chosen level is the nearest one: no other level is closer (brute force)
    levels = (nf4_levels() if fmt == "nf4" else int4_levels())
    scaled = w.reshape(-1) / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    best = (scaled.unsqueeze(1) - levels).abs().min(1).values
    assert bool(((back.reshape(-1) / torch.where(absmax > 0, absmax, torch.ones_like(absmax)) - scaled).abs()
                 <= best + 1e-6).all())
    assert bool((back.reshape(-1)[w.reshape(-1) == 0] == 0).all())  # 0 is exact in both formats


def test_sparse_delta_linear_weight_and_forward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24, bias=False)
    idx = torch.tensor([0, 5, 77, 959])  # sorted flat positions in the 24 x 40 weight
    w = lin.weight.detach().clone()

    class Store:
        values = w.reshape(-1)[idx].clone()

    for fmt in ("nf4", "int4", "none"):
        layer = SparseDeltaLinear(lin, idx, Store, 0, fmt, 64)
        eff = layer.weight_now()
        # sensitive coordinates exact, the rest within the 4-bit bound of the zeroed-out base
        assert torch.equal(eff.reshape(-1)[idx], w.reshape(-1)[idx])
        base = w.clone().reshape(-1)
        base[idx] = 0
        if fmt == "none":
            assert torch.equal(eff.reshape(-1)[~torch.isin(torch.arange(w.numel()), idx)],
                               w.reshape(-1)[~torch.isin(torch.arange(w.numel()), idx)])
        else:
            assert (eff - w).abs().max() <= error_bound(fmt) * w.abs().max() + 1e-7
        x = torch.randn(3, 40)
        torch.testing.assert_close(layer(x), x @ eff.T)
        Store.values = Store.values + 1.0  # moving a sparse value moves exactly that coordinate
        moved = layer.weight_now()
        assert torch.equal(moved.reshape(-1)[idx], w.reshape(-1)[idx] + 1.0)
        others = torch.ones(w.numel(), dtype=torch.bool)
        others[idx] = False
        assert torch.equal(moved.reshape(-1)[others], eff.reshape(-1)[others])
        Store.values = w.reshape(-1)[idx].clone()
    assert layer.frozen_bytes() == 24 * 40 * 4  # fmt none keeps the dense fp32 base
