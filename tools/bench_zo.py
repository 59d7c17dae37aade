"""Fine-tuning memory and accuracy per mode: full fp32 AdamW, MeZO (dense zeroth-order, fp32) and
SensZOQ (zeroth-order on the 0.1% most sensitive coordinates, the rest of those matrices in 4 bits).

    python tools/bench_zo.py --preset llama_60m --acc_model runs/tiny --forward_passes 1000 --json runs/bench_zo.json

Memory (`--preset`, random weights: bytes do not depend on values): each mode runs `--mem_steps`
steps on SST-2 micro-batches in a fresh process. Reported: exact bytes of the tensors the mode holds
while tuning (weights incl. 4-bit codes, scales and the sparse part; gradients; optimizer state),
the largest transient (MeZO/SensZOQ: one direction z of the largest tensor; SensZOQ also one
dequantized matrix), and the process RSS: its maximum while tuning (sampled every 2 ms) and its
lifetime peak (includes loading the fp32 model and, for SensZOQ, the Fisher calibration). Then
the same byte formulas at llama_7b (the paper: SensZOQ fine-tunes Llama2-7B in < 8 GiB).

Accuracy (`--acc_model`, a scaletrain checkpoint or transformers directory): each mode spends the
same `--forward_passes` (AdamW: one forward + backward per step; zeroth-order: two forwards per
step) on the shipped SST-2 subset and is evaluated on the 872 GLUE validation sentences.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("adamw", "mezo", "senszoq")
LABEL = {"adamw": "AdamW, full fp32", "mezo": "MeZO, dense ZO fp32", "senszoq": "SensZOQ, 0.1% ZO + NF4"}
PATTERNS = ("self_attn", "mlp")
GiB = 2 ** 30


class RSSPeak:
    """Largest resident set size seen while active (sampled from /proc/self/statm)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.002)

    def __enter__(self):
        self.peak = self.now()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.now())


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------- shared setup

def _task(tokenizer, n_train=None):
    from scaletrain.data.tasks import Task, load_rows

    task = Task(tokenizer, "classification", "{text} It was", ["terrible", "great"], 128)
    train = task.encode(load_rows("files", "sst2", "train", "data.train_path")[:n_train], "sentence", "label")
    val = task.encode(load_rows("files", "sst2", "validation", "data.val_path"), "sentence", "label")
    return task, train, val


def _zo_cfg(args, density: float, quant: str, lr: float):
    from scaletrain.finetune_config import load_finetune_config

    return load_finetune_config([
        "--model.path", "unused", "--optim.name", "zo", "--optim.lr", str(lr), "--zo.density", str(density),
        "--zo.quant", quant, "--zo.patterns", "[" + ",".join(f"'{p}'" for p in
                                                            (("",) if density == 1 else PATTERNS)) + "]",
        "--zo.calib_sequences", str(args.calib_sequences), "--zo.calib_seq_len", str(args.calib_seq_len),
        "--seed", str(args.seed)])


def _prepare(mode: str, model, tokenizer, args, lr: float):
    """(step function, objects holding the state) for a mode, on a loaded fp32 model."""
    from scaletrain.config import OptimConfig
    from scaletrain.distributed.runtime import DistContext
    from scaletrain.finetune import build_zo, task_loss, zo_step
    from scaletrain.optim import build_optimizer

    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    if mode == "adamw":
        opt, _ = build_optimizer(OptimConfig(name="adamw", lr=lr), model, 0.0)

        def step(task, batches, i):
            for b in batches:
                task_loss(model, b, task)[0].backward()
            opt.step()
            opt.zero_grad(set_to_none=False)  # keep the gradient buffers: they are part of the footprint
        return step, {"optimizer": opt, "zm": None}
    cfg = _zo_cfg(args, 1.0 if mode == "mezo" else args.density, "none" if mode == "mezo" else args.quant, lr)
    zm, spsa = build_zo(cfg, model, tokenizer, ctx)
    gc.collect()

    def step(task, batches, i):
        zo_step(spsa, model, task, batches, i)
    return step, {"optimizer": None, "zm": zm, "spsa": spsa}


# --------------------------------------------------------------------------- workers

