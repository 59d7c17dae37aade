"""Which loader a run gets: prepared (memory-mapped) or on-the-fly, with or without prefetching."""

from __future__ import annotations

import torch

from .c4 import c4_source
from .loader import TrainWindowLoader, eval_windows
from .prefetch import Prefetcher
from .prepared import PreparedCorpus, PreparedWindowLoader, is_prepared, prepared_eval_windows
from .tokenizer import Tokenizer, tokenizer_fingerprint


def _path(value: str) -> str | None:
    return None if value == "default" else value


def train_loader(data, tokenizer: Tokenizer, micro_batch: int, grad_accum: int, rank: int,
                 world_size: int, device: torch.device):
    """The training loader for config section `data` (a DataConfig).

    A `data.path` that is a prepared directory is memory-mapped; anything else is tokenized on the
    fly. With data.prefetch > 0, a thread loads that many steps ahead (into pinned memory on CUDA).
    """
    path = _path(data.path)
    if data.source == "files" and path is not None and is_prepared(path):
        corpus = PreparedCorpus(path, tokenizer_fingerprint(tokenizer), data.verify_checksums)
        loader = PreparedWindowLoader(corpus, data.seq_len, micro_batch, grad_accum, rank,
                                      world_size, data.shuffle, data.shuffle_seed)
    else:
        docs = c4_source("local" if data.source == "files" else "hub", path, name=data.hub_name,
                         split="train")
        loader = TrainWindowLoader(docs, tokenizer, data.seq_len, micro_batch, grad_accum,
                                   rank, world_size)
    if data.prefetch == 0:
        return loader
    return Prefetcher(loader, data.prefetch, pin_memory=device.type == "cuda")


def validation_batches(data, tokenizer: Tokenizer, n_windows: int, rank: int, world_size: int,
                       micro_batch: int) -> list[torch.Tensor]:
    """This rank's held-out micro-batches: from a prepared directory or tokenized on the fly."""
    path = _path(data.val_path)
    if data.source == "files" and path is not None and is_prepared(path):
        corpus = PreparedCorpus(path, tokenizer_fingerprint(tokenizer), data.verify_checksums)
        return prepared_eval_windows(corpus, data.seq_len, n_windows, rank, world_size, micro_batch)
    docs = c4_source("local" if data.source == "files" else "hub", path, name=data.hub_name,
                     split="validation")
    return eval_windows(docs, tokenizer, data.seq_len, n_windows, rank, world_size, micro_batch)
