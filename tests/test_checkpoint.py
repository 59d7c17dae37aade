"""Checkpoints: SIGKILL and resume bit-identically, crash mid-save, corruption, world-size change."""
import json
import logging
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from scaletrain import checkpoint as ckpt
from tests.launching import (REPO, TINY, launch_cmd, launch_env, read_metrics, run_pretrain, run_two_nodes,
                             write_ds_config)

STEPS = 8


def last_loss_per_step(run_dir):
    return {row["step"]: row["loss"] for row in read_metrics(run_dir)}  # later rows win


def kill_when(run_args, launcher, nproc, ready, env=None, timeout=300):
    """Start a run in its own process group and SIGKILL all of it once `ready()` is true."""
    proc = subprocess.Popen(launch_cmd(launcher, nproc) + run_args, cwd=REPO, start_new_session=True,
                            env=launch_env(**(env or {})), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"run ended before the kill point: {proc.stderr.read()[-3000:]}")
            if time.time() > deadline:
                raise AssertionError("kill point never reached")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def rewound_copy(run_dir, dest):
    """A copy of a finished 8-step run whose newest checkpoint is step 4 again: resuming it
    rewrites steps 5..8, which must match the original run's."""
    shutil.copytree(run_dir, dest)
    shutil.rmtree(dest / "checkpoints" / f"step_{STEPS:08d}")
    (dest / "checkpoints" / "latest").write_text("step_00000004\n")
    return dest


def writer_ranks(step_dir, prefix):
    """{key under prefix: ranks whose DCP file holds it}, from DCP's metadata (file __<rank>_*)."""
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(step_dir / "dcp")).read_metadata().storage_data
    out = {}
    for index, info in storage.items():
        if index.fqn.startswith(prefix):
            out.setdefault(index.fqn[len(prefix):], set()).add(int(info.relative_path.split("_")[2]))
    return out


def block_writers(step_dir):
    """{block name: ranks that wrote any of its state}."""
    out = {}
    for key, ranks in writer_ranks(step_dir, "optim/blocks/").items():
        out.setdefault(key.split("/")[0], set()).update(ranks)
    return out


def rows_at_least(run_dir, n):
    f = run_dir / "metrics.jsonl"
    return lambda: f.exists() and len(f.read_text().splitlines()) >= n


BLOCK = ["--optim.name", "block", "--optim.density", "0.2", "--optim.reselect_every", "5",
         "--optim.keep_state_on_reselect", "true"]
# low-rank projectors and 8-bit moments in the state: llama_9m's 128-wide weights at rank 32
# have 4,096-value moments, the smallest that are quantized
LOWRANK_8BIT = ["--optim.rank", "32", "--optim.update_proj_gap", "3", "--optim.eight_bit", "true"]
GRADNORM_8BIT = BLOCK + ["--optim.projection", "gradnorm_lorp"] + LOWRANK_8BIT
# Runs compared across world sizes use plain Adam: there gradient sums differ in the last bits,
# which can flip an 8-bit code or rotate a GaLore basis where singular values nearly tie. The
# projected and 8-bit states' resharding is compared exactly in tests/optim/test_lowrank.py.


@pytest.mark.parametrize("optim", [["--optim.name", "adamw"], BLOCK, GRADNORM_8BIT],
                         ids=["adamw", "block", "block_gradnorm_8bit"])
def test_sigkill_two_ranks_then_resume_is_bit_identical(tmp_path, optim):
    ds = write_ds_config(tmp_path / "ds.json", micro=2, accum=1)
    common = ["--deepspeed_config", str(ds), "--train.steps", str(STEPS),
              "--checkpoint.every_steps", "3"] + optim + TINY
    run_pretrain(["--run_dir", str(tmp_path / "whole")] + common, launcher="deepspeed", nproc=2)
    cut = tmp_path / "cut"
    kill_when(["--run_dir", str(cut)] + common, "deepspeed", 2, rows_at_least(cut, 5))
    assert (cut / "checkpoints" / "latest").exists()
    run_pretrain(["--run_dir", str(cut), "--resume", "auto"] + common, launcher="deepspeed", nproc=2)
    assert last_loss_per_step(cut) == last_loss_per_step(tmp_path / "whole")  # exact equality


