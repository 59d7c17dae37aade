"""Checkpoints: SIGKILL and resume bit-identically, crash mid-save, corruption, world-size change.

Multi-rank runs start under torchrun: under any launcher the backend is DeepSpeed (backend auto),
and torchrun starts ~6 s faster a run than the DeepSpeed launcher, which tests/test_trainer.py and
tests/distributed test. One-rank DeepSpeed runs are plain python with --backend deepspeed (a world of
one, as the DeepSpeed launcher with one process gives). An uninterrupted run that several tests
compare against is trained once (module fixtures)."""
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
from tests.launching import REPO, TINY, launch_cmd, launch_env, read_metrics, run_pretrain, write_ds_config

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


def rewound_copy(run_dir, dest, step=4):
    """A copy of a finished 8-step run whose newest checkpoint is `step` again: resuming it
    rewrites the steps after it, which must match the original run's."""
    shutil.copytree(run_dir, dest)
    for later in (dest / "checkpoints").glob("step_*"):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)
    (dest / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
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


def assert_resumed_steps_match(run, whole, first=5):
    """The resumed run's losses at steps first..8 are the uninterrupted run's, to 1e-5."""
    got, want = last_loss_per_step(run), last_loss_per_step(whole)
    np.testing.assert_allclose([got[s] for s in range(first, STEPS + 1)],
                               [want[s] for s in range(first, STEPS + 1)], rtol=0, atol=1e-5)


def rows_at_least(run_dir, n):
    f = run_dir / "metrics.jsonl"
    return lambda: f.exists() and len(f.read_text().splitlines()) >= n


# the default block mode (8-bit moments) with a short reselection cadence
BLOCK = ["--optim.name", "block", "--optim.density", "0.2", "--optim.reselect_every", "5",
         "--optim.keep_state_on_reselect", "true"]
# The launcher runs here test the trainer's checkpoint path (data position, RNG, schedule, weights
# and the optimizer state's files) for the dense and the default block optimizer; the projected
# and 8-bit states' exact save/reshard/load is tested in-process (tests/optim/test_lowrank.py,
# tests/test_checkpoint_shards.py), which is faster than a launcher run per state layout.
OPTIMIZERS = {"adamw": ["--optim.name", "adamw"], "block": BLOCK}
# 2 ranks x micro 2, checkpoints at steps 3, 6 and 8 (the default keep_latest is 3: all kept)
TWO_RANKS = ["--train.steps", str(STEPS), "--checkpoint.every_steps", "3"] + TINY


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """`two_rank_run(optimizer)`: the uninterrupted 2-rank DeepSpeed ZeRO-0 run (blocking saves)
    with that optimizer, trained once for all the tests that compare against it."""
    runs = {}

    def get(name):
        if name not in runs:
            tmp = tmp_path_factory.mktemp(f"whole_{name}")
            ds = write_ds_config(tmp / "ds.json", micro=2, accum=1)
            run_pretrain(["--run_dir", str(tmp / "whole"), "--deepspeed_config", str(ds)] + TWO_RANKS
                         + OPTIMIZERS[name], launcher="torchrun", nproc=2)
            runs[name] = (tmp / "whole", ds)
        return runs[name]
    return get


# the default block optimizer (AdamW's exact resume after a kill: the kill-during-save test below)
@pytest.mark.slow
@pytest.mark.parametrize("optim", ["block"])
def test_sigkill_two_ranks_then_resume_is_bit_identical(tmp_path, two_rank_run, optim):
    whole, ds = two_rank_run(optim)
    common = ["--deepspeed_config", str(ds)] + TWO_RANKS + OPTIMIZERS[optim]
    cut = tmp_path / "cut"
    kill_when(["--run_dir", str(cut)] + common, "torchrun", 2, rows_at_least(cut, 5))
    assert (cut / "checkpoints" / "latest").exists()
    run_pretrain(["--run_dir", str(cut), "--resume", "auto"] + common, launcher="torchrun", nproc=2)
    assert last_loss_per_step(cut) == last_loss_per_step(whole)  # exact equality


THREE_CHECKPOINTS = ["--train.steps", "6", "--checkpoint.every_steps", "2", "--checkpoint.keep_latest", "2"] + TINY


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpts") / "run"
    run_pretrain(["--run_dir", str(run)] + THREE_CHECKPOINTS)
    return run


@pytest.mark.slow  # kills a training process mid-save
def test_kill_during_save_resumes_from_previous_checkpoint(tmp_path, three_checkpoints):
    """Killed while its last checkpoint (step 6) is half written; three_checkpoints is the same
    run uninterrupted."""
    cut = tmp_path / "cut"
    pending = cut / "checkpoints" / ".tmp-step_00000006" / "trainer.pt"
    kill_when(["--run_dir", str(cut)] + THREE_CHECKPOINTS, "python", 1, pending.exists,
              env={ckpt.PAUSE_BEFORE_COMMIT_ENV: "6:60"})
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert ckpt.find_checkpoint("auto", cut).name == "step_00000004"
    proc = run_pretrain(["--run_dir", str(cut), "--resume", "auto"] + THREE_CHECKPOINTS)
    assert "at step 4" in proc.stderr
    assert last_loss_per_step(cut) == last_loss_per_step(three_checkpoints)


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


@pytest.mark.slow
def test_two_ranks_saved_one_rank_resumes_single(tmp_path, two_rank_run):
    """Same global batch: 2 ranks x micro 2 == 1 rank x micro 2 x accumulation 2. The 2-rank
    DeepSpeed ZeRO-0 AdamW run, moved to one plain (backend single) process at its step-3
    checkpoint; the 2-rank steps 4..8 get rewritten."""
    whole, _ = two_rank_run("adamw")
    ds1 = write_ds_config(tmp_path / "ds1.json", micro=2, accum=2, stage=0)
    run = rewound_copy(whole, tmp_path / "moved", step=3)
    run_pretrain(["--run_dir", str(run), "--deepspeed_config", str(ds1), "--resume", "auto"] + TWO_RANKS
                 + OPTIMIZERS["adamw"])
    assert_resumed_steps_match(run, whole, first=4)


@pytest.mark.slow
def test_zero2_saved_at_two_ranks_resumes_at_zero1_on_one_rank(tmp_path):
    """Same global batch as above. Dense AdamW under ZeRO is gathered from DeepSpeed's partitions
    at save and re-split at load."""
    ds2 = write_ds_config(tmp_path / "ds2.json", micro=2, accum=1, stage=2)
    ds1 = write_ds_config(tmp_path / "ds1.json", micro=2, accum=2, stage=1)
    common = ["--train.steps", str(STEPS), "--checkpoint.every_steps", "4"] + TINY
    run_pretrain(["--run_dir", str(tmp_path / "whole"), "--deepspeed_config", str(ds2)] + common,
                 launcher="torchrun", nproc=2)
    # move the run to one rank from its step-4 checkpoint; the 2-rank steps 5..8 get rewritten
    run = rewound_copy(tmp_path / "whole", tmp_path / "moved")
    run_pretrain(["--run_dir", str(run), "--deepspeed_config", str(ds1), "--resume", "auto",
                  "--backend", "deepspeed"] + common)
    assert_resumed_steps_match(run, tmp_path / "whole")


@pytest.mark.slow
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
                 launcher="torchrun", nproc=2)
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


