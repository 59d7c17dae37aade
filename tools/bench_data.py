"""Data pipeline throughput: what a rank receives, what preparation costs, what training waits.

    python tools/bench_data.py                                  # all three parts
    python tools/bench_data.py --parts loader --world_sizes 1,8,64 --seconds 3
    python tools/bench_data.py --parts prepare --prep_input '/data/c4/c4-train.0000*-of-01024.json.gz'
    python tools/bench_data.py --parts prepare --prep_input wiki.jsonl.gz --prep_max_lines 2000
    python tools/bench_data.py --parts train --train_runs default,llama_60m --json out.json

loader: per-rank delivered tokens/s of the on-the-fly loader (`TrainWindowLoader`) and of the
prepared loader (`PreparedWindowLoader`, stream order and shuffled) at each world size W. Ranks
are simulated: one process is the last rank of W and asks for its own windows only, as each real
rank would. No prefetching: this is the loading work a rank does per step.

prepare: `prepare()` tokens/s with 1 and 2 workers on the same input (by default four copies of
the shipped sample, one shard each), and whether their outputs are byte-identical.

train: `launch/pretrain.py` runs, before (on-the-fly loader on the training thread) and after
(prepared data, background prefetch); reports the share of the step spent waiting for data
(metrics.jsonl `data_wait_s` / `step_time_s`, start-up rows left out).
"""
from __future__ import annotations

import argparse
import gzip
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scaletrain.data import (DEFAULT_TRAIN_PATH, LocalC4, PreparedCorpus,  # noqa: E402
                             PreparedWindowLoader, TrainWindowLoader, load_tokenizer,
                             tokenizer_fingerprint)
from scaletrain.data.prepare import FileShards, prepare  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = str(REPO / "launch" / "pretrain.py")
TRAIN_RUNS = {
    # name: (extra args, steps, log_every); the first log row (start-up) is left out
    "default": ([], 30, 5),
    "llama_60m": (["--config", "configs/llama_60m_adamw.yaml", "--train.warmup_steps", "2",
                   "--train.eval_every", "0"], 10, 2),
}


def delivered_tokens_per_s(loader, seq_len: int, min_seconds: float) -> float:
    """This rank's tokens per second over whole steps (at least 2, at least min_seconds)."""
    loader.next_step()  # warm-up: first file access, first epoch's pages
    steps, t0 = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - t0 < min_seconds:
        batches = loader.next_step()
        steps += 1
    elapsed = time.perf_counter() - t0
    return steps * sum(b.shape[0] for b in batches) * seq_len / elapsed


def bench_loader(args, tok, prepared_dir: Path) -> list[dict]:
    corpus = PreparedCorpus(prepared_dir, tokenizer_fingerprint(tok))
    rows = []
    for w in args.world_sizes:
        rank = w - 1
        make = {
            "on the fly": lambda: TrainWindowLoader(LocalC4(args.loader_input), tok, args.seq_len,
                                                    args.micro, 1, rank, w),
            "prepared": lambda: PreparedWindowLoader(corpus, args.seq_len, args.micro, 1, rank, w),
            "prepared, shuffled": lambda: PreparedWindowLoader(corpus, args.seq_len, args.micro, 1,
                                                               rank, w, shuffle=True),
        }
        for name, build in make.items():
            rate = delivered_tokens_per_s(build(), args.seq_len, args.seconds)
            rows.append({"world_size": w, "loader": name, "tokens_per_s_per_rank": rate})
            print(f"W={w:<3} {name:<20} {rate:>14,.0f} tokens/s per rank", flush=True)
    return rows