def test_kill_during_save_resumes_from_previous_checkpoint(tmp_path):
    common = ["--train.steps", "8", "--checkpoint.every_steps", "4"] + TINY
    run_pretrain(["--run_dir", str(tmp_path / "whole")] + common)
    cut = tmp_path / "cut"
    pending = cut / "checkpoints" / ".tmp-step_00000008" / "trainer.pt"
    kill_when(["--run_dir", str(cut)] + common, "python", 1, pending.exists,
              env={ckpt.PAUSE_BEFORE_COMMIT_ENV: "8:60"})
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert ckpt.find_checkpoint("auto", cut).name == "step_00000004"
    proc = run_pretrain(["--run_dir", str(cut), "--resume", "auto"] + common)
    assert "at step 4" in proc.stderr
    assert last_loss_per_step(cut) == last_loss_per_step(tmp_path / "whole")


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpts") / "run"
    run_pretrain(["--run_dir", str(run), "--train.steps", "6", "--checkpoint.every_steps", "2",
                  "--checkpoint.keep_latest", "2"] + TINY)
    return run


def test_keep_latest_prunes_and_latest_is_newest(three_checkpoints):
    root = three_checkpoints / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    assert ckpt.find_checkpoint("auto", three_checkpoints).name == "step_00000006"


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete", "no_manifest"])
def test_damaged_checkpoint_is_named_and_previous_used(three_checkpoints, tmp_path, caplog, damage):
    run = tmp_path / "run"
    shutil.copytree(three_checkpoints, run)
    newest = run / "checkpoints" / "step_00000006"
    target = newest / ("manifest.json" if damage == "no_manifest" else "dcp/__0_0.distcp")
    if damage == "flip_byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    else:
        target.unlink()
    with caplog.at_level(logging.WARNING, logger="scaletrain"):
        assert ckpt.find_checkpoint("auto", run).name == "step_00000004"
    assert "step_00000006" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="step_00000006"):
        ckpt.find_checkpoint(str(newest), run)  # an explicit path is never silently replaced


