"""Checkpointed optimizer state is device-independent: loaded onto the CPU whatever device saved
it, and moved by each optimizer to the device of the parameters it now trains; DeepSpeed ZeRO-3
is refused with a pointer to FSDP2."""
import pytest
import torch

from scaletrain import checkpoint as ckpt
from scaletrain.config import ConfigError
from scaletrain.distributed.engines import check_zero_stage
from scaletrain.models.llama import causal_lm_loss
from scaletrain.optim.blockllm import BlockOptimizer
from tests.launching import TINY, run_pretrain, write_ds_config
from tests.optim.test_blockllm import VOCAB, tiny_llama
from tests.optim.paper_rule import block_optimizer

# GaLore projectors, 8-bit moments (with their scales) and plain Adam moments in one state
LOWRANK_8BIT = dict(select_all=True, frozen_patterns=(), projection="galore", rank=8, eight_bit=True)


def trained_optimizer(device: str) -> BlockOptimizer:
    model = tiny_llama().to(device)
    opt = block_optimizer(model.named_parameters(), lr=1e-2, **LOWRANK_8BIT)
    batch = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0)).to(device)
    causal_lm_loss(model, batch).backward()
    opt.step()
    return opt


def saved_checkpoint(opt: BlockOptimizer, root) -> tuple[ckpt.SavedState, dict]:
    """Write the optimizer's shard as a checkpoint does and open it as a resume does."""
    tensors, meta = ckpt.optimizer_shard(opt, model=None)
    path = ckpt.save_checkpoint(root, 1, rank=0, world_size=1, sharded=tensors, keep_latest=2,
                                trainer_state={"step": 1, "optim": meta}, config_text="", ds_config={})
    return ckpt.SavedState(path), meta


def state_devices(opt: BlockOptimizer) -> set[torch.device]:
    return {t.device for st in opt.block_state.values() for t in st.values() if torch.is_tensor(t)}


def test_state_saved_on_cpu_is_moved_to_the_resuming_device(tmp_path):
    """The `meta` device stands in for a GPU: a CPU-saved state must follow the parameters there."""
    saved = trained_optimizer("cpu")
    shards, meta = saved_checkpoint(saved, tmp_path)
    model = tiny_llama().to("meta")
    resumed = block_optimizer(model.named_parameters(), lr=1e-2, **LOWRANK_8BIT)
    ckpt.restore_optimizer(resumed, model, shards, meta)
    assert resumed.block_state.keys() == saved.block_state.keys()
    assert state_devices(resumed) == {torch.device("meta")}
    for name, st in saved.block_state.items():
        for key, value in st.items():
            if torch.is_tensor(value):
                assert resumed.block_state[name][key].shape == value.shape, (name, key)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_state_saved_on_cuda_loads_on_cpu_and_resumes_on_cuda(tmp_path):
    saved = trained_optimizer("cuda")
    shards, meta = saved_checkpoint(saved, tmp_path)
    assert {t.device.type for t in shards.read_prefix("optim/").values()
            if torch.is_tensor(t)} == {"cpu"}  # read onto the CPU, whatever device saved it
    for device in ("cpu", "cuda"):
        model = tiny_llama().to(device)
        resumed = block_optimizer(model.named_parameters(), lr=1e-2, **LOWRANK_8BIT)
        ckpt.restore_optimizer(resumed, model, shards, meta)
        assert {d.type for d in state_devices(resumed)} == {device}
        batch = torch.randint(0, VOCAB, (2, 17), device=device)
        causal_lm_loss(model, batch).backward()
        resumed.step()  # a state left on the wrong device fails here


def test_deepspeed_zero3_is_refused_with_a_pointer_to_fsdp():
    with pytest.raises(ConfigError, match="stage 3.*--backend fsdp"):
        check_zero_stage({"zero_optimization": {"stage": 3}}, "deepspeed")
    check_zero_stage({"zero_optimization": {"stage": 3}}, "fsdp")  # FSDP2 is ZeRO-3 and ignores it
    check_zero_stage({"zero_optimization": {"stage": 2}}, "deepspeed")


@pytest.mark.slow  # the launcher script
def test_deepspeed_zero3_run_exits_2_before_building_anything(tmp_path):
    ds = write_ds_config(tmp_path / "ds.json", micro=2, accum=1, stage=3)
    proc = run_pretrain(["--run_dir", str(tmp_path / "run"), "--backend", "deepspeed",
                         "--deepspeed_config", str(ds)] + TINY, check=False, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error" in proc.stderr and "--backend fsdp" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
