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

This module is the pipeline (tokenizing workers, shard writing and commit, settings, manifest);
the sources it reads are prepare_sources.py's, the command line prepare_cli.py's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .c4 import parse_line_or_reason
from .prepare_sources import FileShards, HubShards, ShardInput  # noqa: F401 (importers: FileShards, HubShards)
from .prepared import EOS_POLICY, FORMAT_VERSION, MANIFEST, PreparedDataError, file_sha256, token_dtype
from .tokenizer import load_tokenizer, tokenizer_fingerprint

log = logging.getLogger("scaletrain.prepare")
SETTINGS = "prepare.json"
LINES_PER_BATCH = 256  # fixed, never derived from --workers: the output must not depend on it
BATCHES_AHEAD_PER_WORKER = 4  # bounds memory: at most this many batches queued per worker
SKIPPED_REPORTED_PER_SHARD = 10


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


def main(argv: list[str] | None = None) -> int:
    """The command line, prepare_cli.py's (kept here for importers and `python -m`)."""
    from .prepare_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
