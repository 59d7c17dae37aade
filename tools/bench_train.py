"""End-to-end training throughput per optimizer mode: the real trainer, one mode after another.

    python tools/bench_train.py --preset llama_350m --deepspeed_config ds_configs/bench_bf16.json \\
        --modes adamw,block,block_galore_8bit,galore --steps 30 --launcher deepspeed --json out.json

Each mode is a `launch/pretrain.py` run (under `--launcher`: python, deepspeed or torchrun) on the
same data, model preset and ds_config. From its metrics.jsonl this reports tokens/s (median of
the log rows after the first, so start-up and the first selection pass are left out), MFU (on
GPUs of known peak: model FLOPs as in scaletrain.metrics.train_flops_per_token), peak memory
(max allocated on GPU, RSS on CPU), optimizer-state bytes per rank, and the last loss.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools.modes import MODES  # noqa: E402  (the one table of modes, shared with the other tools)

PRETRAIN = str(REPO / "launch" / "pretrain.py")


def launcher_cmd(launcher: str, nproc: int) -> list[str]:
    if launcher == "python":
        return [sys.executable, PRETRAIN]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), PRETRAIN]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), PRETRAIN]


def run_mode(mode: str, args, out_root: Path, timeout_s: float | None = None) -> dict:
    run_dir = out_root / mode
    cmd = launcher_cmd(args.launcher, args.nproc) + [
        "--run_dir", str(run_dir), "--model.preset", args.preset, "--deepspeed_config", args.deepspeed_config,
        "--data.tokenizer", args.tokenizer, "--data.seq_len", str(args.seq_len),
        "--train.steps", str(args.steps), "--train.log_every", str(args.log_every),
        "--train.warmup_steps", "0", "--train.eval_windows", "8", "--checkpoint.every_steps", "-1",
        "--model.activation_checkpointing", str(args.activation_checkpointing).lower(),
    ] + list(MODES[mode]) + args.extra
    try:
        proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "tokens_per_s" in r]
    steady = logged[1:] or logged
    last = logged[-1]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "step_time_s": statistics.median(r["step_time_s"] for r in steady),
        # the last selection pass's own time (block modes): compare with step_time_s
        "selection_time_s": last.get("selection_time_s"),
        "mfu": statistics.median(r["mfu"] for r in steady) if "mfu" in last else None,
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in logged),
        "optim_state_bytes_per_rank": last["optim_state_bytes"],
        "state_bytes_per_param": last["optim_state_bytes_total"] / last["n_params"],
        "n_params": last["n_params"],
        "final_loss": last["loss"],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama_60m")
    p.add_argument("--modes", default="adamw,block")
    p.add_argument("--deepspeed_config", default="ds_configs/default.json")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log_every", type=int, default=5)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--tokenizer", default="llama32k", help="llama32k gives the papers' param counts")
    p.add_argument("--activation_checkpointing", action="store_true")
    p.add_argument("--launcher", choices=("python", "deepspeed", "torchrun"), default="python")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--json", default=None)
    p.add_argument("extra", nargs="*", help="more trainer overrides, after --")
    args = p.parse_args(argv)
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; choose from {sorted(MODES)}")
    with tempfile.TemporaryDirectory() as tmp:
        out_root = Path(args.out or tmp)
        results = {m: run_mode(m, args, out_root) for m in args.modes.split(",")}
    print(f"{args.preset}, {args.deepspeed_config}, seq_len {args.seq_len}, {args.nproc} rank(s), "
          f"{args.launcher}, {args.steps} steps")
    print(f"{'mode':<20}{'tokens/s':>10}{'MFU':>7}{'peak GiB':>10}{'state B/param':>14}{'loss':>8}")
    for mode, r in results.items():
        if "error" in r:
            print(f"{mode:<20} failed: {r['error'][-300:]}")
            continue
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        print(f"{mode:<20}{r['tokens_per_s']:>10.0f}{mfu:>7}{r['peak_mem_bytes'] / 2**30:>10.2f}"
              f"{r['state_bytes_per_param']:>14.3f}{r['final_loss']:>8.3f}")
    out = {"args": vars(args), "modes": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
