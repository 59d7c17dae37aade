"""`scaletrain-prepare-data` (and tools/prepare_data.py): the command line of `prepare.py`; the
usage is in that module's docstring. Errors in the input are one line on stderr and exit code 1."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from .c4 import CorruptShardError, DataPathError
from .prepare import prepare
from .prepare_sources import FileShards, HubShards
from .prepared import MANIFEST, PreparedCorpus


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scaletrain-prepare-data",
        description="Tokenize C4 JSON-lines shards (or a Hugging Face dataset) once into flat token "
                    "files + index + manifest that training memory-maps (--data.path OUT).")
    p.add_argument("input", nargs="?", help="a .json/.json.gz file, a directory of them, or a glob "
                   "(quote it); omit with --hub or --verify")
    p.add_argument("--out", help="output directory (created; rerun the same command to resume)")
    p.add_argument("--tokenizer", default="default", help="as data.tokenizer: default, llama32k, "
                   "a sentencepiece .model path or a transformers tokenizer name")
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: all cores)")
    p.add_argument("--node_rank", type=int, default=0, help="this node's index: it prepares shards "
                   "node_rank, node_rank + num_nodes, ...")
    p.add_argument("--num_nodes", type=int, default=1, help="nodes sharing the preparation")
    p.add_argument("--hub", help="a datasets name to stream instead of files (e.g. allenai/c4)")
    p.add_argument("--hub_config", default=None, help="its configuration (e.g. en)")
    p.add_argument("--split", default="train", help="its split")
    p.add_argument("--verify", metavar="DIR", help="check a prepared directory's sizes and checksums")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.verify is None and (args.out is None or (args.input is None) == (args.hub is None)):
        p.error("give --out and either an input path or --hub NAME (or --verify DIR)")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.verify:
            corpus = PreparedCorpus(args.verify, verify_checksums=True)
            print(f"{args.verify}: {len(corpus.shards)} shards, {corpus.n_tokens} tokens, "
                  f"sizes and checksums match the manifest")
            return 0
        source = (HubShards(args.hub, args.hub_config, args.split) if args.hub
                  else FileShards(args.input))
        t0 = time.perf_counter()
        report = prepare(source, args.out, args.tokenizer, args.workers, args.node_rank,
                         args.num_nodes, progress=not args.quiet)
    except (DataPathError, CorruptShardError, FileNotFoundError, ValueError) as e:
        print(f"scaletrain-prepare-data: error: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    print(f"{len(report.prepared)} shards tokenized ({report.tokens} tokens in {seconds:.1f} s), "
          f"{report.already_committed} already committed")
    if report.manifest_written:
        print(f"{args.out}/{MANIFEST} written: train with --data.path {args.out} "
              f"--data.tokenizer {args.tokenizer}")
    else:
        print(f"{report.left_to_other_nodes} shards are not committed yet (other nodes' share): "
              f"the run that completes the last one writes {MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