def first_lines(path: str, n: int, directory: Path) -> Path:
    """The first n lines of each shard at `path`, as .json.gz shards in `directory` (a quick subset)."""
    directory.mkdir()
    for shard in FileShards(path).paths:
        with gzip.open(shard) if shard.name.endswith(".gz") else open(shard, "rb") as f:
            lines = [line for _, line in zip(range(n), f)]
        with gzip.open(directory / (shard.name.split(".")[0] + ".json.gz"), "wb") as f:
            f.writelines(lines)
    return directory


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished (joined) worker processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_prepare(args, work: Path) -> list[dict]:
    if args.prep_input and args.prep_max_lines:
        source = FileShards(first_lines(args.prep_input, args.prep_max_lines, work / "prep_input"))
    elif args.prep_input:
        source = FileShards(args.prep_input)
    else:  # four shards of the shipped sample: enough for two workers to share
        copies = work / "prep_input"
        copies.mkdir()
        for i in range(4):
            shutil.copy(DEFAULT_TRAIN_PATH, copies / f"c4-sample-{i}.json.gz")
        source = FileShards(copies)
    rows, outputs = [], {}
    for workers in args.prep_workers:
        out = work / f"prepared_w{workers}"
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        report = prepare(source, out, args.tokenizer, workers=workers, progress=False)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        outputs[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        rows.append({"workers": workers, "tokens": report.tokens, "seconds": seconds,
                     "tokens_per_s": report.tokens / seconds,
                     "tokens_per_s_per_worker": report.tokens / seconds / workers,
                     "cpu_seconds": cpu, "tokens_per_cpu_s": report.tokens / cpu})
        print(f"prepare, {workers} worker(s): {report.tokens:,} tokens in {seconds:.2f} s = "
              f"{report.tokens / seconds:,.0f} tokens/s ({report.tokens / seconds / workers:,.0f} "
              f"per worker); {cpu:.2f} CPU-s = {report.tokens / cpu:,.0f} tokens per CPU-s",
              flush=True)
    identical = len({json.dumps(sorted((k, v.hex()) for k, v in o.items())) for o in outputs.values()}) == 1
    print(f"outputs byte-identical across worker counts: {identical}")
    for row in rows:
        row["identical_outputs"] = identical
    return rows


def train_run(run_dir: Path, extra: list[str], steps: int, log_every: int) -> dict:
    cmd = [sys.executable, PRETRAIN, "--run_dir", str(run_dir), "--train.steps", str(steps),
           "--train.log_every", str(log_every), "--train.eval_windows", "8",
           "--checkpoint.every_steps", "-1"] + extra
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_time_s" in r][1:]  # the first row holds start-up
    wait = statistics.mean(r["data_wait_s"] for r in rows)
    step = statistics.mean(r["step_time_s"] for r in rows)
    return {"data_wait_s": wait, "step_time_s": step, "data_wait_share": wait / step,
            "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in rows)}


def bench_train(args, work: Path) -> list[dict]:
    prepared = {}
    rows = []
    for name in args.train_runs:
        extra, steps, log_every = TRAIN_RUNS[name]
        tokenizer = "llama32k" if name == "llama_60m" else "default"
        if tokenizer not in prepared:
            prepared[tokenizer] = work / f"train_data_{tokenizer}"
            prepare(FileShards(DEFAULT_TRAIN_PATH), prepared[tokenizer], tokenizer, progress=False)
        variants = {
            "before: on the fly, no prefetch": ["--data.prefetch", "0"],
            "on the fly, prefetch 2": ["--data.prefetch", "2"],
            "after: prepared, prefetch 2": ["--data.path", str(prepared[tokenizer])],
        }
        for variant, args_ in variants.items():
            r = train_run(work / f"run_{name}_{len(rows)}", extra + args_, steps, log_every)
            rows.append({"run": name, "data": variant, **r})
            print(f"{name:<10} {variant:<34} data_wait {r['data_wait_s'] * 1e3:8.2f} ms of "
                  f"{r['step_time_s'] * 1e3:8.1f} ms step = {100 * r['data_wait_share']:5.2f}%  "
                  f"{r['tokens_per_s']:,.0f} tokens/s", flush=True)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--parts", default="loader,prepare,train")
    p.add_argument("--tokenizer", default="llama32k", help="for the loader and prepare parts")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--world_sizes", type=ints, default=[1, 8, 64])
    p.add_argument("--seconds", type=float, default=3.0, help="least time per loader measurement")
    p.add_argument("--loader_input", default=str(DEFAULT_TRAIN_PATH))
    p.add_argument("--prep_input", default=None, help="default: 4 copies of the shipped sample")
    p.add_argument("--prep_max_lines", type=int, default=None,
                   help="prepare only the first N lines of each --prep_input shard")
    p.add_argument("--prep_workers", type=ints, default=[1, 2])
    p.add_argument("--train_runs", type=lambda s: s.split(","), default=["default"])
    p.add_argument("--json", default=None, help="also write the figures here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    parts = args.parts.split(",")
    results: dict = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "loader" in parts:
            tok = load_tokenizer(args.tokenizer)
            loader_data = work / "loader_data"
            prepare(FileShards(args.loader_input), loader_data, args.tokenizer, progress=False)
            results["loader"] = bench_loader(args, tok, loader_data)
        if "prepare" in parts:
            results["prepare"] = bench_prepare(args, work)
        if "train" in parts:
            results["train"] = bench_train(args, work)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
