"""Quality protocol: pretrain one preset with several optimizer modes, each on a small LR grid and
several seeds, and compare held-out loss, optimizer-state bytes, step time and wire bytes.

    python tools/quality_run.py --preset llama_20m --steps 600 --seeds 0,1 \\
        --modes adamw,galore_torch,galore,blockllm,block,block_sign,block_frozen \\
        --lr-grid adamw=1e-3,3e-3 block_sign=1e-3,3e-3 --out runs/quality_20m_600

Every run is a normal `launch/pretrain.py` run with the same trainer, data order (the corpus in
file order, never repeated within ~50M tokens), schedule (warm-up 5% of the steps, then cosine to
train.min_lr_ratio, GaLore's recipe), batch (the deepspeed_config's) and held-out set (the shipped
C4 validation sample); a seed sets the model's initialisation. Only the optimizer options of the
mode (tools/modes.py, with this protocol's additions in MODES) and the peak LR differ. The
training text defaults to the English Wikipedia text in ../shared/data/wiki/ (read by path;
CC BY-SA 3.0, see README).

Outputs under --out: one run directory per (mode, LR, seed), `<mode>_lr<lr>_s<seed>`, reused when
complete and trained with the same options (a rerun adds only what is missing; a killed protocol
resumes, restarting the runs it interrupted), `results.json` (every figure), `results.md` (per
mode: the LR with the best mean held-out loss over seeds, its loss per seed, the gap to AdamW's best
in nats, state bytes per parameter, step time including data relative to AdamW, wire bytes),
`loss.png` (held-out loss vs tokens, best LR per mode, mean over seeds) and `pareto.png` (final
held-out loss vs optimizer-state bytes per parameter).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scaletrain.config import ConfigError, load_config  # noqa: E402
from tools.modes import MODES as TRAINER_MODES  # noqa: E402

PRETRAIN = REPO / "launch" / "pretrain.py"
DEFAULT_DATA = "../shared/data/wiki/enwiki2015-train-50m.jsonl.gz"  # relative to the repo root
WARMUP_FRACTION = 0.05  # GaLore's recipe: linear warm-up over 5% of the steps, then cosine
MARKER = "quality_run.json"  # in each run directory: the options it was trained with
REFERENCE = "adamw"


@dataclass(frozen=True)
class Mode:
    options: tuple[str, ...]  # launch/pretrain.py options of this mode (the optimizer's)
    lr: float  # peak LR when --lr-grid gives this mode no grid
    about: str


BLOCKLLM_CONFIG = "configs/blockllm_paper.yaml"


def blockllm_options() -> tuple[str, ...]:
    """BlockLLM's published defaults: the config file once it exists, else the same by keys."""
    if (REPO / BLOCKLLM_CONFIG).is_file():
        return ("--config", str(REPO / BLOCKLLM_CONFIG))
    return ("--optim.name", "block", "--optim.always_train", "[]", "--optim.inactive", "none")


# The modes this protocol runs: their options are tools.modes' (the one table), plus what is this
# protocol's own: the peak LR without a grid, a description, GaLore's recipe at this size, and for
# blockllm the whole paper config (density, patience, ...), not only tools.modes' block rule.
GALORE_RECIPE = ("--optim.rank", "64", "--optim.proj_scale", "0.25")  # GaLore's at this size
MODES: dict[str, Mode] = {
    "adamw": Mode(TRAINER_MODES["adamw"], 1e-3, "AdamW (torch), the reference"),
    "galore_torch": Mode(TRAINER_MODES["galore_torch"] + GALORE_RECIPE, 1e-2,
                         "galore-torch's GaLoreAdamW, rank 64, scale 0.25"),
    "galore": Mode(TRAINER_MODES["galore"] + GALORE_RECIPE, 1e-2, "our dense GaLore, rank 64, scale 0.25"),
    "blockllm": Mode(blockllm_options(), 1e-3, "BlockLLM's published defaults"),
    "block": Mode(TRAINER_MODES["block"], 1e-3,
                  "the default: embedding/head/norms always Adam; Adam on 5% of the body, reselected "
                  "every 50 steps; signSGD on the rest"),
    "block_8bit": Mode(TRAINER_MODES["block_8bit"], 1e-3, "the default with 8-bit moments"),
    "block_frozen": Mode(TRAINER_MODES["block_frozen"], 1e-3, "the default with the rest frozen (no sign step)"),
    "block_noalways": Mode(TRAINER_MODES["block_noalways"], 1e-3,
                           "the default with embedding/head/norms competing for selection"),
}


