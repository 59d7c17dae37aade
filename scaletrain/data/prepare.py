"""Tokenize C4 once into the prepared format that `prepared.py` memory-maps.

    scaletrain-prepare-data '/data/c4/en/c4-train.*.json.gz' --out /data/c4-llama32k --tokenizer llama32k
    scaletrain-prepare-data --hub allenai/c4 --hub_config en --out /data/c4-llama32k --tokenizer llama32k

One output shard per source shard (a JSON-lines file, or one data file of a Hub dataset), written in
source order. Documents are tokenized in parallel by `--workers` processes, in fixed batches of
lines whose results are written back in order, so the output is byte-identical for any number of
workers. A shard's files are written under temporary names, renamed, and then committed by its
`NNNNN.json` marker; a killed preparation restarts at the first uncommitted shard. `--node_rank i
--num_nodes n` takes shards i, i + n, ...: one command per node into a shared directory; whichever
run finds every shard committed writes `manifest.json`, which is what the trainer reads.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import logging
import os
import socket
import sys
import threading
import time
import zlib
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .c4 import CorruptShardError, DataPathError, document_text, parse_line_or_reason, resolve_shards
from .prepared import (EOS_POLICY, FORMAT_VERSION, MANIFEST, PreparedCorpus, PreparedDataError,
                       file_sha256, token_dtype)
from .tokenizer import load_tokenizer, tokenizer_fingerprint

log = logging.getLogger("scaletrain.prepare")
SETTINGS = "prepare.json"
LINES_PER_BATCH = 256  # fixed, never derived from --workers: the output must not depend on it
BATCHES_AHEAD_PER_WORKER = 4  # bounds memory: at most this many batches queued per worker
SKIPPED_REPORTED_PER_SHARD = 10


# --------------------------------------------------------------------------- sources

class _HashingReader(io.RawIOBase):
    """A raw file that hashes and counts the bytes read through it (one pass: read and checksum)."""

    def __init__(self, raw):
        self.raw, self.sha256, self.bytes_read = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self.sha256.update(memoryview(buffer)[:n])
        self.bytes_read += n
        return n


class ShardInput:
    """One source shard: (line, raw bytes or text) items, progress units read, its manifest record."""

    def __init__(self, items: Iterator[tuple[int, Any]], progress: Callable[[], int],
                 record: Callable[[], dict], name: str):
        self.items, self.progress, self.record, self.name = items, progress, record, name


class FileShards:
    """JSON-lines shards (a file, a directory or a glob), each checksummed as it is read."""

    unit = "B"

    def __init__(self, path: str | Path):
        self.paths = resolve_shards(path, field="input")

    def __len__(self) -> int:
        return len(self.paths)

    def listing(self) -> list[dict]:
        # Absolute: the same files named from another working directory are the same source.
        return [{"path": str(p.resolve()), "size": p.stat().st_size} for p in self.paths]

    def size(self, index: int) -> int:
        return self.paths[index].stat().st_size

    def open(self, index: int) -> ShardInput:
        path = self.paths[index]
        state: dict = {}

        def lines() -> Iterator[tuple[int, bytes]]:
            try:
                with open(path, "rb", buffering=0) as raw:
                    hashing = state["reader"] = _HashingReader(raw)
                    buffered = io.BufferedReader(hashing, 1 << 20)
                    text = gzip.GzipFile(fileobj=buffered) if path.name.endswith(".gz") else buffered
                    yield from enumerate(text)
                    while buffered.read(1 << 20):  # the checksum covers the whole file
                        pass
            except (OSError, EOFError, zlib.error) as e:
                raise CorruptShardError(f"cannot read C4 shard {str(path)!r}: {e}") from e

        def progress() -> int:
            return state["reader"].bytes_read if "reader" in state else 0

        def record() -> dict:
            reader = state["reader"]
            return {"path": str(path.resolve()), "size": reader.bytes_read,
                    "sha256": reader.sha256.hexdigest()}

        return ShardInput(lines(), progress, record, str(path))


class HubShards:
    """A `datasets` dataset streamed by its data files: shard i is the dataset's i-th file."""

    unit = "doc"

    def __init__(self, name: str, config: str | None, split: str = "train",
                 load_dataset: Callable[..., Any] | None = None, **load_kwargs: Any):
        if load_dataset is None:
            from datasets import load_dataset  # slow import, only needed here
        self.desc = {"hub": name, "config": config, "split": split}
        self.dataset = load_dataset(name, config, split=split, streaming=True, **load_kwargs)
        self.n_shards = self.dataset.n_shards

    def __len__(self) -> int:
        return self.n_shards

    def listing(self) -> list[dict]:
        return [{**self.desc, "shard": i, "of": self.n_shards} for i in range(self.n_shards)]

    def size(self, index: int) -> int | None:
        return None  # unknown before streaming

    def open(self, index: int) -> ShardInput:
        counted = [0]

        def items() -> Iterator[tuple[int, str | None]]:
            for line, example in enumerate(self.dataset.shard(num_shards=self.n_shards, index=index)):
                counted[0] = line + 1
                yield line, document_text(example)

        return ShardInput(items(), lambda: counted[0], lambda: self.listing()[index],
                          f"{self.desc['hub']} shard {index}")


