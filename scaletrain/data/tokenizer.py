"""Tokenizers behind one small interface: encode / decode / vocab_size / eos_id."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

from .c4 import ASSETS

SHIPPED = {
    "default": ASSETS / "c4-sample-8192.model",  # trained on the C4 sample by tools/train_tokenizer.py
    "llama32k": ASSETS / "llama-style-32000.model",  # Mistral-7B v0.1 sentencepiece, Apache-2.0
}
ACCEPTED = (
    "data.tokenizer accepts 'default' (shipped 8192-piece C4 model), 'llama32k' (shipped "
    "32,000-piece Llama-style model), a path to a sentencepiece .model file, or a Hugging Face "
    "tokenizer name"
)


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = str(path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"sentencepiece model {self.path!r} has no EOS piece")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)  # no BOS/EOS: the packer adds EOS after each document

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


class HFTokenizer:
    def __init__(self, name: str):
        from transformers import AutoTokenizer

        self.name = name
        self.tok = AutoTokenizer.from_pretrained(name)
        # Whole documents are encoded before packing; silence the per-call max-length warning.
        self.tok.model_max_length = int(1e30)
        self.vocab_size = len(self.tok)
        if self.tok.eos_token_id is None:
            raise ValueError(f"tokenizer {name!r} has no EOS token; documents need a separator")
        self.eos_id = self.tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _looks_like_path(spec: str) -> bool:
    # Hub names look like "owner/name", so only these shapes are taken as (missing) files.
    return spec.endswith(".model") or spec.startswith(("/", ".", "~"))


def load_tokenizer(spec: str) -> Tokenizer:
    """'default', 'llama32k', a sentencepiece .model path, or a transformers tokenizer name."""
    if spec in SHIPPED:
        return SentencePieceTokenizer(SHIPPED[spec])
    path = Path(spec).expanduser()
    if path.is_file():
        return SentencePieceTokenizer(path)
    if _looks_like_path(spec):
        raise FileNotFoundError(f"tokenizer file {spec!r} does not exist; {ACCEPTED}")
    return HFTokenizer(spec)


PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Beginners BBQ Class Taking Place in Missoula! 2019-04-25 12:57:54 $35 per person.",
    "  Ünïcödé, emoji 🙂 and\nnew lines\ttabs.",
)


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """Short hash of vocab size, EOS and a few encodings: different tokenizers give different ids."""
    h = hashlib.sha256(f"{tok.vocab_size}|{tok.eos_id}".encode())
    for text in PROBE_TEXTS:
        h.update(("|" + ",".join(map(str, tok.encode(text)))).encode())
    return h.hexdigest()[:16]
