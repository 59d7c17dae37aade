"""Non-finite steps: skipped identically on all ranks, counted, K in a row stop the run, and a
checkpoint never holds a non-finite value. The NaN comes from the test hook
SCALETRAIN_TEST_NAN_GRAD (one rank's gradient at one step), not from a huge learning rate."""
import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from scaletrain import checkpoint as ckpt

from scaletrain.config import RunConfig
from scaletrain.distributed.engines import NAN_GRAD_ENV
from scaletrain.distributed.runtime import DistContext
from scaletrain.metrics import MetricsWriter
from scaletrain.trainer import save, state_is_finite
from tests.launching import TINY, read_metrics, run_pretrain, write_ds_config

BLOCK_GALORE_8BIT = ["--optim.name", "block", "--optim.density", "0.2", "--optim.reselect_every", "5",
                     "--optim.projection", "galore", "--optim.rank", "32", "--optim.update_proj_gap", "3",
                     "--optim.eight_bit", "true"]
ADAMW = ["--optim.name", "adamw"]


def same(a, b) -> bool:
    """Exact equality of nested checkpoint state (tensors bit for bit)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def checkpoint(run_dir, step):
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    trainer = torch.load(path / "trainer.pt", weights_only=True)
    return {"model": ckpt.load_model_state(path), "optim": ckpt.SavedState(path).read_prefix("optim/"),
            "optim_meta": trainer["optim"], "scheduler": trainer["scheduler"]}


# the DeepSpeed backend's ranks start under torchrun: the same engine as under the DeepSpeed
# launcher (tested in tests/test_trainer.py), which takes ~6 s longer to start
CASES = {  # launcher, ranks, backend, ZeRO stage, optimizer
    "single-adamw": ("python", 1, "single", 0, ADAMW),
    "single-block_galore_8bit": ("python", 1, "single", 0, BLOCK_GALORE_8BIT),
    "deepspeed2-adamw": ("torchrun", 2, "deepspeed", 0, ADAMW),
    "deepspeed2-adamw_zero2": ("torchrun", 2, "deepspeed", 2, ADAMW),
    "deepspeed2-block_galore_8bit_zero2": ("torchrun", 2, "deepspeed", 2, BLOCK_GALORE_8BIT),
    "fsdp2-adamw": ("torchrun", 2, "fsdp", 0, ADAMW),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_nan_gradient_on_one_rank_is_skipped_on_all(tmp_path, monkeypatch, case):
    """The last rank's gradient is NaN at step 3: no rank changes anything at step 3 (its
    checkpoint equals step 2's, every rank's optimizer shard and the LR schedule included),
    the step is counted, and step 4 trains again."""
    launcher, nproc, backend, stage, optim = CASES[case]
    monkeypatch.setenv(NAN_GRAD_ENV, f"{nproc - 1}:3")
    ds = write_ds_config(tmp_path / "ds.json", micro=2, accum=1, stage=stage)
    run_dir = tmp_path / "run"
    proc = run_pretrain(["--run_dir", str(run_dir), "--backend", backend, "--deepspeed_config", str(ds),
                         "--train.steps", "4", "--checkpoint.every_steps", "1",
                         "--checkpoint.keep_latest", "10"] + TINY + optim, launcher=launcher, nproc=nproc)
    rows = {r["step"]: r for r in read_metrics(run_dir)}
    assert [rows[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert rows[3]["grad_norm"] is None and math.isfinite(rows[4]["grad_norm"])
    assert rows[3]["lr"] == rows[2]["lr"] and rows[4]["lr"] != rows[3]["lr"]  # schedule held once
    assert "step 3 skipped" in proc.stderr + proc.stdout
    before, at, after = (checkpoint(run_dir, s) for s in (2, 3, 4))
    assert at["optim"]  # every rank's optimizer state, as saved (DCP)
    assert same(at, before), "the skipped step changed weights, optimizer state or schedule"
    assert not same(after["model"], at["model"]), "step 4 should train again"


def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv(NAN_GRAD_ENV, "0:2,3,4")
    run_dir = tmp_path / "run"
    proc = run_pretrain(["--run_dir", str(run_dir), "--train.steps", "6", "--train.max_skipped_steps", "3",
                         "--checkpoint.every_steps", "1"] + TINY, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    message = next(line for line in proc.stderr.splitlines() if line.startswith("scaletrain: error"))
    assert "step 4" in message and "--optim.lr" in message and "--resume" in message, message
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]  # the stopping step 4 is not logged
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    weights = ckpt.load_model_state(latest)
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_checkpoint_with_non_finite_state_is_not_written(tmp_path, caplog):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert state_is_finite(model, optimizer, ctx)
    optimizer.state[model.weight]["exp_avg"][0, 0] = float("inf")
    assert not state_is_finite(model, optimizer, ctx)
    with caplog.at_level(logging.ERROR, logger="scaletrain"):
        save(RunConfig(), tmp_path, 7, ctx, SimpleNamespace(module=model), optimizer, None, None, {}, None)
    assert not (tmp_path / "checkpoints").exists()
    assert "step 7" in caplog.text and "not written" in caplog.text


def test_metrics_jsonl_is_strict_json(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    writer.log(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    writer.close()

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=reject)
    assert row == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3}
