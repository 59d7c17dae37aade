"""Bad config input: exit code 2, the field named, nothing written, no process group started."""
import json

import pytest

from scaletrain.config import ConfigError, load_config
from tests.launching import REPO, run_pretrain


def test_dotted_overrides_and_yaml_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  lr: 0.01\n  name: block\ndata:\n  seq_len: 64\n")
    cfg = load_config(["--config", str(f), "--optim.lr", "3e-3", "--data.seq_len=256"])
    assert (cfg.optim.lr, cfg.optim.name, cfg.data.seq_len) == (3e-3, "block", 256)


@pytest.mark.parametrize("args, named", [
    (["--optim.lrr", "1"], "did you mean 'optim.lr'"),
    (["--optim.sparsity", "0.95"], "optim.density"),
    (["--data.seq_len", "abc"], "data.seq_len"),
    (["--optim.density", "1.5"], "optim.density"),
    (["--optim.name", "adamww"], "did you mean 'adamw'"),
    (["--model.preset", "llama_6m"], "model.preset"),
    (["--optim.frozen_patterns", "7"], "optim.frozen_patterns"),
    (["--optim.projection", "galor"], "did you mean 'galore'"),
    (["--optim.rank", "0"], "optim.rank"),
    (["--checkpoint.every_steps", "-2"], "checkpoint.every_steps"),
])
def test_bad_keys_and_values_name_the_field(args, named):
    with pytest.raises(ConfigError, match=named):
        load_config(args)


def test_ds_config_may_not_duplicate_our_knobs(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1,
                              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}))
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(["--deepspeed_config", str(ds)])


@pytest.mark.parametrize("args, named", [
    (["--optim.lrr", "1"], "optim.lr"),
    (["--train.steps", "ten"], "train.steps"),
    (["--deepspeed_config", "ds_configs/missing.json"], "deepspeed_config"),
])
def test_cli_exits_2_before_anything_is_written(tmp_path, monkeypatch, capsys, args, named):
    """The trainer's entry point in this process (the launcher script only calls it; the run
    below, test_existing_run_is_not_overwritten, goes through the script)."""
    from scaletrain.trainer import main

    monkeypatch.chdir(REPO)  # (ds_configs/ paths are relative to the repo, as on the command line)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["--run_dir", str(run_dir)] + args)
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.slow  # the launcher script
def test_existing_run_is_not_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = run_pretrain(["--run_dir", str(run_dir)], check=False, timeout=120)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'
