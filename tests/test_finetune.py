"""launch/finetune.py end to end: a tiny pretrained checkpoint fine-tuned on the shipped SST-2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scaletrain.distributed.engines import NAN_GRAD_ENV
from tools.local_ranks import free_port
from scaletrain.finetune import main as finetune_main
from scaletrain.trainer import main as pretrain_main
from tests.launching import PRETRAIN, REPO, backend_arg, read_metrics, run_in_process, write_ds_config

FINETUNE = str(REPO / "launch" / "finetune.py")
# small enough for CI: 256 training phrases, 128 held-out sentences, short prompts, 8 calibration windows
SMALL = ["--data.train_examples", "256", "--data.val_examples", "128", "--data.max_len", "48",
         "--train.eval_batch_size", "64", "--train.log_every", "1"]
ZO = ["--optim.name", "zo", "--optim.lr", "2e-3", "--zo.calib_sequences", "8", "--zo.calib_seq_len", "64"]
ZO_STEPS = 30


def run_finetune(args, launcher="python", nproc=1, check=True, timeout=300, port=None, script=FINETUNE):
    # one thread per process: the same kernels (and rounding) at any world size, no oversubscription
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if launcher == "python" and backend_arg(args) in ("auto", "single"):  # main, in this process
        proc = run_in_process(finetune_main if script == FINETUNE else pretrain_main, args)
    else:
        if launcher == "python":
            cmd = [sys.executable, script]
        elif launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                   str(port or free_port()), script]
        else:
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
                   str(port or free_port()), script]
        proc = subprocess.run(cmd + args, cwd=REPO, env=env, text=True, capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"finetune failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
    if launcher == "python":
        cmd = [sys.executable, script]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port or free_port()), script]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
               str(port or free_port()), script]
    proc = subprocess.run(cmd + args, cwd=REPO, env=env, text=True, capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"finetune failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny Llama (llama_9m) pretrained for a few steps on the shipped C4 sample."""
    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    run_finetune(["--run_dir", str(run_dir), "--train.steps", "30", "--data.seq_len", "64", "--train.eval_windows",
                  "4", "--train.warmup_steps", "3", "--train.log_every", "10"], script=PRETRAIN)
    return run_dir