@dataclass(frozen=True)
class Run:
    mode: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.mode}_lr{self.lr:g}_s{self.seed}"


# --------------------------------------------------------------------------- plan

def parse_lr_grid(items: list[str], modes: list[str]) -> dict[str, list[float]]:
    """['adamw=1e-3,3e-3', ...] -> {'adamw': [1e-3, 3e-3]}; every mode without a grid gets its
    MODES lr."""
    grid = {m: [MODES[m].lr] for m in modes}
    for item in items:
        mode, sep, values = item.partition("=")
        if not sep or mode not in modes:
            raise ValueError(f"--lr-grid {item!r}: expected MODE=LR[,LR...] with MODE one of --modes {modes}")
        try:
            grid[mode] = [float(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--lr-grid {item!r}: learning rates must be numbers") from None
        if not grid[mode] or min(grid[mode]) <= 0:
            raise ValueError(f"--lr-grid {item!r}: learning rates must be positive")
    return grid


def plan(modes: list[str], grid: dict[str, list[float]], seeds: list[int]) -> list[Run]:
    return [Run(m, lr, s) for m in modes for lr in grid[m] for s in seeds]


def warmup_steps(steps: int) -> int:
    return round(WARMUP_FRACTION * steps)


def trainer_options(run: Run, args) -> list[str]:
    """Everything but the run directory: shared settings, then the mode's, then --extra."""
    shared = ["--model.preset", args.preset, "--seed", str(run.seed), "--data.path", str(args.data),
              "--data.seq_len", str(args.seq_len), "--train.steps", str(args.steps),
              "--train.warmup_steps", str(warmup_steps(args.steps)),
              "--train.eval_every", str(args.eval_every), "--train.eval_windows", str(args.eval_windows),
              "--train.log_every", str(args.eval_every), "--checkpoint.every_steps", "-1",
              "--optim.lr", repr(run.lr)]
    return shared + list(MODES[run.mode].options) + list(args.extra)


def launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(PRETRAIN)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(PRETRAIN)]


def check_options(runs: list[Run], args) -> None:
    """Every run's options are a valid trainer config, checked before anything trains (a mode
    naming a key this tree lacks fails now, not hours into the protocol)."""
    for run in runs:
        try:
            load_config(trainer_options(run, args))
        except ConfigError as e:
            raise SystemExit(f"mode {run.mode!r}: {e}") from None


# --------------------------------------------------------------------------- train

def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl; a last line cut short by a kill is not a row."""
    path = run_dir / "metrics.jsonl"
    whole_lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in whole_lines]


def is_complete(run_dir: Path, steps: int) -> bool:
    return any(r["step"] == steps and "eval_loss" in r for r in read_metrics(run_dir))


def train(run: Run, args) -> Path:
    """The run's directory, trained now unless a complete run with the same options is there."""
    run_dir = args.out / run.name
    options = trainer_options(run, args)
    marker = run_dir / MARKER
    if run_dir.exists():
        if not marker.exists():
            raise SystemExit(f"{run_dir} exists but was not written by this tool: use another --out")
        saved = json.loads(marker.read_text())["options"]
        if saved != options:
            raise SystemExit(f"{run_dir} was trained with other options:\n  {saved}\nnow:\n  {options}\n"
                             f"use another --out (or delete that directory)")
        if is_complete(run_dir, args.steps):
            print(f"{run.name}: complete, reused", flush=True)
            return run_dir
        print(f"{run.name}: incomplete (interrupted?), restarting it", flush=True)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    marker.write_text(json.dumps({"options": options}, indent=1))
    cmd = launcher(args.nproc) + ["--run_dir", str(run_dir)] + options
    print(f"{run.name}: training\n  {' '.join(cmd)}", flush=True)
    with open(run_dir / "stdout.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not is_complete(run_dir, args.steps):
        tail = (run_dir / "stdout.log").read_text()[-3000:]
        raise SystemExit(f"{run.name} failed (exit {proc.returncode}); {run_dir / 'stdout.log'} ends:\n{tail}")
    return run_dir


# --------------------------------------------------------------------------- per-run figures

def interval_mean(rows: list[dict], key: str) -> float | None:
    """Per-step mean of a per-interval mean logged every log_every steps (intervals weighted by
    their steps); None if the trainer did not log `key`."""
    logged = [r for r in rows if key in r]
    if not logged:
        return None
    total, steps, previous = 0.0, 0, 0
    for r in logged:
        total += r[key] * (r["step"] - previous)
        steps += r["step"] - previous
        previous = r["step"]
    return total / steps


def summarize_run(run: Run, run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    last = [r for r in rows if "n_params" in r][-1]
    evals = [{"step": r["step"], "tokens": r["tokens"], "eval_loss": r["eval_loss"]}
             for r in rows if "eval_loss" in r]
    wire = [r["wire_bytes"] for r in rows if "wire_bytes" in r]
    return {
        "name": run.name, "mode": run.mode, "lr": run.lr, "seed": run.seed, "run_dir": str(run_dir),
        "eval_loss": evals[-1]["eval_loss"], "evals": evals, "tokens": last["tokens"],
        "n_params": last["n_params"],
        "state_bytes_per_param": last["optim_state_bytes_total"] / last["n_params"],
        "state_bytes_per_param_rank_max": last["optim_state_bytes"] / last["n_params"],
        "step_time_s": interval_mean(rows, "step_time_s"),  # includes waiting for the batch
        "data_wait_s": interval_mean(rows, "data_wait_s"),
        "wire_bytes_per_step": mean(wire) if wire else None,
    }


# --------------------------------------------------------------------------- per-mode figures

def mean_or_none(values):
    return None if any(v is None for v in values) else mean(values)


def best_lr(records: list[dict]) -> float:
    by_lr: dict[float, list[float]] = {}
    for r in records:
        by_lr.setdefault(r["lr"], []).append(r["eval_loss"])
    return min(by_lr, key=lambda lr: mean(by_lr[lr]))


def mean_curve(records: list[dict]) -> dict:
    """Held-out loss at each evaluation, mean over the seeds (all evaluate at the same steps)."""
    points = list(zip(*[r["evals"] for r in records]))
    return {"tokens": [p[0]["tokens"] for p in points],
            "eval_loss": [mean(e["eval_loss"] for e in p) for p in points]}


def summarize_mode(records: list[dict]) -> dict:
    lr = best_lr(records)
    best = sorted((r for r in records if r["lr"] == lr), key=lambda r: r["seed"])
    loss = mean(r["eval_loss"] for r in best)
    return {
        "lr": lr,
        "lr_grid": {f"{x:g}": mean(r["eval_loss"] for r in records if r["lr"] == x)
                    for x in sorted({r["lr"] for r in records})},
        "eval_loss": loss, "ppl": math.exp(loss),
        "eval_loss_per_seed": {str(r["seed"]): r["eval_loss"] for r in best},
        "state_bytes_per_param": mean(r["state_bytes_per_param"] for r in best),
        "step_time_s": mean_or_none([r["step_time_s"] for r in best]),
        "wire_bytes_per_step": mean_or_none([r["wire_bytes_per_step"] for r in best]),
        "curve": mean_curve(best),
    }


def compare_with_reference(modes: dict[str, dict]) -> None:
    """Adds the gap to AdamW's best LR (nats, mean and per seed) and step time relative to it."""
    ref = modes.get(REFERENCE)
    for m in modes.values():
        if ref is None:
            m.update(gap_nats=None, gap_nats_per_seed=None, step_time_vs_adamw=None)
            continue
        m["gap_nats"] = m["eval_loss"] - ref["eval_loss"]
        m["gap_nats_per_seed"] = {s: loss - ref["eval_loss_per_seed"][s]
                                  for s, loss in m["eval_loss_per_seed"].items()}
        times = (m["step_time_s"], ref["step_time_s"])
        m["step_time_vs_adamw"] = None if None in times else times[0] / times[1]


# --------------------------------------------------------------------------- report

def fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def results_table(protocol: dict, modes: dict[str, dict]) -> str:
    p = protocol
    wire_none = "n/a (1 rank)" if p["nproc"] == 1 else "not counted"
    lines = [
        f"{p['preset']}, {p['steps']} steps x {p['tokens_per_step']:,} tokens = {p['tokens']:,} tokens "
        f"({p['nproc']} rank(s)), seeds {p['seeds']}, warm-up {p['warmup_steps']} steps then cosine; "
        f"training text {Path(p['data']).name}; held-out: {p['eval_windows']} windows of the C4 validation sample.",
        "Gaps are in nats against AdamW at its best LR (same seed for per-seed gaps); the LR shown is the "
        "best mean over seeds of the grid (all tried: results.json). State bytes are measured at the end, "
        "summed over ranks (state replicated at ZeRO stage 0 counts once per rank); step time includes "
        "loading the batch.",
        "",
        "| mode | LR | held-out loss (mean) | per seed | vs AdamW, nats | per seed | ppl | state B/param "
        "| step time incl. data | vs AdamW | wire B/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in modes.items():
        seeds = ", ".join(f"{v:.4f}" for v in m["eval_loss_per_seed"].values())
        gaps = ", ".join(f"{v:+.3f}" for v in (m["gap_nats_per_seed"] or {}).values()) or "-"
        lines.append(
            f"| {name} | {m['lr']:g} (of {', '.join(m['lr_grid'])}) | {m['eval_loss']:.4f} | {seeds} | "
            f"{fmt(m['gap_nats'], '+.3f')} | {gaps} | {m['ppl']:.1f} | {m['state_bytes_per_param']:.3f} | "
            f"{fmt(milliseconds(m['step_time_s']), '.1f')} ms | "
            f"{fmt(m['step_time_vs_adamw'], '.3f')}x | {fmt(m['wire_bytes_per_step'], ',.0f', wire_none)} |")
    if p["nproc"] > 1:
        lines += ["", f"Dense modes' all-reduce is the engine's, not counted above: a DDP all-reduce of "
                      f"every gradient is {p['ddp_allreduce_bytes']:,.0f} B per rank per step."]
    return "\n".join(lines)


def plot_title(protocol: dict) -> str:
    return f"{protocol['preset']}, {protocol['tokens']:,} tokens, seeds {protocol['seeds']}"


def plot_loss(modes: dict[str, dict], title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.set_title(title, fontsize=10)
    for name, m in modes.items():
        ax.plot(m["curve"]["tokens"], m["curve"]["eval_loss"], marker="o", ms=3, label=f"{name} (lr {m['lr']:g})")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (mean over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pareto(modes: dict[str, dict], title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set_title(title, fontsize=10)
    for name, m in modes.items():
        x = max(m["state_bytes_per_param"], 1e-3)  # a log axis has no 0
        ax.scatter(x, m["eval_loss"])
        ax.annotate(name, (x, m["eval_loss"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("optimizer state, bytes / parameter (measured)")
    ax.set_ylabel("final held-out loss (mean over seeds)")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def protocol_record(args, runs: list[dict], grid: dict[str, list[float]]) -> dict:
    n_params = runs[0]["n_params"]
    return {
        "preset": args.preset, "steps": args.steps, "seeds": args.seeds, "nproc": args.nproc,
        "data": str(args.data), "val_path": "default (shipped C4 validation sample)",
        "seq_len": args.seq_len, "eval_every": args.eval_every, "eval_windows": args.eval_windows,
        "warmup_steps": warmup_steps(args.steps), "tokens": runs[0]["tokens"],
        "tokens_per_step": runs[0]["tokens"] // args.steps, "lr_grid": grid, "extra": args.extra,
        "modes": {m: {"options": list(MODES[m].options), "about": MODES[m].about} for m in grid},
        "ddp_allreduce_bytes": 2 * (args.nproc - 1) / args.nproc * 4 * n_params,
    }


# --------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama_20m")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {list(MODES)}")
    p.add_argument("--steps", type=int, default=600, help="the horizon (tokens: steps x batch x seq_len)")
    p.add_argument("--seeds", default="0,1", help="comma-separated model-initialisation seeds")
    p.add_argument("--lr-grid", nargs="*", default=[], metavar="MODE=LR,LR",
                   help="peak LRs to try per mode; a mode without a grid uses its MODES lr")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="training text (JSON lines with 'text', .json/.jsonl[.gz]); a relative path "
                        "is looked up from the working directory, then from the repo root")
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--eval_windows", type=int, default=256)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--nproc", type=int, default=1,
                   help="ranks per run (torchrun): multiplies the batch; the deepspeed_config's ZeRO "
                        "stage (default 0: state replicated) applies to every mode")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once (several small runs can share one GPU; on a CPU they "
                        "share its cores, and their step times are then not comparable)")
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    p.add_argument("--report-only", "--report_only", dest="report_only", action="store_true",
                   help="train nothing: tabulate and plot the complete runs of the plan found under --out")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further launch/pretrain.py options for every run (put last)")
    args = p.parse_args(argv)
    args.modes = args.modes.split(",")
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.grid = parse_lr_grid(args.lr_grid, args.modes)
    except ValueError as e:
        p.error(str(e))
    if args.steps <= 0 or args.eval_every <= 0 or args.nproc <= 0 or args.jobs <= 0:
        p.error("--steps, --eval_every, --nproc and --jobs must be positive")
    data = Path(args.data)
    args.data = (data if data.is_absolute() or data.exists() else REPO / data).resolve()
    if not args.data.exists():
        p.error(f"--data {data}: no such file or directory ({args.data})")
    args.out = args.out.resolve()
    return args


def main(argv=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    planned = plan(args.modes, args.grid, args.seeds)
    check_options(planned, args)
    if args.report_only:  # (a protocol still under way, or one cut short: say what is missing)
        missing = [run.name for run in planned if not is_complete(args.out / run.name, args.steps)]
        if missing:
            print(f"--report-only: not complete, left out: {', '.join(missing)}", flush=True)
        planned = [run for run in planned if run.name not in missing]
    if args.jobs > 1:  # runs too small to fill a GPU share it; each run is still one process
        with ThreadPoolExecutor(args.jobs) as pool:
            run_dirs = list(pool.map(lambda run: train(run, args), planned))
    else:
        run_dirs = [train(run, args) for run in planned]
    runs = [summarize_run(run, run_dir) for run, run_dir in zip(planned, run_dirs)]
    modes = {m: summarize_mode([r for r in runs if r["mode"] == m]) for m in args.modes
             if any(r["mode"] == m for r in runs)}
    compare_with_reference(modes)
    protocol = protocol_record(args, runs, args.grid)
    (args.out / "results.json").write_text(json.dumps({"protocol": protocol, "modes": modes, "runs": runs},
                                                      indent=1))
    text = results_table(protocol, modes)
    (args.out / "results.md").write_text(text + "\n")
    plot_loss(modes, plot_title(protocol), args.out / "loss.png")
    plot_pareto(modes, plot_title(protocol), args.out / "pareto.png")
    print(text)


if __name__ == "__main__":
    main()
