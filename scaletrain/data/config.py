"""The `data.*` config section of pretraining (where the C4 text comes from, how it is tokenized,
windowed and loaded) and its checks."""
from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config_fields import doc, require


@dataclass
class DataConfig:
    source: str = doc("files", "'files': C4 JSON-lines shards at data.path; 'hub': stream "
                      "data.hub_name with `datasets` (needs network).", ("files", "hub"))
    path: str = doc("default", "C4 training shards: a .json/.json.gz file, a directory or a glob "
                    "(tokenized on the fly), or a directory written by tools/prepare_data.py "
                    "(memory-mapped); 'default' is the shipped 1,000-document C4 sample.")
    val_path: str = doc("default", "Held-out shards for eval loss (as data.path); 'default' is the "
                        "shipped, disjoint 1,000-document C4 validation sample.")
    hub_name: str = doc("allenai/c4", "Dataset name for data.source=hub.")
    tokenizer: str = doc("default", "'default' (shipped 8,192-piece model trained on the sample), "
                         "'llama32k' (shipped 32,000-piece Llama-style model), a sentencepiece "
                         ".model path, or a transformers tokenizer name (needs network).")
    seq_len: int = doc(256, "Tokens per training sequence (windows are seq_len + 1 tokens).")
    shuffle: bool = doc(False, "Prepared data.path only: serve each epoch's windows in a seeded "
                        "random order (every window once per epoch, the same for every world "
                        "size); false: stream order.")
    shuffle_seed: int = doc(0, "Seed of data.shuffle's order (each epoch gets its own order).")
    prefetch: int = doc(2, "Steps loaded ahead on a background thread while the current step "
                        "computes (pinned memory on CUDA); 0: load on the training thread.")
    verify_checksums: bool = doc(False, "Prepared data: hash every shard against the manifest at "
                                 "start-up (reads all of it); sizes are always checked.")


def check_data(data: DataConfig) -> None:
    require(data.seq_len > 0, "data.seq_len", "must be positive")
    require(data.seq_len <= 1024, "data.seq_len", "must be <= 1024 (the presets' max positions)")
    require(data.prefetch >= 0, "data.prefetch", "must be >= 0 (0: no background loading)")
    require(not data.shuffle or _prepared_path(data), "data.shuffle",
            "needs data.path to be a directory written by tools/prepare_data.py (JSON shards and "
            "the Hub are read in stream order)")


def _prepared_path(data: DataConfig) -> bool:
    from scaletrain.data.prepared import is_prepared

    return data.source == "files" and data.path != "default" and is_prepared(data.path)
