"""python -m scaletrain.memory_estimate"""
from scaletrain.memory_estimate.cli import main

raise SystemExit(main())