@pytest.fixture(scope="module")
def zo_one_rank(pretrained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zo1")
    ds = write_ds_config(tmp / "ds.json", micro=8, accum=2)
    run_finetune(["--model.path", str(pretrained), "--run_dir", str(tmp / "run"), "--deepspeed_config", str(ds),
                  "--train.steps", str(ZO_STEPS)] + SMALL + ZO)
    return tmp / "run"


def _eval_rows(rows):
    return [r for r in rows if "eval_loss" in r]


@pytest.mark.slow
def test_zo_finetune_improves_held_out_loss_and_saves_the_mask(zo_one_rank, pretrained):
    from scaletrain import checkpoint as ckpt
    from scaletrain.zo.quant4 import error_bound

    rows = read_metrics(zo_one_rank)
    evals = _eval_rows(rows)
    assert [r["step"] for r in evals] == [0, ZO_STEPS]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"] - 0.05, evals  # label-word cross-entropy
    assert evals[1]["eval_accuracy"] >= evals[0]["eval_accuracy"] - 0.02
    last = rows[-1]
    for key in ("loss", "lr", "projected_grad", "abs_projected_grad", "peak_mem_bytes", "weight_bytes",
                "optim_state_bytes", "forward_passes", "trainable_params", "eval_accuracy", "step_time_s"):
        assert key in last, key
    assert last["optim_state_bytes"] == 0 and last["forward_passes"] == ZO_STEPS * 2 * 2
    assert list((zo_one_rank / "tensorboard").glob("events.out.tfevents.*"))

    path = ckpt.find_checkpoint("auto", zo_one_rank)
    assert path.name == f"step_{ZO_STEPS:08d}"
    mask = torch.load(path / "optim_rank00000.pt", weights_only=True)
    assert mask["kind"] == "zo_mask" and mask["density"] == 0.001 and mask["quant"] == "nf4"
    n_candidates = sum(int(np.prod(s)) for s in mask["shapes"].values())
    n_masked = sum(i.numel() for i in mask["indices"].values())
    assert n_masked == round(0.001 * n_candidates) == last["trainable_params"]
    assert len(mask["names"]) == 4 * 7  # llama_9m: q/k/v/o + gate/up/down in 4 layers

    tuned = ckpt.load_model_state(path)
    source = ckpt.load_model_state(ckpt.find_checkpoint("auto", pretrained))
    assert tuned.keys() == source.keys()
    moved = 0
    for name, w in source.items():
        if name not in mask["indices"]:  # embedding, head, norms: untouched
            assert torch.equal(tuned[name], w), name
            continue
        idx = mask["indices"][name]
        flat, orig = tuned[name].reshape(-1), w.reshape(-1)
        moved += int((flat[idx] != orig[idx]).sum())
        rest = torch.ones_like(orig, dtype=torch.bool)
        rest[idx] = False  # frozen coordinates: the NF4 round trip, nothing else
        assert (flat[rest] - orig[rest]).abs().max() <= error_bound("nf4") * orig.abs().max() + 1e-7
    assert moved == n_masked


@pytest.mark.slow
def test_zo_two_deepspeed_ranks_match_one_rank(zo_one_rank, pretrained, tmp_path):
    """Same global batch (2 ranks x 8 vs 1 rank x 8 x 2) and seed: the same mask and trajectory of g.
    The ranks start under torchrun (the DeepSpeed backend under any launcher; the DeepSpeed
    launcher starts ~6 s slower and is tested in tests/test_trainer.py and tests/distributed)."""
    ds = write_ds_config(tmp_path / "ds.json", micro=8, accum=1)
    port = free_port()
    run_finetune(["--model.path", str(pretrained), "--run_dir", str(tmp_path / "run"), "--deepspeed_config", str(ds),
                  "--train.steps", str(ZO_STEPS)] + SMALL + ZO, launcher="torchrun", nproc=2, port=port)
    one, two = read_metrics(zo_one_rank), read_metrics(tmp_path / "run")
    g1 = [r["projected_grad"] for r in one if "projected_grad" in r]
    g2 = [r["projected_grad"] for r in two if "projected_grad" in r]
    assert len(g2) == ZO_STEPS
    np.testing.assert_allclose(g2, g1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_eval_rows(two)[-1]["eval_loss"], _eval_rows(one)[-1]["eval_loss"], rtol=1e-5)
    assert two[-1]["wire_bytes"] == 3 * 8  # one all-reduce of (L+, L-, count) in float64 per step
    m1 = torch.load(sorted((zo_one_rank / "checkpoints").glob("step_*"))[-1] / "optim_rank00000.pt", weights_only=True)
    m2 = torch.load(sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1] / "optim_rank00000.pt",
                    weights_only=True)
    assert all(torch.equal(m1["indices"][n], m2["indices"][n]) for n in m1["names"])
    # DeepSpeed's CPU shared-memory all-reduce is never started, so it leaves no /dev/shm buffers
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


@pytest.mark.slow  # fine-tuning runs through the launcher script
@pytest.mark.parametrize("name", ["adamw", "block"])
def test_first_order_modes_fine_tune_in_the_same_trainer(pretrained, tmp_path, monkeypatch, name):
    """...and a NaN gradient at step 3 is skipped and counted, as in pretraining."""
    monkeypatch.setenv(NAN_GRAD_ENV, "0:3")
    ds = write_ds_config(tmp_path / "ds.json", micro=8, accum=1)
    extra = ["--optim.density", "0.2"] if name == "block" else []
    run_finetune(["--model.path", str(pretrained), "--run_dir", str(tmp_path / "run"), "--deepspeed_config", str(ds),
                  "--optim.name", name, "--optim.lr", "1e-3", "--train.steps", "6"] + SMALL + extra)
    rows = read_metrics(tmp_path / "run")
    evals = _eval_rows(rows)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert rows[-1]["optim_state_bytes"] > 0 and "grad_norm" in rows[-1]
    assert [r["skipped_steps"] for r in rows if "skipped_steps" in r][1:4] == [0, 1, 1]  # steps 2, 3, 4
    if name == "block":
        assert 0 < rows[-1]["selected_params"] < rows[-1]["n_params"]
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


