"""Tiny multi-shard C4 corpora for the prepared-data tests, made from the shipped sample."""

import gzip
import json

from scaletrain.data import DEFAULT_TRAIN_PATH, LocalC4
from scaletrain.data.prepare import FileShards, prepare


def sample_texts(n, chars=400):
    """The first n documents of the shipped sample, cut to `chars` characters (None: whole)."""
    docs = (r.text for r in LocalC4(DEFAULT_TRAIN_PATH).documents())
    return [text[:chars] for _, text in zip(range(n), docs)]


def write_corpus(directory, docs_per_shard=(12, 9, 15), bad_line_in=1, chars=400):
    """Shards c4-00000.json.gz, c4-00001.json, ... of real C4 text; shard `bad_line_in` has a
    malformed second line (skipped and counted by both loaders)."""
    directory.mkdir(parents=True, exist_ok=True)
    texts = iter(sample_texts(sum(docs_per_shard), chars))
    for s, n in enumerate(docs_per_shard):
        lines = [json.dumps({"text": next(texts), "url": f"u{s}"}) + "\n" for _ in range(n)]
        if s == bad_line_in:
            lines.insert(1, '{"text": "broken json\n')
        path = directory / f"c4-{s:05d}.json{'.gz' if s == 0 else ''}"
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as f:
            f.write("".join(lines))
    return directory


def prepared(tmp_path, name="prepared", workers=1, **corpus):
    """(source directory, prepared directory) of a fresh tiny corpus."""
    src = write_corpus(tmp_path / "c4", **corpus)
    out = tmp_path / name
    prepare(FileShards(src), out, "default", workers=workers, progress=False)
    return src, out
