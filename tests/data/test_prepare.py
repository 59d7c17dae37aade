import json
import logging

import numpy as np
import pytest

from scaletrain.data import PreparedCorpus, PreparedDataError, load_tokenizer
from scaletrain.data import prepare as prepare_module
from scaletrain.data.prepare import FileShards, HubShards, main, prepare
from scaletrain.data.prepared import MANIFEST
from tests.data.corpus import prepared, sample_texts, write_corpus


def files(directory):
    """{name: bytes} of every file in a prepared directory."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_layout_counts_and_dtype(tmp_path):
    src, out = prepared(tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    tok = load_tokenizer("default")
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == 8192
    assert [s["n_docs"] for s in manifest["shards"]] == [12, 9, 15]
    assert [s["skipped_lines"] for s in manifest["shards"]] == [0, 1, 0]
    first = manifest["shards"][0]
    tokens = np.fromfile(out / first["tokens_file"], dtype=np.uint16)
    ends = np.load(out / first["index_file"])
    texts = sample_texts(12)
    expected = sum((tok.encode(t) + [tok.eos_id] for t in texts), [])
    assert tokens.tolist() == expected and ends[-1] == len(tokens) == first["n_tokens"]
    assert tokens[ends - 1].tolist() == [tok.eos_id] * 12  # every document ends with EOS
    assert first["source"]["size"] == (src / "c4-00000.json.gz").stat().st_size
    assert len(first["source"]["sha256"]) == 64


def test_output_is_byte_identical_whatever_the_worker_count(tmp_path):
    src = write_corpus(tmp_path / "c4")
    for workers in (1, 2):
        prepare(FileShards(src), tmp_path / f"w{workers}", "default", workers=workers, progress=False)
    assert files(tmp_path / "w1") == files(tmp_path / "w2")


class CrashingTokenizer:
    """The real tokenizer, until it meets the text it was told to crash on (a killed worker)."""

    def __init__(self, tok, crash_on):
        self.tok, self.crash_on = tok, crash_on
        self.vocab_size, self.eos_id = tok.vocab_size, tok.eos_id

    def encode(self, text):
        if text == self.crash_on:
            raise KeyboardInterrupt("killed")
        return self.tok.encode(text)


def test_a_killed_preparation_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    src = write_corpus(tmp_path / "c4")
    prepare(FileShards(src), tmp_path / "clean", "default", workers=1, progress=False)

    doc_in_last_shard = sample_texts(12 + 9 + 4)[-1]
    real = load_tokenizer("default")
    monkeypatch.setattr(prepare_module, "load_tokenizer",
                        lambda spec: CrashingTokenizer(real, doc_in_last_shard))
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        prepare(FileShards(src), out, "default", workers=1, progress=False)
    left = set(files(out))
    assert {"00000.json", "00001.json", "00002.bin.tmp"} <= left and "00002.json" not in left
    assert MANIFEST not in left
    with pytest.raises(PreparedDataError, match="no manifest.json.*rerun tools/prepare_data.py"):
        PreparedCorpus(out)

    monkeypatch.undo()
    report = prepare(FileShards(src), out, "default", workers=1, progress=False)
    assert report.already_committed == 2 and [r.entry["index"] for r in report.prepared] == [2]
    assert files(out) == files(tmp_path / "clean")


def test_nodes_prepare_their_share_and_the_last_writes_the_manifest(tmp_path):
    src = write_corpus(tmp_path / "c4")
    prepare(FileShards(src), tmp_path / "one", "default", workers=1, progress=False)
    out = tmp_path / "shared"
    first = prepare(FileShards(src), out, "default", workers=1, node_rank=1, num_nodes=2, progress=False)
    assert [r.entry["index"] for r in first.prepared] == [1]
    assert not first.manifest_written and first.left_to_other_nodes == 2
    second = prepare(FileShards(src), out, "default", workers=1, node_rank=0, num_nodes=2, progress=False)
    assert [r.entry["index"] for r in second.prepared] == [0, 2] and second.manifest_written
    assert files(out) == files(tmp_path / "one")


def test_unreadable_lines_are_named_skipped_and_counted(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="scaletrain.prepare"):
        _, out = prepared(tmp_path)
    assert any("c4-00001.json: line 2 skipped: invalid JSON" in r.getMessage() for r in caplog.records)
    assert json.loads((out / MANIFEST).read_text())["skipped_lines"] == 1


def test_a_corrupt_gzip_source_names_the_file(tmp_path):
    src = write_corpus(tmp_path / "c4")
    gz = src / "c4-00000.json.gz"
    gz.write_bytes(gz.read_bytes()[:-40])
    with pytest.raises(Exception, match="c4-00000.json.gz"):
        prepare(FileShards(src), tmp_path / "out", "default", workers=1, progress=False)


def test_truncated_or_altered_shards_are_refused_naming_them(tmp_path):
    _, out = prepared(tmp_path)
    PreparedCorpus(out, verify_checksums=True)  # intact
    tokens = out / "00001.bin"
    intact = tokens.read_bytes()

    tokens.write_bytes(intact[:-2])
    with pytest.raises(PreparedDataError, match="00001.bin.*has 1908 bytes.*1910.*truncated"):
        PreparedCorpus(out)

    altered = bytearray(intact)
    altered[100] ^= 1
    tokens.write_bytes(bytes(altered))
    PreparedCorpus(out)  # the same size: only the checksum can tell
    with pytest.raises(PreparedDataError, match="00001.bin.*sha256"):
        PreparedCorpus(out, verify_checksums=True)

    tokens.write_bytes(intact)
    (out / "00002.idx.npy").unlink()
    with pytest.raises(PreparedDataError, match="00002.idx.npy.*missing"):
        PreparedCorpus(out)


def test_an_existing_directory_of_other_settings_is_refused(tmp_path):
    src, out = prepared(tmp_path)
    with pytest.raises(PreparedDataError, match="other settings \\(differing: tokenizer\\)"):
        prepare(FileShards(src), out, "llama32k", workers=1, progress=False)


def test_a_changed_source_is_refused(tmp_path):
    src, out = prepared(tmp_path)
    write_corpus(tmp_path / "c4", docs_per_shard=(12, 9, 15))  # same files, same bytes
    assert prepare(FileShards(src), out, "default", workers=1, progress=False).prepared == []
    (src / "c4-00002.json").write_text(json.dumps({"text": "a new document"}) + "\n")
    with pytest.raises(PreparedDataError, match="other settings \\(differing: source\\)"):
        prepare(FileShards(src), out, "default", workers=1, progress=False)


def test_a_hub_dataset_prepares_like_its_files(tmp_path):
    src, out = prepared(tmp_path, bad_line_in=None)  # datasets' JSON reader fails on a bad line
    data_files = [str(p) for p in sorted(src.iterdir())]
    hub = HubShards("json", None, "train", data_files=data_files)
    assert len(hub) == 3
    prepare(hub, tmp_path / "hub", "default", workers=1, progress=False)
    for name in ("00000.bin", "00001.bin", "00002.bin", "00000.idx.npy"):
        assert (tmp_path / "hub" / name).read_bytes() == (out / name).read_bytes()


def test_command_line_prepares_and_verifies(tmp_path, capsys):
    src = write_corpus(tmp_path / "c4")
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    assert f"train with --data.path {out} --data.tokenizer default" in capsys.readouterr().out
    assert main(["--verify", str(out)]) == 0
    (out / "00000.bin").write_bytes(b"")
    assert main(["--verify", str(out)]) == 1
    assert "00000.bin" in capsys.readouterr().err


@pytest.mark.slow
def test_a_sigkilled_preparation_command_resumes_to_the_same_bytes(tmp_path):
    """The real command, two worker processes, killed with SIGKILL after its third shard."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.launching import REPO

    # 20 shards of 40 whole documents: long enough that the kill lands mid-way.
    src = write_corpus(tmp_path / "c4", docs_per_shard=(40,) * 20, bad_line_in=None, chars=None)
    command = [sys.executable, str(REPO / "tools" / "prepare_data.py"), str(src), "--workers", "2",
               "--quiet", "--out"]
    subprocess.run(command + [str(tmp_path / "clean")], check=True, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(command + [str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / "00002.json").exists() and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / MANIFEST).exists(), "finished before the kill: make the corpus larger"
    subprocess.run(command + [str(out)], check=True, capture_output=True)
    assert {k: v for k, v in files(out).items() if not k.endswith(".tmp")} == files(tmp_path / "clean")
    orphans = subprocess.run(["pgrep", "-f", f"--out {out}"], capture_output=True, text=True).stdout
    assert not orphans.split(), "the killed command's worker processes outlived it"
