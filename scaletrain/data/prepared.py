"""Pre-tokenized C4 read by memory map: each rank reads only its own windows, by global index.

A prepared directory (written by `tools/prepare_data.py`, see `prepare.py`) holds, per source
shard, a flat token file (`NNNNN.bin`: every document's tokens then EOS, uint16 or uint32), an
index (`NNNNN.idx.npy`: int64 end offset of each document) and, once all shards are committed,
`manifest.json` (format version, tokenizer fingerprint, dtype, EOS policy, every shard's source,
counts and checksums).

The shards, concatenated in order, are exactly the token stream the on-the-fly loader builds from
the same JSON shards, so window g (seq_len + 1 tokens) is the same in both, and window
`t*G + (k*W + r)*m + i` is row i of micro-batch k on rank r at step t as in `TrainWindowLoader`.
Here a rank computes the offset of each of its windows and reads nothing else; resuming is
setting one integer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .c4 import DataPathError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EOS_POLICY = "eos after every document"
STATE_KIND = "prepared"
STATE_VERSION = 1
REBUILD_HINT = "delete it (and its .json marker) and rerun tools/prepare_data.py with the same arguments"


class PreparedDataError(DataPathError):
    """A prepared directory that cannot be used as it is: the message names the file and the fix."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (2 bytes a token), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_prepared(path: str | Path) -> bool:
    """True when `path` is a directory written by tools/prepare_data.py."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / MANIFEST).is_file()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Shard:
    tokens_path: Path
    n_tokens: int
    tokens: np.memmap | np.ndarray


class PreparedCorpus:
    """The token stream of a prepared directory, checked against its manifest and memory-mapped.

    Checks at open (cheap, always): format version, tokenizer fingerprint, every token file's
    size and every index's length and last offset. `verify_checksums` also hashes every file
    (reads the whole corpus once).
    """

    def __init__(self, path: str | Path, tokenizer_fingerprint: str | None = None,
                 verify_checksums: bool = False):
        self.path = Path(path).expanduser()
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise PreparedDataError(
                f"{str(self.path)!r} has no {MANIFEST}: not a prepared directory, or its "
                f"preparation has not finished (rerun tools/prepare_data.py to complete it)")
        self.manifest = json.loads(manifest_path.read_text())
        self._check_header(tokenizer_fingerprint)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.shards = [self._open_shard(s, verify_checksums) for s in self.manifest["shards"]]
        sizes = [s.n_tokens for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.n_tokens = int(self.starts[-1])
        self.skipped_lines = int(sum(s["skipped_lines"] for s in self.manifest["shards"]))

    def _check_header(self, fingerprint: str | None) -> None:
        m = self.manifest
        if m.get("format_version") != FORMAT_VERSION:
            raise PreparedDataError(
                f"{self.path / MANIFEST}: format version {m.get('format_version')!r}, this "
                f"scaletrain reads version {FORMAT_VERSION}: prepare the data again")
        tok = m["tokenizer"]
        if fingerprint is not None and tok["fingerprint"] != fingerprint:
            raise PreparedDataError(
                f"{self.path} was tokenized with {tok['spec']!r} (fingerprint {tok['fingerprint']}), "
                f"but this run's tokenizer has fingerprint {fingerprint}: set --data.tokenizer "
                f"{tok['spec']} or prepare the data with this run's tokenizer")

    def _open_shard(self, entry: dict, verify_checksums: bool) -> Shard:
        tokens_path = self.path / entry["tokens_file"]
        index_path = self.path / entry["index_file"]
        for p in (tokens_path, index_path):
            if not p.is_file():
                raise PreparedDataError(f"prepared shard file {str(p)!r} is missing; {REBUILD_HINT}")
        n_tokens = int(entry["n_tokens"])
        expected = n_tokens * self.dtype.itemsize
        actual = tokens_path.stat().st_size
        if actual != expected:
            raise PreparedDataError(
                f"prepared shard {str(tokens_path)!r} has {actual} bytes, the manifest says "
                f"{expected} ({n_tokens} tokens): truncated or overwritten; {REBUILD_HINT}")
        index = np.load(index_path, mmap_mode="r")
        if index.shape != (entry["n_docs"],) or (len(index) and int(index[-1]) != n_tokens):
            raise PreparedDataError(
                f"prepared index {str(index_path)!r} does not match the manifest "
                f"({entry['n_docs']} documents ending at token {n_tokens}); {REBUILD_HINT}")
        if verify_checksums:
            for p, key in ((tokens_path, "tokens_sha256"), (index_path, "index_sha256")):
                if file_sha256(p) != entry[key]:
                    raise PreparedDataError(
                        f"prepared file {str(p)!r} does not match its sha256 in the manifest "
                        f"(corrupt or replaced); {REBUILD_HINT}")
        # An empty file cannot be memory-mapped; a shard of only skipped lines has no tokens.
        tokens = (np.memmap(tokens_path, dtype=self.dtype, mode="r") if n_tokens
                  else np.zeros(0, self.dtype))
        return Shard(tokens_path, n_tokens, tokens)

    def fingerprint(self) -> str:
        """Identifies the token stream: the same for a copy of the directory, not for other data."""
        h = hashlib.sha256(self.manifest["tokenizer"]["fingerprint"].encode())
        for s in self.manifest["shards"]:
            h.update(f"|{s['n_tokens']}|{s['tokens_sha256']}".encode())
        return h.hexdigest()[:16]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenated stream: a read-only view into the memory map
        within one shard, a copy across shards."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces, pos = [], start
        for shard_index in range(first, len(self.shards)):
            if pos >= stop:
                break
            offset = pos - int(self.starts[shard_index])
            take = min(stop - pos, self.shards[shard_index].n_tokens - offset)
            pieces.append(self.shards[shard_index].tokens[offset : offset + take])
            pos += take
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


# --------------------------------------------------------------------------- shuffle

MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a fixed, platform-independent 64-bit hash."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


class WindowPermutation:
    """A seeded bijection of [0, n) computed per index in O(1) memory.

    A 4-round Feistel network permutes [0, 4^h) with 4^h >= n; indices that land outside [0, n)
    are mapped again (cycle walking), which keeps it a bijection of [0, n). A stored permutation
    of C4's ~150 M windows would cost each rank 1.2 GB; this costs nothing and each rank
    computes only its own windows.
    """

    ROUNDS = 4

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        self.half_mask = (1 << self.half_bits) - 1
        base = _mix64((seed & MASK64) ^ _mix64(epoch & MASK64))
        self.keys = [_mix64(base + r + 1) for r in range(self.ROUNDS)]

    def _feistel(self, x: int) -> int:
        left, right = x >> self.half_bits, x & self.half_mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.half_mask)
        return (left << self.half_bits) | right

    def __call__(self, index: int) -> int:
        x = self._feistel(index)
        while x >= self.n:
            x = self._feistel(x)
        return x


# --------------------------------------------------------------------------- loader

class PreparedWindowLoader:
    """This rank's share of each global batch, read by offset from a PreparedCorpus.

    Same interface and same global order as `TrainWindowLoader` (window g of the stream; an epoch
    is the stream's whole windows, the tail is dropped). With `shuffle`, epoch e serves its
    windows in the order of WindowPermutation(windows per epoch, shuffle_seed, e): each window
    exactly once per epoch, a different order each epoch, the same for every world size.
    """

    def __init__(self, corpus: PreparedCorpus, seq_len: int, micro_batch: int, grad_accum: int,
                 rank: int = 0, world_size: int = 1, shuffle: bool = False, shuffle_seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.corpus, self.seq_len, self.window = corpus, seq_len, seq_len + 1
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.shuffle_seed = shuffle, shuffle_seed
        self.windows_per_epoch = corpus.n_tokens // self.window
        if self.windows_per_epoch == 0:
            raise ValueError(f"the prepared data at {corpus.path} holds {corpus.n_tokens} tokens, "
                             f"fewer than seq_len + 1 = {self.window}: not one window")
        self.windows_consumed = 0
        self._permutation: WindowPermutation | None = None
        self._permutation_epoch = -1

    @property
    def windows_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def epoch(self) -> int:
        """Epoch of the last window served (0 before any)."""
        return max(self.windows_consumed - 1, 0) // self.windows_per_epoch

    @property
    def skipped_lines(self) -> int:
        return self.corpus.skipped_lines

    def _stored_index(self, g: int) -> int:
        """Position in the stream of global window g."""
        epoch, j = divmod(g, self.windows_per_epoch)
        if not self.shuffle:
            return j
        if self._permutation_epoch != epoch:
            self._permutation = WindowPermutation(self.windows_per_epoch, self.shuffle_seed, epoch)
            self._permutation_epoch = epoch
        return self._permutation(j)

    def windows(self, first: int, count: int) -> np.ndarray:
        """Global windows first .. first + count - 1 as a (count, seq_len + 1) array."""
        start_epoch, j = divmod(first, self.windows_per_epoch)
        if not self.shuffle and j + count <= self.windows_per_epoch:  # one contiguous read
            return self.corpus.read(j * self.window, (j + count) * self.window).reshape(count, -1)
        rows = [self._stored_index(g) for g in range(first, first + count)]
        return np.stack([self.corpus.read(s * self.window, (s + 1) * self.window) for s in rows])

    def next_step(self) -> list[torch.Tensor]:
        """This rank's grad_accum micro-batches, each a LongTensor (micro_batch, seq_len + 1)."""
        m, w = self.micro_batch, self.world_size
        base = self.windows_consumed
        micro_batches = [
            torch.from_numpy(self.windows(base + (k * w + self.rank) * m, m).astype(np.int64))
            for k in range(self.grad_accum)
        ]
        self.windows_consumed += self.windows_per_step
        return micro_batches

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict:
        """Global position (identical on every rank); loads at any world size."""
        return {
            "version": STATE_VERSION,
            "kind": STATE_KIND,
            "windows_consumed": self.windows_consumed,
            "epoch": self.epoch,
            "skipped_lines": self.skipped_lines,
            "seq_len": self.seq_len,
            "tokenizer_fingerprint": self.corpus.manifest["tokenizer"]["fingerprint"],
            "data_fingerprint": self.corpus.fingerprint(),
            "shuffle": self.shuffle,
            "shuffle_seed": self.shuffle_seed,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != STATE_KIND:
            raise ValueError(
                "the checkpoint's data position is for the on-the-fly loader (JSON shards), this "
                "run reads prepared data: resume with the data.path it was started with")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"prepared loader state version {state.get('version')!r} != {STATE_VERSION}")
        mine = self.state_dict()
        for key, why in (("seq_len", "windows are cut differently"),
                         ("tokenizer_fingerprint", "the token ids differ"),
                         ("data_fingerprint", "it is another token stream"),
                         ("shuffle", "the window order differs"),
                         ("shuffle_seed", "the window order differs")):
            if state[key] != mine[key]:
                raise ValueError(
                    f"data loader state was saved with {key} {state[key]!r}, this run has "
                    f"{mine[key]!r}: the saved position does not apply ({why})")
        self.windows_consumed = int(state["windows_consumed"])


def prepared_eval_windows(corpus: PreparedCorpus, seq_len: int, n_windows: int, rank: int = 0,
                          world_size: int = 1, micro_batch: int = 1) -> list[torch.Tensor]:
    """`eval_windows` for a prepared validation set: window j of the first n goes to rank j % W."""
    window = seq_len + 1
    available = corpus.n_tokens // window
    if available < n_windows:
        raise ValueError(f"validation data has only {available} windows of seq_len + 1 = {window} "
                         f"tokens, fewer than the {n_windows} asked for")
    mine = [corpus.read(j * window, (j + 1) * window) for j in range(rank, n_windows, world_size)]
    return [torch.from_numpy(np.stack(mine[i : i + micro_batch]).astype(np.int64))
            for i in range(0, len(mine), micro_batch)]