def test_quantized_model_loss_is_close_to_fp32(pretrained):
    """On held-out C4 windows, NF4 (int4) frozen weights + the fp32 sparse part stay within 2% (5%) of
    the fp32 model's loss."""
    from scaletrain.data import c4_source, eval_windows
    from scaletrain.finetune import load_model, resolve_model
    from scaletrain.models.llama import causal_lm_loss
    from scaletrain.zo import ZOModel, compute_mask

    source = resolve_model(str(pretrained))
    model, tok, _, _ = load_model(source)
    val = eval_windows(c4_source("local", None, split="validation"), tok, 64, 16, micro_batch=8)
    calib = eval_windows(c4_source("local", None), tok, 64, 4, micro_batch=1)

    def loss(m):
        with torch.no_grad():
            return float(np.mean([causal_lm_loss(m, w).item() for w in val]))

    ref = loss(model)
    mask = compute_mask(model, ("self_attn", "mlp"), calib, causal_lm_loss, 0.001)
    for fmt, tol in (("nf4", 0.02), ("int4", 0.05)):
        m, _, _, _ = load_model(source)
        zm = ZOModel(m, mask, ("self_attn", "mlp"), fmt, 64)
        got = loss(m)
        assert abs(got - ref) <= tol * ref, (fmt, got, ref)
        assert zm.weight_bytes()["frozen"] == sum(
            (-(-int(np.prod(s)) // 64)) * (32 + 4) for s in mask.shapes.values())  # 0.5625 B a value


def test_transformers_directory_loads_like_the_checkpoint(pretrained, tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    from export_hf import export

    from scaletrain.finetune import load_model, resolve_model

    export(pretrained, tmp_path / "hf")
    a, tok_a, _, _ = load_model(resolve_model(str(pretrained)))
    b, tok_b, _, _ = load_model(resolve_model(str(tmp_path / "hf")))
    text = "it 's a charming and often affecting journey . It was"
    assert tok_a.encode(text) == tok_b.encode(text)
    ids = torch.tensor([[tok_a.eos_id] + tok_a.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits)


def _config_error(capsys, argv) -> str:
    from scaletrain.finetune import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_bad_inputs_exit_2_naming_the_field(pretrained, tmp_path, capsys):
    hf = tmp_path / "no_weights"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    proc = run_finetune(["--model.path", str(hf)], check=False)  # main as the script runs it: exit code 2
    assert proc.returncode == 2 and "model.path" in proc.stderr and "without weights" in proc.stderr

    ckpt_dir = tmp_path / "broken"
    shutil.copytree(sorted((pretrained / "checkpoints").glob("step_*"))[-1], ckpt_dir)
    shutil.rmtree(ckpt_dir / "dcp")
    err = _config_error(capsys, ["--model.path", str(ckpt_dir)])
    assert "model.path" in err and "dcp/" in err
    assert "model.path" in _config_error(capsys, [])

    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"review {i}", "stars": i % 2}) for i in range(4)))
    err = _config_error(capsys, ["--model.path", str(pretrained), "--data.train_path", str(data),
                                 "--data.val_path", str(data)])
    assert "data.text_field" in err and "'sentence'" in err
    err = _config_error(capsys, ["--model.path", str(pretrained), "--data.train_path", str(data),
                                 "--data.val_path", str(data), "--data.text_field", "text"])
    assert "data.label_field" in err and "stars" in err
    for bad in ("0", "1.5", "-0.1"):
        err = _config_error(capsys, ["--model.path", str(pretrained), "--zo.density", bad])
        assert "zo.density" in err and "(0, 1]" in err
