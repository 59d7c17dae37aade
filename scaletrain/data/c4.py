"""C4 documents, read from local JSON-lines shards or streamed from the Hugging Face Hub.

Both sources yield the same `Record(shard, line, text)` stream, so the packing loader does not care
where text comes from. `(shard, line)` is the record's position; a loader that saves the position
after the last record it used can restart there later by skipping lines without parsing them.
"""

from __future__ import annotations

import glob
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_TRAIN_PATH = ASSETS / "c4-en-sample-1000.json.gz"
DEFAULT_VALID_PATH = ASSETS / "c4-en-validation-olmo-1000.json.gz"
SHARD_SUFFIXES = (".json", ".json.gz")


class DataPathError(ValueError):
    """`data.path` names nothing readable."""


class CorruptShardError(RuntimeError):
    """A shard file could not be read to the end (truncated or corrupt gzip, I/O error)."""


@dataclass(frozen=True)
class Record:
    """One input line. `text` is None when the line was unusable (the loader counts those)."""

    shard: int
    line: int
    text: str | None


class DocSource(Protocol):
    def documents(self, shard: int = 0, line: int = 0) -> Iterator[Record]:
        """Records from position (shard, line) to the end of the data, in a fixed order."""
        ...


def document_text(obj: Any) -> str | None:
    """The `text` of a parsed C4 object, or None if it has no usable text."""
    if not isinstance(obj, dict):
        return None
    text = obj.get("text")
    if not isinstance(text, str) or not text:
        return None
    return text


def parse_line(raw: bytes) -> str | None:
    """Text of one JSON line; None for non-UTF-8, malformed JSON, or missing/empty text."""
    return parse_line_or_reason(raw)[0]


def parse_line_or_reason(raw: bytes) -> tuple[str | None, str | None]:
    """(text, None) for a usable JSON line, else (None, why it is unusable)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg})"
    text = document_text(obj)
    if text is None:
        return None, "no non-empty 'text' string"
    return text, None


def resolve_shards(path: str | Path, field: str = "data.path") -> list[Path]:
    """A file, a directory of `*.json`/`*.json.gz` shards, or a glob, as a sorted list of files.

    `field` is the config field the path came from, named in the error.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        shards = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(SHARD_SUFFIXES))
        if not shards:
            raise DataPathError(
                f"{field}: directory {str(path)!r} has no *.json or *.json.gz shards"
            )
        return shards
    shards = sorted(Path(f) for f in glob.glob(str(p)) if Path(f).is_file())
    if not shards:
        raise DataPathError(
            f"{field}: {str(path)!r} is not a file, a directory, or a glob matching any file"
        )
    return shards


def _open_shard(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _shard_lines(path: Path, start_line: int) -> Iterator[tuple[int, bytes]]:
    """(line index, raw bytes) of one shard from `start_line`; earlier lines are read, not parsed."""
    try:
        with _open_shard(path) as f:
            for index, raw in enumerate(f):
                if index >= start_line:
                    yield index, raw
    except (OSError, EOFError, zlib.error) as e:
        # A truncated shard would otherwise silently shorten the dataset (and shift every
        # later window), so stop and say which file is broken.
        raise CorruptShardError(f"cannot read C4 shard {str(path)!r}: {e}") from e


class LocalC4:
    """C4 in its original format: JSON lines with `text` (plus url/timestamp or date metadata)."""

    def __init__(self, path: str | Path, field: str = "data.path"):
        self.path = str(path)
        self.shards = resolve_shards(path, field)

    def documents(self, shard: int = 0, line: int = 0) -> Iterator[Record]:
        for shard_index in range(shard, len(self.shards)):
            start = line if shard_index == shard else 0
            for line_index, raw in _shard_lines(self.shards[shard_index], start):
                yield Record(shard_index, line_index, parse_line(raw))

    def __repr__(self) -> str:
        return f"LocalC4({self.path!r}, {len(self.shards)} shards)"


class HubC4:
    """C4 streamed with `datasets` (default: allenai/c4, config "en").

    `name`/`config`/`load_kwargs` go straight to `load_dataset(..., streaming=True)`, so the same
    code also streams local files: `HubC4("json", None, data_files="x.json")`.
    """

    def __init__(
        self,
        name: str = "allenai/c4",
        config: str | None = "en",
        split: str = "train",
        load_dataset: Callable[..., Any] | None = None,
        **load_kwargs: Any,
    ):
        self.name, self.config, self.split = name, config, split
        self.load_kwargs = load_kwargs
        self._load_dataset = load_dataset

    def documents(self, shard: int = 0, line: int = 0) -> Iterator[Record]:
        load_dataset = self._load_dataset
        if load_dataset is None:
            from datasets import load_dataset  # imported late: slow, and only needed here
        stream = load_dataset(
            self.name, self.config, split=self.split, streaming=True, **self.load_kwargs
        )
        if line:
            stream = stream.skip(line)  # still downloads the skipped records, but never tokenizes
        for index, example in enumerate(stream, start=line):
            yield Record(0, index, document_text(example))

    def __repr__(self) -> str:
        return f"HubC4({self.name!r}, {self.config!r}, split={self.split!r})"


def c4_source(
    source: str = "local",
    path: str | Path | None = None,
    name: str = "allenai/c4",
    split: str = "train",
) -> DocSource:
    """The document source for config fields data.source / data.path / data.name / data.split.

    `source="local"` (alias "files") with no path reads the shipped training sample (split "train")
    or the shipped held-out sample (any other split, whose path comes from data.val_path).
    """
    if source in ("local", "files"):
        train = split == "train"
        if path is None:
            path = DEFAULT_TRAIN_PATH if train else DEFAULT_VALID_PATH
        return LocalC4(path, field="data.path" if train else "data.val_path")
    if source == "hub":
        return HubC4(name, "en", split)
    raise ValueError(f"data.source must be 'files' (or 'local') or 'hub', got {source!r}")
