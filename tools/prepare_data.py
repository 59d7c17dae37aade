"""Tokenize C4 once into memory-mapped token shards (the same as the `scaletrain-prepare-data` command).

    python tools/prepare_data.py 'data/c4/en/c4-train.*.json.gz' --out data/c4-llama32k --tokenizer llama32k
    python tools/prepare_data.py --help

The work is in scaletrain/data/prepare.py (command line: prepare_cli.py); the format and the reader
in scaletrain/data/prepared.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scaletrain.data.prepare_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
