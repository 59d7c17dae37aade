"""Per-rank memory estimate (weights, gradients, optimizer states, projections, activations).

    python tools/estimate_memory.py --preset llama_7b --world-size 8 --mode block --density 0.05
    python tools/estimate_memory.py --preset llama_60m --mode adamw --zero-stage 2 --world-size 8 --json

The same as the `scaletrain-estimate-memory` console command; the logic is the scaletrain/memory_estimate/ package.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scaletrain.memory_estimate import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
