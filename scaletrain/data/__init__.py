"""C4 documents, tokenizers, the packing data-parallel loader, and prepared (memory-mapped) data."""

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
from .prefetch import Prefetcher
from .prepared import (PreparedCorpus, PreparedDataError, PreparedWindowLoader, WindowPermutation,
                       is_prepared)
from .tokenizer import Tokenizer, load_tokenizer, tokenizer_fingerprint

__all__ = [
    "DEFAULT_TRAIN_PATH",
    "DEFAULT_VALID_PATH",
    "CorruptShardError",
    "DataPathError",
    "DocSource",
    "HubC4",
    "LocalC4",
    "Prefetcher",
    "PreparedCorpus",
    "PreparedDataError",
    "PreparedWindowLoader",
    "Record",
    "TokenStream",
    "Tokenizer",
    "TrainWindowLoader",
    "WindowPermutation",
    "c4_source",
    "eval_windows",
    "is_prepared",
    "load_tokenizer",
    "resolve_shards",
    "tokenizer_fingerprint",
]
