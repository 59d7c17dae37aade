"""The quality protocol's results (tools/quality_run.py trains the runs): per-run figures from each
run's metrics.jsonl, per-mode figures at the best LR (mean over seeds, gap to AdamW), the markdown
table and the two plots (held-out loss vs tokens, final loss vs optimizer-state bytes)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean

REFERENCE = "adamw"


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl; a last line cut short by a kill is not a row."""
    path = run_dir / "metrics.jsonl"
    whole_lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in whole_lines]


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


def summarize_run(run, run_dir: Path) -> dict:
    """One run's figures; `run`: quality_run.Run (mode, lr, seed, name)."""
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
