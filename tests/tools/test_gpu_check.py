"""tools/gpu_check.sh's CPU dry run: the resume part trains, saves half-way, resumes and finds
the losses bit-identical; the CUDA tests part runs pytest -m cuda (all skipped here, each with its
reason); both land in gpu_check.json and gpu_check.md."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cpu_dry_run_of_resume_and_tests_parts(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after the test (the tool sets it)
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import gpu_check

    out = tmp_path / "check"
    gpu_check.main(["--device", "cpu", "--parts", "resume,tests", "--out", str(out), "--budget_s", "2000"])
    result = json.loads((out / "gpu_check.json").read_text())
    resume = result["parts"]["resume"]
    assert resume["steps_compared"] == 6 and resume["bit_identical"], resume  # steps 7..12
    tests = result["parts"]["tests"]
    assert tests["exit_code"] == 0 and "skipped" in tests["summary"] and "passed" not in tests["summary"]
    assert "needs CUDA" in (out / "tests" / "pytest_cuda.log").read_text()
    report = (out / "gpu_check.md").read_text()
    assert "CPU (dry run" in report and '"bit_identical": true' in report
    assert result["device"]["gpu"] is None and result["device"]["python"] == ".".join(map(str, sys.version_info[:3]))
