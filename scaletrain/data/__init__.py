"""C4 documents, tokenizers, and the packing data-parallel loader."""

from .c4 import (
    DEFAULT_TRAIN_PATH,
    DEFAULT_VALID_PATH,
    CorruptShardError,
    DataPathError,
    DocSource,
    HubC4,
    LocalC4,
    Record,
    c4_source,
    resolve_shards,
)
from .loader import TokenStream, TrainWindowLoader, eval_windows
from .tokenizer import Tokenizer, load_tokenizer, tokenizer_fingerprint

__all__ = [
    "DEFAULT_TRAIN_PATH",
    "DEFAULT_VALID_PATH",
    "CorruptShardError",
    "DataPathError",
    "DocSource",
    "HubC4",
    "LocalC4",
    "Record",
    "TokenStream",
    "Tokenizer",
    "TrainWindowLoader",
    "c4_source",
    "eval_windows",
    "load_tokenizer",
    "resolve_shards",
    "tokenizer_fingerprint",
]
