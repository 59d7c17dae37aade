"""Resume semantics: keys given at resume win over the checkpoint's, the others come from it,
the log and config.yaml say what is in force, and what cannot change stops with exit 2."""
import shutil

import pytest
import yaml

from scaletrain.config import ConfigError, RunConfig, resumed_config, to_dict
from tests.launching import TINY, read_metrics, run_pretrain

STEPS = 6


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """6 steps at optim.lr 2e-3 (not the default), checkpoints at 3 and 6."""
    run_dir = tmp_path_factory.mktemp("lr") / "run"
    run_pretrain(["--run_dir", str(run_dir), "--optim.lr", "2e-3", "--train.steps", str(STEPS),
                  "--checkpoint.every_steps", "3"] + TINY)
    return run_dir


def rewound_to_step_3(run_dir, dest):
    shutil.copytree(run_dir, dest)
    shutil.rmtree(dest / "checkpoints" / f"step_{STEPS:08d}")
    (dest / "checkpoints" / "latest").write_text("step_00000003\n")
    return dest


def rows_by_step(run_dir):
    return {r["step"]: r for r in read_metrics(run_dir)}  # a resumed step's later row wins


@pytest.mark.slow  # trainer runs (the launcher script)
def test_changed_lr_takes_effect_from_the_first_resumed_step(finished_run, tmp_path):
    run_dir = rewound_to_step_3(finished_run, tmp_path / "run")
    proc = run_pretrain(["--run_dir", str(run_dir), "--resume", "auto", "--optim.lr", "1e-3"] + TINY)
    before, after = rows_by_step(finished_run), rows_by_step(run_dir)
    for step in (4, 5, 6):
        assert after[step]["lr"] == pytest.approx(before[step]["lr"] / 2, rel=1e-12), step
    assert after[4]["loss"] == before[4]["loss"]  # step 4's loss comes from step 3's weights
    assert after[5]["loss"] != before[5]["loss"]  # step 4's update used the new LR
    assert "optim.lr 0.002 -> 0.001" in proc.stderr
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 1e-3


@pytest.mark.slow  # trainer runs (the launcher script)
def test_keys_not_given_at_resume_come_from_the_checkpoint(finished_run, tmp_path):
    """No --optim.lr and no --train.steps at resume: the run's 2e-3 and 6 steps, not the defaults."""
    run_dir = rewound_to_step_3(finished_run, tmp_path / "run")
    run_pretrain(["--run_dir", str(run_dir), "--resume", "auto"])
    got, want = rows_by_step(run_dir), rows_by_step(finished_run)
    assert max(got) == STEPS
    for step in (4, 5, 6):
        assert (got[step]["loss"], got[step]["lr"]) == (want[step]["loss"], want[step]["lr"]), step
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 2e-3


@pytest.mark.slow  # trainer runs (the launcher script)
def test_model_preset_cannot_change_on_resume(finished_run, tmp_path):
    run_dir = rewound_to_step_3(finished_run, tmp_path / "run")
    proc = run_pretrain(["--run_dir", str(run_dir), "--resume", "auto", "--model.preset", "llama_20m"],
                        check=False, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "'model.preset'" in proc.stderr and "llama_9m" in proc.stderr


@pytest.mark.parametrize("key,value", [("data.seq_len", 64), ("data.tokenizer", "llama32k"),
                                       ("model.preset", "llama_20m")])
def test_fixed_keys_given_differently_are_config_errors(key, value):
    saved = to_dict(RunConfig())
    current = RunConfig()
    section, leaf = key.split(".")
    setattr(getattr(current, section), leaf, value)
    with pytest.raises(ConfigError, match=f"'{key}'.*cannot change on resume"):
        resumed_config(saved, current, {key})


def test_resumed_config_reports_changes_and_keeps_the_rest():
    saved = to_dict(RunConfig())
    saved["optim"]["lr"], saved["train"]["steps"] = 2e-3, 100
    current = RunConfig()
    current.optim.lr, current.train.eval_every = 1e-3, 7
    cfg, changed = resumed_config(saved, current, {"optim.lr", "train.eval_every"})
    assert (cfg.optim.lr, cfg.train.steps, cfg.train.eval_every) == (1e-3, 100, 7)
    assert changed == {"optim.lr": (2e-3, 1e-3), "train.eval_every": (0, 7)}
    assert current.train.steps == RunConfig().train.steps  # the given config is not modified
