"""Run `launch/pretrain.py` as a user would: under deepspeed, torchrun or plain python."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

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
    """launcher "python" with the single-process backend runs `launch/pretrain.py`'s main in this
    process (see run_in_process); every other launch is a real process tree."""
    if launcher == "python" and backend_arg(args) in ("auto", "single"):
        from scaletrain.trainer import main

        proc = run_in_process(main, args)
    else:
        proc = subprocess.run(launch_cmd(launcher, nproc) + args, cwd=REPO, env=launch_env(), text=True,
                              capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def backend_arg(args: list[str]) -> str:
    return args[args.index("--backend") + 1] if "--backend" in args else "auto"


def run_in_process(main, args: list[str]) -> subprocess.CompletedProcess:
    """`main(args)` in this process, as `python launch/<script>.py args` would run it (one intra-op
    thread, as launch_env gives a launched process), with its stdout, stderr and exit status.

    A single-process run needs no process of its own; its start (importing torch, transformers and
    DCP) costs ~4 s a run here. What a run changes in the process is put back afterwards: the
    environment, the thread count, the global RNGs, and the logging handlers."""
    env, threads = dict(os.environ), torch.get_num_threads()
    rngs = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out, err = io.StringIO(), io.StringIO()
    os.environ.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            err.write(str(e.code))
    finally:
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers[:], root.level = handlers, level
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rngs[0])
        random.setstate(rngs[1])
        np.random.set_state(rngs[2])
    return subprocess.CompletedProcess(["main", *args], code, out.getvalue(), err.getvalue())


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