def worker_memory(args) -> dict:
    import resource

    from scaletrain.data import load_tokenizer
    from scaletrain.data.tasks import ExampleLoader, make_batch
    from scaletrain.models.llama import build_model

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.tokenizer)
    model = build_model(args.preset, tok.vocab_size, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    task, train, _ = _task(tok, 256)
    step, held = _prepare(args.mode, model, tok, args, 1e-4)
    loader = ExampleLoader(len(train), args.micro, 1, seed=args.seed)
    zm, opt = held["zm"], held["optimizer"]
    with RSSPeak() as rss:
        t0 = time.perf_counter()
        for i in range(args.mem_steps):
            step(task, [make_batch(task, [train[j] for j in idx]) for idx in loader.next_step()], i)
        dt = (time.perf_counter() - t0) / args.mem_steps
    out = {"mode": args.mode, "preset": args.preset, "n_params": n_params, "step_time_s": dt,
           "rss_tuning_peak_bytes": rss.peak,
           "rss_lifetime_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if args.mode == "adamw":
        out.update(weight_bytes=_bytes(model.parameters()),
                   grad_bytes=_bytes(p.grad for p in model.parameters() if p.grad is not None),
                   optim_state_bytes=sum(_bytes(t for t in s.values() if torch.is_tensor(t)) for s in opt.state.values()),
                   transient_bytes=0, trainable_params=n_params)
    else:
        wb = zm.weight_bytes()
        largest = max(t.numel() * t.element_size() for t in zm.tensors)  # one z at a time
        if zm.layers:  # one dequantized matrix at a time
            largest += max(math.prod(layer.shape) * 4 for layer in zm.layers.values())
        out.update(weight_bytes=wb["total"], weight_frozen_bytes=wb["frozen"], weight_sparse_bytes=wb["sparse"],
                   weight_other_bytes=wb["other"], grad_bytes=0, optim_state_bytes=0, transient_bytes=largest,
                   trainable_params=zm.trainable)
        if zm.mask is not None:
            out["fisher_share"] = zm.mask.meta["fisher_share"]
    out["total_bytes"] = out["weight_bytes"] + out["grad_bytes"] + out["optim_state_bytes"]
    return out


def worker_accuracy(args) -> dict:
    from scaletrain.data.tasks import ExampleLoader, make_batch
    from scaletrain.distributed.runtime import DistContext
    from scaletrain.finetune import evaluate, load_model, resolve_model

    torch.set_num_threads(args.threads)
    model, tok, _, preset = load_model(resolve_model(args.acc_model))
    task, train, val = _task(tok)
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    lr = {"adamw": args.lr_adamw, "mezo": args.lr_mezo, "senszoq": args.lr_zo}[args.mode]
    before = evaluate(model, task, val, ctx, 64)
    step, _ = _prepare(args.mode, model, tok, args, lr)
    per_step = 1 if args.mode == "adamw" else 2  # forward passes per micro-batch and step
    steps = args.forward_passes // per_step
    loader = ExampleLoader(len(train), args.micro, 1, seed=args.seed)
    t0 = time.perf_counter()
    for i in range(steps):
        step(task, [make_batch(task, [train[j] for j in idx]) for idx in loader.next_step()], i)
    tune_s = time.perf_counter() - t0
    after = evaluate(model, task, val, ctx, 64)
    return {"mode": args.mode, "acc_model": args.acc_model, "preset": preset, "lr": lr, "steps": steps,
            "forward_passes": steps * per_step, "tune_s": tune_s, "accuracy_before": before["eval_accuracy"],
            "accuracy_after": after["eval_accuracy"], "loss_before": before["eval_loss"],
            "loss_after": after["eval_loss"]}


# --------------------------------------------------------------------------- llama_7b estimate

def estimate(preset: str, vocab: int, density: float, block: int, other_bytes: int = 2) -> dict:
    """Bytes per mode from the shapes alone (the same formulas the measured rows follow)."""
    from scaletrain.models.llama import PRESETS

    s = PRESETS[preset]
    h, m, layers = s.hidden_size, s.intermediate_size, s.num_hidden_layers
    linear = layers * (4 * h * h + 3 * h * m)
    total = linear + 2 * vocab * h + (2 * layers + 1) * h
    other = total - linear
    k = round(density * linear)
    codes = layers * (4 * (-(-h * h // block)) + 3 * (-(-h * m // block))) * (block // 2 + 4)
    return {
        "n_params": total, "linear_params": linear,
        "adamw": {"weight_bytes": 4 * total, "grad_bytes": 4 * total, "optim_state_bytes": 8 * total},
        "mezo": {"weight_bytes": 4 * total, "grad_bytes": 0, "optim_state_bytes": 0},
        "mezo_fp16": {"weight_bytes": 2 * total, "grad_bytes": 0, "optim_state_bytes": 0},
        "senszoq": {"weight_bytes": codes + 12 * k + other_bytes * other, "grad_bytes": 0, "optim_state_bytes": 0,
                    "frozen": codes, "sparse": 12 * k, "other": other_bytes * other},
    }


# --------------------------------------------------------------------------- driver

def _run_worker(kind: str, mode: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--_worker", kind, "--mode", mode] + argv,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_zo: {kind} worker for {mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama_60m")
    p.add_argument("--tokenizer", default="llama32k", help="llama32k gives the papers' parameter counts")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--mem_steps", type=int, default=3)
    p.add_argument("--micro", type=int, default=16, help="examples per step (MeZO: 16)")
    p.add_argument("--density", type=float, default=0.001)
    p.add_argument("--quant", default="nf4", choices=["nf4", "int4"])
    p.add_argument("--calib_sequences", type=int, default=16)
    p.add_argument("--calib_seq_len", type=int, default=256)
    p.add_argument("--acc_model", default="", help="checkpoint/transformers dir for the accuracy runs ('' skips)")
    p.add_argument("--forward_passes", type=int, default=1000)
    p.add_argument("--lr_adamw", type=float, default=1e-4)
    p.add_argument("--lr_mezo", type=float, default=1e-6)
    p.add_argument("--lr_zo", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="")
    p.add_argument("--mode", default="", help=argparse.SUPPRESS)
    p.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        fn = worker_memory if args._worker == "memory" else worker_accuracy
        print(json.dumps(fn(args)))
        return
    raw = sys.argv[1:] if argv is None else list(argv)
    modes = [m for m in args.modes.split(",") if m]
    memory = [_run_worker("memory", m, raw) for m in modes]
    n = memory[0]["n_params"]
    print(f"\nmemory while fine-tuning, {args.preset} ({n / 1e6:.1f} M parameters, {args.tokenizer}), "
          f"{args.micro} examples/step, measured (CPU, fp32 compute):\n")
    print("| mode | trained params | weights (MiB) | grads (MiB) | optimizer state (MiB) | weights + grads + state "
          "(MiB) | bytes/param | largest transient (MiB) | RSS while tuning (MiB) | RSS lifetime peak (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in memory:
        print(f"| {LABEL[r['mode']]} | {r['trainable_params']:,} | {r['weight_bytes'] / 2**20:.1f} | "
              f"{r['grad_bytes'] / 2**20:.1f} | {r['optim_state_bytes'] / 2**20:.1f} | {r['total_bytes'] / 2**20:.1f} | "
              f"{r['total_bytes'] / n:.3f} | {r['transient_bytes'] / 2**20:.1f} | "
              f"{r['rss_tuning_peak_bytes'] / 2**20:.0f} | {r['rss_lifetime_peak_bytes'] / 2**20:.0f} |")
    from scaletrain.data import load_tokenizer

    check = estimate(args.preset, load_tokenizer(args.tokenizer).vocab_size, args.density, 64, other_bytes=4)
    for r in memory:  # the formulas reproduce the measured bytes
        if r["mode"] in check:
            r["estimate_total_bytes"] = sum(check[r["mode"]][k] for k in ("weight_bytes", "grad_bytes", "optim_state_bytes"))
    est = estimate("llama_7b", 32000, args.density, 64, other_bytes=2)
    print(f"\nllama_7b estimate ({est['n_params'] / 1e9:.2f} B parameters; SensZOQ: NF4 block 64 with fp32 "
          f"scales, fp32 sparse values + int64 indices, embedding/head/norms in bf16):\n")
    print("| mode | weights (GiB) | grads (GiB) | optimizer state (GiB) | total (GiB) |")
    print("|---|---|---|---|---|")
    for key, label in (("adamw", LABEL["adamw"]), ("mezo", LABEL["mezo"]), ("mezo_fp16", "MeZO, dense ZO fp16"),
                       ("senszoq", LABEL["senszoq"])):
        e = est[key]
        total = e["weight_bytes"] + e["grad_bytes"] + e["optim_state_bytes"]
        e["total_bytes"] = total
        print(f"| {label} | {e['weight_bytes'] / GiB:.2f} | {e['grad_bytes'] / GiB:.2f} | "
              f"{e['optim_state_bytes'] / GiB:.2f} | {total / GiB:.2f} |")
    accuracy = []
    if args.acc_model:
        accuracy = [_run_worker("accuracy", m, raw) for m in modes]
        print(f"\nSST-2 validation accuracy (872 sentences) after {args.forward_passes} forward passes of "
              f"{args.micro} examples, model {args.acc_model}:\n")
        print("| mode | lr | steps | accuracy before | accuracy after | label-word loss before -> after | "
              "tuning time (s) |")
        print("|---|---|---|---|---|---|---|")
        for r in accuracy:
            print(f"| {LABEL[r['mode']]} | {r['lr']:g} | {r['steps']} | {r['accuracy_before']:.4f} | "
                  f"{r['accuracy_after']:.4f} | {r['loss_before']:.3f} -> {r['loss_after']:.3f} | {r['tune_s']:.0f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "memory": memory, "llama_7b_estimate": est,
                                               "accuracy": accuracy}, indent=2))


if __name__ == "__main__":
    main()
