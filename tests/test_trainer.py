"""End-to-end runs of launch/pretrain.py under real launchers (real processes over gloo)."""
import math

import numpy as np
import pytest

from tests.launching import TINY, losses, read_metrics, run_pretrain, write_ds_config

STEPS = 20


@pytest.fixture(scope="module")
def one_rank_reference(tmp_path_factory):
    """1 rank, micro 2 x accumulation 2: the global batch that 2 ranks x micro 2 also see."""
    tmp = tmp_path_factory.mktemp("ref")
    ds = write_ds_config(tmp / "ds.json", micro=2, accum=2)
    run_pretrain(["--run_dir", str(tmp / "run"), "--deepspeed_config", str(ds),
                  "--train.steps", str(STEPS)] + TINY)
    return losses(tmp / "run")


def test_deepspeed_launcher_end_to_end(tmp_path):
    ds = write_ds_config(tmp_path / "ds.json", micro=4, accum=1)
    run_dir = tmp_path / "run"
    run_pretrain(["--run_dir", str(run_dir), "--deepspeed_config", str(ds), "--train.steps", "40",
                  "--train.eval_every", "20"] + TINY, launcher="deepspeed", nproc=1)
    rows = read_metrics(run_dir)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").exists() and (run_dir / "ds_config.json").exists()
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
    assert last < first - 0.5, (first, last)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert math.isclose(evals[1]["eval_ppl"], math.exp(evals[1]["eval_loss"]), rel_tol=1e-9)
    contract = {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s",
                "peak_mem_bytes", "n_params", "optim_state_bytes", "optim_state_bytes_total",
                "skipped_data_lines"}
    assert contract <= set(rows[-1])
    assert rows[-1]["optim_state_bytes"] >= 8 * rows[-1]["n_params"]  # fp32 AdamW: two moments


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_two_deepspeed_ranks_match_one_rank(tmp_path, one_rank_reference, stage):
    ds = write_ds_config(tmp_path / "ds.json", micro=2, accum=1, stage=stage)
    run_pretrain(["--run_dir", str(tmp_path / "run"), "--deepspeed_config", str(ds),
                  "--train.steps", str(STEPS)] + TINY, launcher="deepspeed", nproc=2)
    got = losses(tmp_path / "run")
    assert len(got) == STEPS
    np.testing.assert_allclose(got, one_rank_reference, rtol=0, atol=1e-5)


def test_torchrun_matches_one_rank(tmp_path, one_rank_reference):
    ds = write_ds_config(tmp_path / "ds.json", micro=2, accum=1)
    run_pretrain(["--run_dir", str(tmp_path / "run"), "--deepspeed_config", str(ds),
                  "--train.steps", str(STEPS)] + TINY, launcher="torchrun", nproc=2)
    np.testing.assert_allclose(losses(tmp_path / "run"), one_rank_reference, rtol=0, atol=1e-5)
