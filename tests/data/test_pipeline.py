import shutil

import numpy as np
import pytest
import torch

from scaletrain.config import ConfigError, load_config
from scaletrain.data import (PreparedCorpus, PreparedWindowLoader, Prefetcher, TrainWindowLoader,
                             load_tokenizer)
from scaletrain.data.pipeline import train_loader
from scaletrain.data.prepare import FileShards, prepare
from scaletrain.data.c4 import DEFAULT_TRAIN_PATH
from tests.data.corpus import prepared
from tests.launching import TINY, read_metrics, run_pretrain, write_ds_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    _, out = prepared(tmp_path_factory.mktemp("pipeline"))
    return PreparedCorpus(out)


def test_a_prepared_data_path_selects_the_memory_mapped_loader(corpus):
    tok = load_tokenizer("default")
    cpu = torch.device("cpu")
    cfg = load_config(["--data.path", str(corpus.path), "--data.shuffle", "true"])
    loader = train_loader(cfg.data, tok, 2, 1, 0, 1, cpu)
    assert isinstance(loader, Prefetcher) and isinstance(loader.loader, PreparedWindowLoader)
    assert loader.loader.shuffle
    cfg = load_config(["--data.prefetch", "0"])
    assert isinstance(train_loader(cfg.data, tok, 2, 1, 0, 1, cpu), TrainWindowLoader)


def test_shuffle_without_prepared_data_is_a_config_error():
    with pytest.raises(ConfigError, match="data.shuffle.*tools/prepare_data.py"):
        load_config(["--data.shuffle", "true"])


def loss_per_step(run_dir):
    """{step: loss}, the last row of each step (a resumed run rewrites the steps after its checkpoint)."""
    return {row["step"]: row["loss"] for row in read_metrics(run_dir)}


@pytest.mark.slow
def test_training_on_prepared_data_matches_on_the_fly_and_resumes_at_two_ranks(tmp_path):
    """The trainer on the prepared shipped sample: the on-the-fly run's losses at one rank; its
    step-4 checkpoint resumed by 2 torchrun ranks continues them."""
    data = tmp_path / "prepared"
    prepare(FileShards(DEFAULT_TRAIN_PATH), data, "default", workers=1, progress=False)
    one = write_ds_config(tmp_path / "ds1.json", micro=2, accum=2)
    common = ["--deepspeed_config", str(one), "--train.steps", "8", "--checkpoint.every_steps", "4"] + TINY
    run_pretrain(["--run_dir", str(tmp_path / "fly")] + common)
    run_pretrain(["--run_dir", str(tmp_path / "mapped"), "--data.path", str(data)] + common)
    fly, mapped = loss_per_step(tmp_path / "fly"), loss_per_step(tmp_path / "mapped")
    assert list(mapped) == list(range(1, 9))
    np.testing.assert_allclose(list(mapped.values()), list(fly.values()), rtol=0, atol=1e-6)
    rows = read_metrics(tmp_path / "mapped")
    assert all(0 <= r["data_wait_s"] <= r["step_time_s"] for r in rows)

    moved = tmp_path / "moved"  # the prepared run, rewound to its step-4 checkpoint
    shutil.copytree(tmp_path / "mapped", moved)
    shutil.rmtree(moved / "checkpoints" / "step_00000008")
    (moved / "checkpoints" / "latest").write_text("step_00000004\n")
    two = write_ds_config(tmp_path / "ds2.json", micro=2, accum=1)
    run_pretrain(["--run_dir", str(moved), "--data.path", str(data), "--resume", "auto",
                  "--deepspeed_config", str(two)] + common[2:], launcher="torchrun", nproc=2)
    resumed = loss_per_step(moved)
    np.testing.assert_allclose([resumed[s] for s in range(5, 9)], [mapped[s] for s in range(5, 9)],
                               rtol=0, atol=1e-5)
