"""Run `launch/pretrain.py` as a user would: under deepspeed, torchrun or plain python."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tools.local_ranks import free_port

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = str(REPO / "launch" / "pretrain.py")

# A run small enough for CI: llama_9m, 32-token sequences.
TINY = ["--data.seq_len", "32", "--train.eval_windows", "8", "--train.warmup_steps", "2",
        "--train.log_every", "1"]


def write_ds_config(path: Path, micro: int, accum: int, stage: int = 0, clip: float = 1.0,
                    bf16: bool | str = "auto") -> Path:
    path.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
        "gradient_clipping": clip, "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 1000000}))
    return path


def launch_cmd(launcher: str, nproc: int) -> list[str]:
    if launcher == "python":
        return [sys.executable, PRETRAIN]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                "--master_port", str(free_port()), PRETRAIN]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), PRETRAIN]
    raise ValueError(launcher)


def launch_env(**extra: str) -> dict[str, str]:
    """The environment of every launched run: one intra-op thread per process, as torchrun gives
    each rank, so a 1-rank reference runs the same kernels with the same rounding as the ranks
    (see conftest.one_thread); unbuffered output."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def run_pretrain(args: list[str], launcher: str = "python", nproc: int = 1,
                 timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    env = launch_env()
    proc = subprocess.run(launch_cmd(launcher, nproc) + args, cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir)]


def one_rank_reference(tmp: Path, steps: int, extra: list[str] = ()) -> Path:
    """The 1-rank run (micro 2 x accumulation 2) that 2 ranks x micro 2 must reproduce."""
    ds = write_ds_config(tmp / "ds_ref.json", micro=2, accum=2)
    run_dir = tmp / "reference"
    run_pretrain(["--run_dir", str(run_dir), "--deepspeed_config", str(ds), "--train.steps", str(steps)]
                 + TINY + list(extra))
    return run_dir


def run_two_nodes(args: list[str], tmp: Path, timeout: float = 300) -> list[str]:
    """Two 'nodes' on this machine (localhost and 127.0.0.1 in a hostfile), one deepspeed
    launcher per node, no ssh. Returns each node's output; raises if either fails."""
    hosts = tmp / "hostfile"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile",
                               str(hosts), "--no_ssh", "--node_rank", str(n), "--master_addr",
                               "127.0.0.1", "--master_port", port, PRETRAIN] + args,
                              cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    outputs = [p.communicate(timeout=timeout)[0] for p in nodes]
    if [p.returncode for p in nodes] != [0, 0]:
        raise AssertionError("two-node run failed:\n" + outputs[0][-3000:] + outputs[1][-3000:])
    return outputs
