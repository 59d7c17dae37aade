#!/usr/bin/env bash
# The GPU check (tools/gpu_check.py): speed, memory, 7B fit, resume and the CUDA tests on one GPU.
#   bash tools/gpu_check.sh [--device cpu] [--out DIR] [--budget_s S]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" tools/gpu_check.py "$@"
