"""The optimizers on a GPU take the steps they take on the CPU (same start, same batches): the
block optimizer in its default form (always-trained embedding/head/norms, Adam on selected blocks,
signSGD on the rest) and with GaLore + 8-bit moments, and fused AdamW against foreach AdamW."""

import pytest
import torch

from scaletrain.config import OptimConfig
from scaletrain.models.llama import build_model
from scaletrain.optim import build_optimizer
from tests.optim.test_blockllm import train_block

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

VOCAB = 256


def losses_on(device: str, cfg: OptimConfig, steps: int = 4) -> list[float]:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls on both sides
    model = build_model("llama_9m", VOCAB, seed=0).to(device)
    optimizer, _ = build_optimizer(cfg, model, max_grad_norm=1.0)
    batch = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(0)).to(device)
    return train_block(optimizer, model, [[batch]] * steps)  # one batch, learnt by heart: the loss must fall


@pytest.mark.parametrize("options", [
    dict(name="adamw"),
    dict(name="block", density=0.25, reselect_every=2),  # (8-bit moments: bitsandbytes on CUDA)
    dict(name="block", density=0.25, reselect_every=2, eight_bit=False),
    dict(name="block", density=0.25, reselect_every=2, projection="galore", rank=8, eight_bit=True,
         svd="full"),  # the randomized SVD draws other numbers on another device
], ids=["adamw", "block_default", "block_fp32", "block_galore_8bit"])
def test_cuda_steps_equal_cpu_steps(options):
    cfg = OptimConfig(lr=3e-3, **options)
    cpu, cuda = losses_on("cpu", cfg), losses_on("cuda", cfg)
    assert cpu[0] == pytest.approx(cuda[0], rel=1e-5)  # the same model and batch
    assert cuda == pytest.approx(cpu, rel=2e-3)
    assert cuda[-1] < cuda[0]


@pytest.mark.parametrize("signed", [True, False])
def test_bitsandbytes_kernels_give_the_pure_torch_codes(signed):
    """8-bit moments on CUDA go through bitsandbytes' kernels; a state written by them decodes
    with the pure-torch code (a resume on CPU) and the other way round."""
    pytest.importorskip("bitsandbytes.functional", reason="needs bitsandbytes")
    from scaletrain.optim import quant8

    torch.manual_seed(0)
    x = torch.randn(100_000) * torch.logspace(-7, 0, 100_000)
    x = (x if signed else x.abs()).cuda()
    x[:quant8.CHUNK] = 0.0  # a chunk of exact zeros
    assert quant8.uses_bitsandbytes(x.device)
    codes, absmax = quant8.quantize(x, signed)
    ref_codes, ref_absmax = quant8.quantize_torch(x, signed)
    assert torch.equal(absmax, ref_absmax)
    # the same nearest entry, but for values on a midpoint between two entries (fp rounding) and
    # in all-zero chunks (bitsandbytes writes code 0, -1.0, for 0/0): both decode to 0 there
    live = (absmax > 0).repeat_interleave(quant8.CHUNK)[: x.numel()]
    assert (codes != ref_codes)[live].float().mean().item() < 1e-3
    assert torch.equal(quant8.dequantize(codes, absmax, signed)[~live], x[~live])
    assert torch.equal(quant8.dequantize(ref_codes, absmax, signed),
                       quant8.dequantize_torch(ref_codes, absmax, signed).cuda())
    assert torch.all(quant8.dequantize(codes, absmax, signed)[:quant8.CHUNK] == 0)
