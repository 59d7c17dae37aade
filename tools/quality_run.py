"""Quality protocol: pretrain one preset with several optimizer modes, each on a small LR grid and
several seeds, and compare held-out loss, optimizer-state bytes, step time and wire bytes.

    python tools/quality_run.py --preset llama_20m --steps 600 --seeds 0,1 \\
        --modes adamw,galore_torch,galore,blockllm,block,block_8bit,block_frozen \\
        --lr-grid adamw=1e-3,3e-3 block=1e-3,3e-3 --out runs/quality_20m_600

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
held-out loss vs optimizer-state bytes per parameter). This module plans and trains the runs; the
figures, table and plots are tools/quality_report.py's.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from scaletrain.config import ConfigError, load_config, to_dict  # noqa: E402
from tools.modes import MODES as TRAINER_MODES  # noqa: E402
from tools.quality_report import (compare_with_reference, plot_loss, plot_pareto, plot_title,  # noqa: E402
                                  read_metrics, results_table, summarize_mode, summarize_run)

PRETRAIN = REPO / "launch" / "pretrain.py"
DEFAULT_DATA = "../shared/data/wiki/enwiki2015-train-50m.jsonl.gz"  # relative to the repo root
WARMUP_FRACTION = 0.05  # GaLore's recipe: linear warm-up over 5% of the steps, then cosine
MARKER = "quality_run.json"  # in each run directory: the options it was trained with


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
                  "every 50 steps; signSGD on the rest; 8-bit moments"),
    "block_8bit": Mode(TRAINER_MODES["block_8bit"], 1e-3, "the default, 8-bit moments named (earlier results)"),
    "block_fp32": Mode(TRAINER_MODES["block_fp32"], 1e-3, "the default with fp32 moments (the default before)"),
    "block_frozen": Mode(TRAINER_MODES["block_frozen"], 1e-3, "the default with the rest frozen (no sign step)"),
    "block_sample": Mode(TRAINER_MODES["block_sample"], 1e-3,
                         "the default with blocks drawn by importance sampling (MISA) instead of greedily"),
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

def is_complete(run_dir: Path, steps: int) -> bool:
    return any(r["step"] == steps and "eval_loss" in r for r in read_metrics(run_dir))


def changed_settings(run_dir: Path, options: list[str]) -> list[str]:
    """The settings these options give now that differ from the run's own record of the config it
    trained with (its config.yaml): a default changed since, so the same options no longer mean
    the same run. Empty where they agree or the run wrote no record (interrupted first). A setting
    added since the run (absent from its record) and left at its default is not a change: a new
    setting's default keeps what runs did before it existed."""
    record = run_dir / "config.yaml"
    if not record.exists():
        return []
    then = yaml.safe_load(record.read_text())
    now, defaults = to_dict(load_config(options)), to_dict(load_config([]))
    diffs = []
    for section, values in now.items():
        if section in ("run_dir", "resume"):
            continue  # where the run lives, not what it trains
        old = then.get(section)
        pairs = values.items() if isinstance(values, dict) else [(None, values)]
        for key, value in pairs:
            was = old.get(key) if isinstance(old, dict) else old
            recorded = key in old if key is not None and isinstance(old, dict) else section in then
            if not recorded and value == (defaults[section][key] if key is not None else defaults[section]):
                continue
            if was != value:
                diffs.append(f"{section}{'.' + key if key else ''}: {was!r} then, {value!r} now")
    return diffs


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
        changed = changed_settings(run_dir, options)
        if changed and args.report_only:  # nothing is trained: tabulate it, saying how it differs
            print(f"{run.name}: trained under other defaults: {'; '.join(changed)}", flush=True)
        elif changed:
            raise SystemExit(f"{run_dir} was trained with the same options but other settings (a default "
                             f"changed since): {'; '.join(changed)}\nuse another --out (or delete that directory)")
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


# --------------------------------------------------------------------------- the protocol, for results.json

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