def test_no_intact_checkpoint_is_a_clear_error(three_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(three_checkpoints, run)
    for d in (run / "checkpoints").glob("step_*"):
        (d / "dcp" / ".metadata").unlink()
    proc = run_pretrain(["--run_dir", str(run), "--resume", "auto", "--train.steps", "6"] + TINY,
                        check=False)
    assert proc.returncode == 1 and "no intact checkpoint" in proc.stderr


def test_optimizer_state_loads_weights_only_and_by_name(three_checkpoints):
    path = three_checkpoints / "checkpoints" / "step_00000006"
    state = torch.load(path / "trainer.pt", weights_only=True)
    assert state["step"] == 6 and state["loader"]["windows_consumed"] > 0
    assert state["optim"]["kind"] == "torch"
    saved = ckpt.SavedState(path)
    assert "optim/state/model.layers.0.self_attn.q_proj.weight/exp_avg" in saved.keys
    assert "model/model.layers.0.self_attn.q_proj.weight" in saved.keys


def test_old_format_is_a_clear_error_not_skipped(three_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(three_checkpoints, run)
    manifest = run / "checkpoints" / "step_00000006" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format": 2', '"format": 1'))
    with pytest.raises(ckpt.CheckpointFormatError, match="format 1.*--resume none"):
        ckpt.find_checkpoint("auto", run)


@pytest.mark.parametrize("save_stage,resume_stage,launcher", [(0, 0, "python"), (2, 1, "deepspeed")],
                         ids=["stage0_to_single", "zero2_to_zero1"])
def test_two_ranks_saved_one_rank_resumes(tmp_path, save_stage, resume_stage, launcher):
    """Same global batch: 2 ranks x micro 2 == 1 rank x micro 2 x accumulation 2. Dense AdamW
    under ZeRO is gathered from DeepSpeed's partitions at save and re-split at load."""
    ds2 = write_ds_config(tmp_path / "ds2.json", micro=2, accum=1, stage=save_stage)
    ds1 = write_ds_config(tmp_path / "ds1.json", micro=2, accum=2, stage=resume_stage)
    common = ["--train.steps", str(STEPS), "--checkpoint.every_steps", "4"] + TINY
    run_pretrain(["--run_dir", str(tmp_path / "whole"), "--deepspeed_config", str(ds2)] + common,
                 launcher="deepspeed", nproc=2)
    # move the run to one rank from its step-4 checkpoint; the 2-rank steps 5..8 get rewritten
    run = rewound_copy(tmp_path / "whole", tmp_path / "moved")
    run_pretrain(["--run_dir", str(run), "--deepspeed_config", str(ds1), "--resume", "auto"] + common,
                 launcher=launcher, nproc=1)
    got, want = last_loss_per_step(run), last_loss_per_step(tmp_path / "whole")
    np.testing.assert_allclose([got[s] for s in range(5, STEPS + 1)],
                               [want[s] for s in range(5, STEPS + 1)], rtol=0, atol=1e-5)


def test_bf16_block_run_matches_one_rank_and_resumes_its_masters_at_one_rank(tmp_path):
    """bf16 on CPU (bf16 weights, fp32 masters of the selected blocks on their owners, fp32
    gradient accumulation): 2 DeepSpeed ranks at ZeRO-2 give the 1-rank losses; the masters are
    in the optimizer shards, and a 1-rank resume from the 2-rank checkpoint continues the run."""
    ds2 = write_ds_config(tmp_path / "ds2.json", micro=2, accum=1, stage=2, bf16=True)
    ds1 = write_ds_config(tmp_path / "ds1.json", micro=2, accum=2, stage=2, bf16=True)
    # the rest frozen: the sign of a bf16 gradient within rounding of zero differs between 2 and 1
    # ranks and moves that weight by 2 lr (the fp32 sign rule over ranks: tests/optim)
    common = ["--train.steps", str(STEPS), "--checkpoint.every_steps", "4"] + TINY + BLOCK + ["--optim.inactive", "none"]
    run_pretrain(["--run_dir", str(tmp_path / "whole"), "--deepspeed_config", str(ds2)] + common,
                 launcher="deepspeed", nproc=2)
    run_pretrain(["--run_dir", str(tmp_path / "one"), "--deepspeed_config", str(ds1)] + common)
    want = last_loss_per_step(tmp_path / "whole")
    np.testing.assert_allclose(list(last_loss_per_step(tmp_path / "one").values()), list(want.values()),
                               rtol=0, atol=1e-5)
    step4 = tmp_path / "whole" / "checkpoints" / "step_00000004"
    assert {t.dtype for t in ckpt.load_model_state(step4).values()} == {torch.bfloat16}
    saved = ckpt.SavedState(step4)
    selected = torch.load(step4 / "trainer.pt", weights_only=True)["optim"]["selected"]
    masters = [k.split("/")[2] for k in saved.keys if k.endswith("/master")]
    assert sorted(masters) == sorted(selected)  # each selected block's master, once
    assert all(saved.meta[f"optim/blocks/{n}/master"].properties.dtype == torch.float32 for n in masters)
    writers = block_writers(step4)
    assert all(len(r) == 1 for r in writers.values()) and set().union(*writers.values()) == {0, 1}
    run = rewound_copy(tmp_path / "whole", tmp_path / "moved")
    run_pretrain(["--run_dir", str(run), "--deepspeed_config", str(ds1), "--resume", "auto"] + common)
    got = last_loss_per_step(run)
    np.testing.assert_allclose([got[s] for s in range(5, STEPS + 1)], [want[s] for s in range(5, STEPS + 1)],
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("optim,resume", [([], ["--backend", "deepspeed"]), (BLOCK, ["--backend", "fsdp"]),
                                          (BLOCK, ["--backend", "deepspeed"])],
                         ids=["adamw_to_deepspeed_1", "block_to_fsdp_3", "block_to_deepspeed_1"])
def test_fsdp2_checkpoint_resumes_elsewhere(tmp_path, optim, resume):
    """Saved under FSDP2 at 2 ranks (the block state gathered from row shards), resumed under
    DeepSpeed at 1 rank or under FSDP2 at 3 (re-split unevenly); same global batch of 6."""
    ds2 = write_ds_config(tmp_path / "ds2.json", micro=1, accum=3)
    common = ["--train.steps", str(STEPS), "--checkpoint.every_steps", "4"] + optim + TINY
    run_pretrain(["--run_dir", str(tmp_path / "whole"), "--backend", "fsdp", "--deepspeed_config",
                  str(ds2)] + common, launcher="torchrun", nproc=2)
    run = rewound_copy(tmp_path / "whole", tmp_path / "moved")
    nproc = 3 if "fsdp" in resume else 1
    ds = write_ds_config(tmp_path / "dsn.json", micro=1, accum=6 // nproc)
    run_pretrain(["--run_dir", str(run), "--deepspeed_config", str(ds), "--resume", "auto"] + resume + common,
                 launcher="torchrun" if nproc > 1 else "deepspeed", nproc=nproc)
    got, want = last_loss_per_step(run), last_loss_per_step(tmp_path / "whole")
    np.testing.assert_allclose([got[s] for s in range(5, STEPS + 1)],
                               [want[s] for s in range(5, STEPS + 1)], rtol=0, atol=1e-5)


GLOBAL_MICRO = 12  # divisible by 1, 2, 3 and 4 ranks at micro-batch 1
BLOCK_RESUME = ["--train.steps", str(STEPS), "--checkpoint.every_steps", "4"] + BLOCK + TINY


@pytest.fixture(scope="module")
def block_two_rank_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("block2")
    ds2 = write_ds_config(tmp / "ds2.json", micro=1, accum=GLOBAL_MICRO // 2, stage=2)  # sharded state
    run_pretrain(["--run_dir", str(tmp / "whole"), "--deepspeed_config", str(ds2)] + BLOCK_RESUME,
                 launcher="deepspeed", nproc=2)
    return tmp / "whole"


@pytest.mark.parametrize("new_world", [1, 3, 4])
def test_block_state_saved_at_two_ranks_resumes_at_other_world_sizes(tmp_path, block_two_rank_run,
                                                                      new_world):
    """The owner map is recomputed; each rank loads the blocks it now owns; losses continue."""
    step4 = block_two_rank_run / "checkpoints" / "step_00000004"
    writers = block_writers(step4)  # each block's state in exactly one rank's file: its owner's
    selected = torch.load(step4 / "trainer.pt", weights_only=True)["optim"]["selected"]
    assert set(writers) == set(selected) and all(len(r) == 1 for r in writers.values())
    assert set().union(*writers.values()) == {0, 1}
    run = rewound_copy(block_two_rank_run, tmp_path / "moved")
    dsn = write_ds_config(tmp_path / "dsn.json", micro=1, accum=GLOBAL_MICRO // new_world, stage=2)
    run_pretrain(["--run_dir", str(run), "--deepspeed_config", str(dsn), "--resume", "auto"] + BLOCK_RESUME,
                 launcher="deepspeed", nproc=new_world)
    got, want = last_loss_per_step(run), last_loss_per_step(block_two_rank_run)
    np.testing.assert_allclose([got[s] for s in range(5, STEPS + 1)],
                               [want[s] for s in range(5, STEPS + 1)], rtol=0, atol=1e-5)


def test_async_save_writes_byte_identical_checkpoints(tmp_path):
    """checkpoint.async_save: the background writer commits exactly what a blocking save does."""
    ds = write_ds_config(tmp_path / "ds.json", micro=2, accum=1)
    common = ["--deepspeed_config", str(ds), "--train.steps", "6", "--checkpoint.every_steps", "2",
              "--checkpoint.keep_latest", "3"] + BLOCK + TINY
    for mode in ("false", "true"):
        run_pretrain(["--run_dir", str(tmp_path / mode), "--checkpoint.async_save", mode] + common,
                     launcher="deepspeed", nproc=2)
    for step in ("step_00000002", "step_00000004", "step_00000006"):
        sync, background = (json.loads((tmp_path / m / "checkpoints" / step / "manifest.json").read_text())
                            for m in ("false", "true"))
        del sync["files"]["config.yaml"], background["files"]["config.yaml"]  # differ by the flag
        assert background["files"] == sync["files"], step  # same files, same sha256 (RNG too)


def test_two_node_checkpoint_resumes_on_one_node(tmp_path):
    ds2 = write_ds_config(tmp_path / "ds2.json", micro=2, accum=1)
    ds1 = write_ds_config(tmp_path / "ds1.json", micro=2, accum=2)
    common = ["--train.steps", str(STEPS), "--checkpoint.every_steps", "4"] + BLOCK + TINY
    run_two_nodes(["--run_dir", str(tmp_path / "whole"), "--deepspeed_config", str(ds2)] + common, tmp_path)
    run = rewound_copy(tmp_path / "whole", tmp_path / "moved")
    run_pretrain(["--run_dir", str(run), "--deepspeed_config", str(ds1), "--resume", "auto"] + common,
                 launcher="deepspeed", nproc=1)
    got, want = last_loss_per_step(run), last_loss_per_step(tmp_path / "whole")
    np.testing.assert_allclose([got[s] for s in range(5, STEPS + 1)],
                               [want[s] for s in range(5, STEPS + 1)], rtol=0, atol=1e-5)
