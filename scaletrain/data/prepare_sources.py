"""The sources `prepare.py` tokenizes, shard by shard: JSON-lines files (FileShards, checksummed as
they are read) or a Hugging Face dataset streamed by its data files (HubShards). Each opened shard
is a ShardInput: (line, raw bytes or text) items, progress, and its manifest record."""
from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

from .c4 import CorruptShardError, document_text, resolve_shards


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