FSDP_OPTIMIZERS = {"adamw": [], "block": BLOCK}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """`fsdp_run(optimizer)`: an 8-step run saved under FSDP2 at 2 ranks (micro 1 x accumulation
    3, checkpoints at 4 and 8), trained once for the tests that resume it elsewhere."""
    runs = {}

    def get(name):
        if name not in runs:
            tmp = tmp_path_factory.mktemp(f"fsdp_{name}")
            ds2 = write_ds_config(tmp / "ds2.json", micro=1, accum=3)
            run_pretrain(["--run_dir", str(tmp / "whole"), "--backend", "fsdp", "--deepspeed_config", str(ds2),
                          "--train.steps", str(STEPS), "--checkpoint.every_steps", "4"] + FSDP_OPTIMIZERS[name]
                         + TINY, launcher="torchrun", nproc=2)
            runs[name] = tmp / "whole"
        return runs[name]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("optim,resume", [("adamw", "deepspeed"), ("block", "fsdp")],
                         ids=["adamw_to_deepspeed_1", "block_to_fsdp_3"])
def test_fsdp2_checkpoint_resumes_elsewhere(tmp_path, fsdp_run, optim, resume):
    """Saved under FSDP2 at 2 ranks (the block state gathered from row shards), resumed under
    DeepSpeed at 1 rank or under FSDP2 at 3 (re-split unevenly); same global batch of 6."""
    whole = fsdp_run(optim)
    common = ["--train.steps", str(STEPS), "--checkpoint.every_steps", "4"] + FSDP_OPTIMIZERS[optim] + TINY
    run = rewound_copy(whole, tmp_path / "moved")
    nproc = 3 if resume == "fsdp" else 1
    ds = write_ds_config(tmp_path / "dsn.json", micro=1, accum=6 // nproc)
    run_pretrain(["--run_dir", str(run), "--deepspeed_config", str(ds), "--resume", "auto", "--backend", resume]
                 + common, launcher="torchrun" if nproc > 1 else "python", nproc=nproc)
    assert_resumed_steps_match(run, whole)


@pytest.mark.slow
def test_async_save_writes_byte_identical_checkpoints(tmp_path, two_rank_run):
    """checkpoint.async_save: the background writer commits exactly what a blocking save does
    (two_rank_run's block run saves blocking)."""
    sync_run, ds = two_rank_run("block")
    run_pretrain(["--run_dir", str(tmp_path / "async"), "--deepspeed_config", str(ds),
                  "--checkpoint.async_save", "true"] + TWO_RANKS + BLOCK, launcher="torchrun", nproc=2)
    steps = ("step_00000003", "step_00000006", "step_00000008")
    assert sorted(p.name for p in (tmp_path / "async" / "checkpoints").glob("step_*")) == list(steps)
    for step in steps:
        sync, background = (json.loads((run / "checkpoints" / step / "manifest.json").read_text())
                            for run in (sync_run, tmp_path / "async"))
        del sync["files"]["config.yaml"], background["files"]["config.yaml"]  # differ by the flag
        assert background["files"] == sync["files"], step  # same files, same sha256 (RNG too)