# --------------------------------------------------------------------------- tokenizing (workers)

_worker_tokenizer = None


def _init_worker(tokenizer_spec: str, parent_pid: int | None = None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_spec)
    if parent_pid is not None:
        threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    """A pool worker waits for work forever; when its parent is killed (SIGKILL, OOM) it must go."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def tokenize_batch(batch: list[tuple[int, Any]], dtype: str):
    """(tokens, document lengths, [(line, why skipped)]) of a batch; each document ends with EOS."""
    tok = _worker_tokenizer
    tokens: list[int] = []
    lengths: list[int] = []
    skipped: list[tuple[int, str]] = []
    for line, item in batch:
        if isinstance(item, bytes):
            text, why = parse_line_or_reason(item)
        else:
            text, why = item, None if item else "no non-empty 'text' string"
        if text is None:
            skipped.append((line, why))
            continue
        ids = tok.encode(text)
        ids.append(tok.eos_id)
        tokens += ids
        lengths.append(len(ids))
    return np.array(tokens, dtype=dtype), np.array(lengths, dtype=np.int64), skipped


def _batches(items: Iterable[tuple[int, Any]]) -> Iterator[list[tuple[int, Any]]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == LINES_PER_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _ordered_map(fn, batches: Iterable, executor: Executor | None, ahead: int) -> Iterator:
    """fn over batches in order; with an executor, at most `ahead` batches in flight."""
    if executor is None:
        yield from map(fn, batches)
        return
    pending: deque = deque()
    for batch in batches:
        pending.append(executor.submit(fn, batch))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# --------------------------------------------------------------------------- writing

def _write_json_atomic(path: Path, obj: dict) -> None:
    # A name of its own per writer: nodes may write the same settings or manifest at once.
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _fsynced(path: Path, write: Callable[[Any], None]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class ShardResult:
    entry: dict
    seconds: float


def _prepare_shard(out: Path, index: int, shard: ShardInput, tokenize, bar) -> ShardResult:
    """Tokenize one source shard into NNNNN.bin / NNNNN.idx.npy, then commit NNNNN.json."""
    t0 = time.perf_counter()
    stem = f"{index:05d}"
    tokens_tmp, index_tmp = out / f"{stem}.bin.tmp", out / f"{stem}.idx.npy.tmp"
    tokens_sha, lengths, skipped, seen = hashlib.sha256(), [], 0, 0

    def write_tokens(f) -> None:
        nonlocal skipped, seen
        for tokens, doc_lengths, bad in tokenize(_batches(shard.items)):
            f.write(memoryview(tokens))
            tokens_sha.update(memoryview(tokens))
            lengths.append(doc_lengths)
            for line, why in bad:
                if skipped < SKIPPED_REPORTED_PER_SHARD:
                    log.warning("%s: line %d skipped: %s", shard.name, line + 1, why)
                skipped += 1
            now = shard.progress()
            bar.update(now - seen)
            seen = now

    _fsynced(tokens_tmp, write_tokens)
    ends = np.cumsum(np.concatenate(lengths) if lengths else np.zeros(0, np.int64), dtype=np.int64)
    _fsynced(index_tmp, lambda f: np.save(f, ends))
    if skipped > SKIPPED_REPORTED_PER_SHARD:
        log.warning("%s: %d unusable lines skipped in all", shard.name, skipped)
    entry = {
        "index": index,
        "source": shard.record(),
        "tokens_file": f"{stem}.bin",
        "index_file": f"{stem}.idx.npy",
        "n_tokens": int(ends[-1]) if len(ends) else 0,
        "n_docs": len(ends),
        "skipped_lines": skipped,
        "tokens_sha256": tokens_sha.hexdigest(),
        "index_sha256": file_sha256(index_tmp),
    }
    os.replace(tokens_tmp, out / entry["tokens_file"])
    os.replace(index_tmp, out / entry["index_file"])
    _write_json_atomic(out / f"{stem}.json", entry)  # the commit: written last
    return ShardResult(entry, time.perf_counter() - t0)


def _settings(source, tokenizer_spec: str, tok) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"spec": tokenizer_spec, "fingerprint": tokenizer_fingerprint(tok),
                      "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
        "dtype": token_dtype(tok.vocab_size).name,
        "eos_policy": EOS_POLICY,
        "source": source.listing(),
    }


def _check_settings(out: Path, settings: dict) -> None:
    """The directory holds this preparation's shards or none: never a mix of two."""
    path = out / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        differ = [k for k in settings if old.get(k) != settings[k]]
        if differ:
            raise PreparedDataError(
                f"{out} was prepared with other settings (differing: {', '.join(differ)}): "
                f"use another --out directory, or delete {out} to start over")
    else:
        _write_json_atomic(path, settings)


