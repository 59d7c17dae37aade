import gzip
import json

import pytest

from scaletrain.data import (
    DEFAULT_TRAIN_PATH,
    DEFAULT_VALID_PATH,
    CorruptShardError,
    DataPathError,
    HubC4,
    LocalC4,
    TrainWindowLoader,
    c4_source,
    load_tokenizer,
)


def sample_texts(n, path=DEFAULT_TRAIN_PATH):
    docs = (r.text for r in LocalC4(path).documents() if r.text)
    return [text for _, text in zip(range(n), docs)]


def write_jsonl(path, texts):
    lines = "".join(json.dumps({"text": t, "timestamp": "2019-04-25 12:57:54"}) + "\n" for t in texts)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(lines)


def test_shipped_samples_are_readable_and_disjoint():
    train = [r.text for r in LocalC4(DEFAULT_TRAIN_PATH).documents()]
    valid = [r.text for r in c4_source("files", split="validation").documents()]
    assert len(train) == len(valid) == 1000 and None not in train and None not in valid
    assert train[0].startswith("Beginners BBQ Class Taking Place in Missoula!")
    assert not set(train) & set(valid)


def test_malformed_lines_are_skipped_and_counted(tmp_path):
    good = sample_texts(3)
    shard = tmp_path / "shard.json"
    with open(shard, "wb") as f:
        f.write((json.dumps({"text": good[0], "url": "u"}) + "\n").encode())
        f.write(b'{"text": "broken json\n')
        f.write(b'{"url": "no text here"}\n')
        f.write(json.dumps({"text": good[1]}).encode() + b"\n")
        f.write(b'{"text": ""}\n')
        f.write(b'{"text": "latin-1 caf\xe9"}\n')
        f.write(json.dumps({"text": good[2]}).encode() + b"\n")
    records = list(LocalC4(shard).documents())
    assert [r.line for r in records] == list(range(7))
    assert [r.text for r in records if r.text is not None] == good

    # The loader counts them. Reading stops inside the first (long) document of epoch 1, so each
    # bad line has been read exactly once.
    tok = load_tokenizer("default")
    assert len(tok.encode(good[0])) > 40
    loader = TrainWindowLoader(LocalC4(shard), tok, seq_len=32, micro_batch=1, grad_accum=1)
    while loader.epoch == 0:
        loader.next_step()
    assert loader.skipped_lines == 4
    assert loader.state_dict()["skipped_lines"] == 4


def test_directory_and_glob_read_shards_in_sorted_order(tmp_path):
    texts = sample_texts(4)
    write_jsonl(tmp_path / "c4-train.00001.json.gz", texts[2:])
    write_jsonl(tmp_path / "c4-train.00000.json", texts[:2])
    (tmp_path / "notes.txt").write_text("not a shard")
    for path in (tmp_path, tmp_path / "c4-train.*"):
        records = list(LocalC4(path).documents())
        assert [r.text for r in records] == texts
        assert [(r.shard, r.line) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # Starting mid-way (a resumed cursor) skips whole shards and lines.
    assert [r.text for r in LocalC4(tmp_path).documents(shard=1, line=1)] == texts[3:]


@pytest.mark.parametrize("name", ["missing.json.gz", "missing-*.json", "empty_dir"])
def test_missing_path_names_path_and_field(tmp_path, name):
    (tmp_path / "empty_dir").mkdir()
    path = str(tmp_path / name)
    with pytest.raises(DataPathError) as err:
        LocalC4(path)
    assert path in str(err.value) and "data.path" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_truncated_or_corrupt_gzip_names_the_shard(tmp_path):
    whole = DEFAULT_VALID_PATH.read_bytes()
    truncated = tmp_path / "truncated.json.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    not_gzip = tmp_path / "not-gzip.json.gz"
    not_gzip.write_bytes(b'{"text": "plain json in a .gz name"}\n')
    for shard in (truncated, not_gzip):
        with pytest.raises(CorruptShardError) as err:
            list(LocalC4(shard).documents())
        assert str(shard) in str(err.value)


def test_datasets_streaming_path_reads_the_same_documents(tmp_path):
    texts = sample_texts(6)
    shard = tmp_path / "local.json"
    write_jsonl(shard, texts)
    hub_style = HubC4("json", None, split="train", data_files=str(shard))
    assert [r.text for r in hub_style.documents()] == texts
    assert [(r.line, r.text) for r in hub_style.documents(line=4)] == [(4, texts[4]), (5, texts[5])]

    # Through the packing loader, both sources give identical windows and cursors.
    tok = load_tokenizer("default")
    batches = []
    for source in (LocalC4(shard), hub_style):
        loader = TrainWindowLoader(source, tok, seq_len=64, micro_batch=2, grad_accum=2)
        batches.append([loader.next_step() for _ in range(3)] + [loader.state_dict()["line"]])
    local, hub = batches
    assert local[-1] == hub[-1]
    for a, b in zip(local[:-1], hub[:-1]):
        assert all((x == y).all() for x, y in zip(a, b))
