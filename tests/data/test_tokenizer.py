import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece

from scaletrain.data import DEFAULT_TRAIN_PATH, LocalC4, load_tokenizer, tokenizer_fingerprint
from scaletrain.data.tokenizer import SHIPPED
from tools.train_tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[2]
SHIPPED_WITH_SENTENCEPIECE = "0.2.3"  # the version that trained assets/c4-sample-8192.model


def sample_texts(n):
    docs = (r.text for r in LocalC4(DEFAULT_TRAIN_PATH).documents() if r.text)
    return [text for _, text in zip(range(n), docs)]


def test_training_is_deterministic(tmp_path):
    first = train_tokenizer(DEFAULT_TRAIN_PATH, vocab_size=512, max_docs=300)
    second = train_tokenizer(DEFAULT_TRAIN_PATH, vocab_size=512, max_docs=300)
    assert first == second
    path = tmp_path / "tiny.model"
    path.write_bytes(first)
    tok = load_tokenizer(str(path))
    assert (tok.vocab_size, tok.eos_id) == (512, 2)
    text = sample_texts(1)[0]
    assert tok.decode(tok.encode(text)) == text  # byte fallback: lossless even with 512 pieces


def test_cli_writes_the_model_the_function_trains(tmp_path):
    out = tmp_path / "cli.model"
    subprocess.run(
        [sys.executable, "tools/train_tokenizer.py", "--vocab_size", "512", "--output", str(out)],
        cwd=REPO, check=True, capture_output=True,
    )
    assert out.read_bytes() == train_tokenizer(DEFAULT_TRAIN_PATH, vocab_size=512)


@pytest.mark.skipif(
    sentencepiece.__version__ != SHIPPED_WITH_SENTENCEPIECE,
    reason="byte-identical retraining is only promised with the same sentencepiece version",
)
def test_shipped_default_model_is_reproducible():
    assert train_tokenizer(DEFAULT_TRAIN_PATH, vocab_size=8192) == SHIPPED["default"].read_bytes()


def test_default_tokenizer_round_trips_c4_text():
    tok = load_tokenizer("default")
    assert (tok.vocab_size, tok.eos_id) == (8192, 2)
    assert SHIPPED["default"].stat().st_size < 1_000_000
    for text in sample_texts(20) + ["  two spaces, tab\t, Ünïcödé and 🙂\n\nend "]:
        ids = tok.encode(text)
        assert tok.eos_id not in ids
        assert tok.decode(ids) == text


def test_llama32k_tokenizer():
    tok = load_tokenizer("llama32k")
    assert (tok.vocab_size, tok.eos_id) == (32000, 2)
    assert tok.decode(tok.encode("Beginners BBQ Class")) == "Beginners BBQ Class"
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(load_tokenizer("default"))


def test_missing_tokenizer_file_names_path_and_choices(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(missing)
    assert missing in str(err.value) and "data.tokenizer accepts" in str(err.value)