def _committed(out: Path, index: int, listed: dict) -> dict | None:
    """The shard's commit record if it is complete and from the same source file, else None."""
    marker = out / f"{index:05d}.json"
    if not marker.is_file():
        return None
    entry = json.loads(marker.read_text())
    same_source = all(entry["source"].get(k) == v for k, v in listed.items())
    tokens = out / entry["tokens_file"]
    whole = tokens.is_file() and (out / entry["index_file"]).is_file()
    return entry if same_source and whole else None


def _write_manifest(out: Path, settings: dict, entries: list[dict]) -> None:
    manifest = {**settings, "shards": entries,
                "n_tokens": sum(e["n_tokens"] for e in entries),
                "n_docs": sum(e["n_docs"] for e in entries),
                "skipped_lines": sum(e["skipped_lines"] for e in entries)}
    _write_json_atomic(out / MANIFEST, manifest)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class PrepareReport:
    prepared: list[ShardResult]  # shards tokenized by this run
    already_committed: int
    left_to_other_nodes: int
    manifest_written: bool

    @property
    def tokens(self) -> int:
        return sum(r.entry["n_tokens"] for r in self.prepared)


def prepare(source, out: str | Path, tokenizer_spec: str = "default", workers: int | None = None,
            node_rank: int = 0, num_nodes: int = 1, progress: bool = True) -> PrepareReport:
    """Tokenize this node's uncommitted shards of `source` into `out`; write the manifest when all
    shards are committed. `source`: FileShards or HubShards."""
    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"--node_rank {node_rank} is outside --num_nodes {num_nodes}")
    from tqdm.auto import tqdm

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer_spec)
    settings = _settings(source, tokenizer_spec, tok)
    _check_settings(out, settings)
    listing = settings["source"]
    mine = range(node_rank, len(listing), num_nodes)
    todo = [i for i in mine if _committed(out, i, listing[i]) is None]
    workers = workers or default_workers()
    dtype = settings["dtype"]
    sizes = [source.size(i) for i in todo]
    results = []
    with (tqdm(total=None if None in sizes else sum(sizes), unit=source.unit, unit_scale=True,
              desc=f"prepare {len(todo)} shards", disable=not progress or not todo) as bar,
          _tokenizing(tokenizer_spec, workers if todo else 1, dtype) as tokenize):
        for i in todo:
            results.append(_prepare_shard(out, i, source.open(i), tokenize, bar))
    entries = [_committed(out, i, listing[i]) for i in range(len(listing))]
    done = all(e is not None for e in entries)
    if done:
        _write_manifest(out, settings, entries)
    return PrepareReport(results, len(mine) - len(todo), sum(e is None for e in entries), done)


class _tokenizing:
    """A context giving `tokenize(batches) -> ordered results`, in-process for one worker."""

    def __init__(self, tokenizer_spec: str, workers: int, dtype: str):
        self.spec, self.workers, self.dtype = tokenizer_spec, workers, dtype
        self.executor: ProcessPoolExecutor | None = None

    def __enter__(self):
        if self.workers == 1:
            _init_worker(self.spec)
        else:
            self.executor = ProcessPoolExecutor(self.workers, initializer=_init_worker,
                                                initargs=(self.spec, os.getpid()))
        ahead = self.workers * BATCHES_AHEAD_PER_WORKER
        fn = _BatchTokenizer(self.dtype)
        return lambda batches: _ordered_map(fn, batches, self.executor, ahead)

    def __exit__(self, *exc) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)


class _BatchTokenizer:
    """Picklable `tokenize_batch` with the dtype bound (a lambda cannot go to a worker process)."""

    def __init__(self, dtype: str):
        self.dtype = dtype

    def __call__(self, batch):
        return tokenize_batch(batch, self.dtype)


# --------------------------------------------------------------------------- command line

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
