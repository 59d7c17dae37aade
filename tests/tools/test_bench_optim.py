"""tools/bench_optim.py end to end on a tiny preset: the JSON contract and the state figures."""
import json
import subprocess
import sys

import pytest

from tests.launching import REPO


@pytest.mark.slow  # four modes, each on fresh ranks: ~25 s
def test_bench_optim_json_and_state_figures(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "tools/bench_optim.py", "--preset", "llama_9m", "--tokenizer", "default",
         "--modes", "adamw,galore_torch,galore,block", "--steps", "3", "--warmup", "1",
         "--seq_len", "32", "--rank", "32", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modes = json.loads(out.read_text())["modes"]
    for r in modes.values():
        for key in ("state_bytes_per_param", "state_bytes_per_rank_max", "step_time_ratio",
                    "wire_bytes_ratio", "peak_mem_bytes", "final_loss"):
            assert key in r, key
    # exp_avg + exp_avg_sq (8 B/param) and torch's one 4-byte step counter per tensor
    assert 8.0 < modes["adamw"]["state_bytes_per_param"] < 8.001
    # our dense GaLore keeps exactly the bytes galore-torch keeps (moments + basis), and lower than AdamW
    assert modes["galore"]["state_bytes_per_param"] == modes["galore_torch"]["state_bytes_per_param"] < 8.0
    # the default block mode: 8-bit Adam state for the always-trained embedding and head (most of
    # llama_9m) and 5% of the rest, about 2 bytes a parameter (exact figures: tests/test_memory_estimate.py)
    assert 1.0 < modes["block"]["state_bytes_per_param"] < 2.4
    assert "galore_torch" in proc.stdout  # the printed table
