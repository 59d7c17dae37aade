"""Train a Llama-style sentencepiece BPE model on C4 text, deterministically.

    python tools/train_tokenizer.py                       # -> scaletrain/data/assets/c4-sample-8192.model
    python tools/train_tokenizer.py --vocab_size 16384 --input 'shards/*.json.gz' --output tok.model

Same input and options give the same bytes: every line is used (no sampling), in file order
(no shuffling), on one thread (multi-threaded training may break ties differently).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path
from typing import Iterator

import sentencepiece as spm

from scaletrain.data.c4 import ASSETS, DEFAULT_TRAIN_PATH, LocalC4


def training_lines(input_path: str | Path, max_docs: int | None = None) -> Iterator[str]:
    """Non-empty lines of each document: sentencepiece wants sentences, not whole documents."""
    docs = (r.text for r in LocalC4(input_path).documents() if r.text is not None)
    for n, text in enumerate(docs):
        if max_docs is not None and n >= max_docs:
            return
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(
    input_path: str | Path, vocab_size: int = 8192, max_docs: int | None = None
) -> bytes:
    """The serialized model, trained with Llama's special ids (unk=0, bos=1, eos=2, no pad)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_lines(input_path, max_docs),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,  # any UTF-8 byte is encodable: no <unk> on unseen characters
        character_coverage=0.9995,
        split_digits=True,
        normalization_rule_name="identity",  # no NFKC, so decode(encode(text)) == text
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        max_sentence_length=1 << 16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # Determinism: read every sentence, keep file order, one thread.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", default=str(DEFAULT_TRAIN_PATH), help="C4 file, directory or glob")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--output", default=None, help="default: assets/c4-sample-<vocab>.model")
    args = parser.parse_args()
    output = Path(args.output or ASSETS / f"c4-sample-{args.vocab_size}.model")

    start = time.perf_counter()
    model = train_tokenizer(args.input, args.vocab_size)
    output.write_bytes(model)
    print(f"wrote {output} ({len(model):,} bytes) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
