"""tools/quality_run.py end to end on a tiny corpus: the outputs and their keys, the LR chosen from
the grid, and reruns that reuse complete runs and restart interrupted ones."""
import gzip
import json
import math
import subprocess
import sys

import pytest

from scaletrain.data import DEFAULT_TRAIN_PATH
from tests.launching import REPO

pytestmark = pytest.mark.slow  # four tiny trainings: ~50 s on a shared core
STEPS = 6


def tiny_corpus(path):
    """40 real C4 documents as a .jsonl.gz file, the training text's format."""
    with gzip.open(DEFAULT_TRAIN_PATH, "rt") as src:
        lines = [next(src) for _ in range(40)]
    with gzip.open(path, "wt") as dst:
        dst.writelines(lines)
    return path


def quality_run(tmp_path, *extra):
    cmd = [sys.executable, "tools/quality_run.py", "--preset", "llama_9m", "--modes", "adamw,galore_torch",
           "--seeds", "0", "--steps", str(STEPS), "--eval_every", "3", "--eval_windows", "4", "--seq_len", "32",
           "--data", str(tmp_path / "wiki.jsonl.gz"), "--out", str(tmp_path / "out"),
           "--lr-grid", "adamw=1e-3,3e-3", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_protocol_outputs_then_incremental_rerun(tmp_path):
    tiny_corpus(tmp_path / "wiki.jsonl.gz")
    first = quality_run(tmp_path, "--jobs", "3")  # the three runs at once, as on a GPU
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    out = tmp_path / "out"
    names = ["adamw_lr0.001_s0", "adamw_lr0.003_s0", "galore_torch_lr0.01_s0"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == names
    for f in ("results.json", "results.md", "loss.png", "pareto.png"):
        assert (out / f).stat().st_size > 0, f

    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["warmup_steps"] == 0  # 5% of 6 steps
    assert results["protocol"]["data"] == str(tmp_path / "wiki.jsonl.gz")
    runs = {r["name"]: r for r in results["runs"]}
    assert set(runs) == set(names)
    for r in runs.values():
        assert [e["step"] for e in r["evals"]] == [3, STEPS]
        assert r["step_time_s"] > r["data_wait_s"] > 0  # the step time includes loading its batch
        assert r["wire_bytes_per_step"] is None  # one rank: nothing sent
    assert 8.0 <= runs["adamw_lr0.001_s0"]["state_bytes_per_param"] < 8.01  # two fp32 moments
    assert runs["galore_torch_lr0.01_s0"]["state_bytes_per_param"] < 8.0  # projected moments

    modes = results["modes"]
    adamw, galore = modes["adamw"], modes["galore_torch"]
    by_lr = {r["lr"]: r["eval_loss"] for r in runs.values() if r["mode"] == "adamw"}
    assert adamw["lr"] == min(by_lr, key=by_lr.get)  # the grid's best
    assert adamw["gap_nats"] == 0.0 and adamw["step_time_vs_adamw"] == 1.0
    assert galore["lr"] == 0.01  # its MODES default: no grid given
    assert math.isclose(galore["gap_nats"], galore["eval_loss"] - adamw["eval_loss"])
    assert galore["gap_nats_per_seed"]["0"] == pytest.approx(galore["gap_nats"])
    assert math.isclose(galore["ppl"], math.exp(galore["eval_loss"]))
    assert galore["curve"]["tokens"] == [e["tokens"] for e in runs["galore_torch_lr0.01_s0"]["evals"]]
    table = (out / "results.md").read_text()
    assert "| galore_torch | 0.01 (of 0.01) |" in table and "n/a (1 rank)" in table

    # a complete run is reused untouched; an interrupted one (no final eval) is trained again
    kept = out / "adamw_lr0.001_s0" / "metrics.jsonl"
    kept_mtime = kept.stat().st_mtime_ns
    cut = out / "galore_torch_lr0.01_s0" / "metrics.jsonl"
    cut.write_text(cut.read_text().splitlines()[0] + '\n{"step": 6, "eval_l')  # killed mid-write
    second = quality_run(tmp_path)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert second.stdout.count("complete, reused") == 2
    assert "galore_torch_lr0.01_s0: incomplete" in second.stdout
    assert kept.stat().st_mtime_ns == kept_mtime
    assert json.loads((out / "results.json").read_text())["modes"]["adamw"] == adamw

    # the same options under a changed default are another run (a rerun refuses it, naming this)
    from tools.quality_run import changed_settings

    run_dir = out / "adamw_lr0.001_s0"
    options = json.loads((run_dir / "quality_run.json").read_text())["options"]
    assert changed_settings(run_dir, options) == []
    record = run_dir / "config.yaml"
    record.write_text(record.read_text().replace("beta2: 0.999", "beta2: 0.99"))
    assert changed_settings(run_dir, options) == ["optim.beta2: 0.99 then, 0.999 now"]
    report = quality_run(tmp_path, "--report-only")  # trains nothing, so it tabulates, saying so
    assert report.returncode == 0, report.stderr[-3000:]
    assert "adamw_lr0.001_s0: trained under other defaults: optim.beta2: 0.99 then" in report.stdout
    # a setting added after the run: at its default it is what the run did; set otherwise it is not
    record.write_text(record.read_text().replace("beta2: 0.99", "beta2: 0.999").replace("  eps:", "  #eps:"))
    assert changed_settings(run_dir, options) == []
    assert changed_settings(run_dir, options + ["--optim.eps", "1e-6"]) == ["optim.eps: None then, 1e-06 now"]


def test_changed_options_and_unknown_keys_are_refused_before_training(tmp_path):
    tiny_corpus(tmp_path / "wiki.jsonl.gz")
    bad = quality_run(tmp_path, "--extra", "--optim.no_such_key", "1")
    assert bad.returncode != 0 and "no_such_key" in bad.stderr
    assert not (tmp_path / "out" / "adamw_lr0.001_s0").exists()  # nothing started
    run_dir = tmp_path / "out" / "adamw_lr0.001_s0"
    run_dir.mkdir(parents=True)
    (run_dir / "quality_run.json").write_text(json.dumps({"options": ["--train.steps", "99"]}))
    other = quality_run(tmp_path)
    assert other.returncode != 0 and "trained with other options" in other.stderr
