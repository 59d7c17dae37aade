"""tools/bench_quant8.py on CPU: every CPU kernel timed, the figures written."""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_quant8_times_each_cpu_kernel(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import bench_quant8

    out = bench_quant8.main(["--numel", "65536", "--device", "cpu", "--repeat", "2", "--json", str(tmp_path / "q.json")])
    assert set(out["seconds"]) == {"nearest code: bucketize", "nearest code: table lookup", "torch: quantize", "torch: dequantize"}
    assert all(s > 0 for s in out["seconds"].values())
    assert json.loads((tmp_path / "q.json").read_text())["numel"] == 65536
    assert "bench_quant8" in sys.modules
