"""Quality run: train one preset with several optimizer modes on the same data, compare held-out loss.

    python tools/quality_run.py --preset llama_9m --modes adamw,block --steps 1000 --out runs/quality

Each mode is a normal `launch/pretrain.py` run (same seed, data, schedule and batch), so what is
compared is exactly what a user gets. Writes `<out>/<mode>/` run directories, `<out>/loss.png`
(held-out loss vs tokens), `<out>/memory.png` (optimizer-state bytes per mode) and
`<out>/results.md` (a markdown table), and prints the table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Optimizer settings per mode; everything else is shared. lr: GaLore/BlockLLM C4 values are
# 1e-3 (AdamW, BlockLLM); override with --extra.
MODES: dict[str, list[str]] = {
    "adamw": ["--optim.name", "adamw"],
    "block": ["--optim.name", "block"],  # embedding and head frozen, as BlockLLM
    "block_embed": ["--optim.name", "block", "--optim.frozen_patterns", "[]"],  # they compete too
    # reselect every 50 steps (BlockLLM checks its patience rule only every 1000)
    "block_resel50": ["--optim.name", "block", "--optim.reselect_every", "50"],
    "block_embed_resel50": ["--optim.name", "block", "--optim.frozen_patterns", "[]",
                            "--optim.reselect_every", "50"],
    # low-rank modes; rank 32 at llama_9m's width 128 is GaLore's rank/width of 128/512 at llama_60m
    "galore": ["--optim.name", "galore", "--optim.rank", "32"],
    "block_embed_resel50_galore_8bit": ["--optim.name", "block", "--optim.frozen_patterns", "[]",
                                        "--optim.reselect_every", "50", "--optim.projection", "galore",
                                        "--optim.rank", "32", "--optim.eight_bit", "true"],
}


def train(mode: str, args, out: Path) -> list[dict]:
    run_dir = out / mode
    if (run_dir / "metrics.jsonl").exists():
        print(f"{mode}: reusing {run_dir}")
    else:
        cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--run_dir", str(run_dir),
               "--model.preset", args.preset, "--train.steps", str(args.steps),
               "--train.eval_every", str(args.eval_every), "--train.eval_windows", str(args.eval_windows),
               "--train.log_every", str(args.eval_every), "--checkpoint.every_steps", "0",
               "--optim.lr", str(args.lr), "--data.seq_len", str(args.seq_len)] + MODES[mode] + args.extra
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def plot(results: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, rows in results.items():
        evals = [r for r in rows if "eval_loss" in r]
        ax.plot([r["tokens"] for r in evals], [r["eval_loss"] for r in evals], marker="o", label=mode)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    fig, ax = plt.subplots(figsize=(5, 3))
    modes = list(results)
    ax.bar(modes, [results[m][-1]["optim_state_bytes"] / results[m][-1]["n_params"] for m in modes])
    ax.set_ylabel("optimizer state, bytes / parameter")
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)


def table(results: dict[str, list[dict]], args) -> str:
    base = results.get("adamw")
    lines = [f"{args.preset}, {args.steps} steps, seq_len {args.seq_len}, lr {args.lr}",
             "", "| mode | held-out loss | ppl | vs adamw | state B/param | tokens/s |",
             "|---|---|---|---|---|---|"]
    for mode, rows in results.items():
        last = rows[-1]
        ratio = f"{last['eval_loss'] / base[-1]['eval_loss']:.3f}" if base else "-"
        lines.append(f"| {mode} | {last['eval_loss']:.4f} | {last['eval_ppl']:.1f} | {ratio} | "
                     f"{last['optim_state_bytes'] / last['n_params']:.3f} | {last['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama_9m")
    p.add_argument("--modes", default="adamw,block")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--eval_windows", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further launch/pretrain.py options for every mode (put last)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {sorted(MODES)}")
    results = {m: train(m, args, args.out) for m in modes}
    plot(results, args.out)
    text = table(results, args)
    (args.out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
