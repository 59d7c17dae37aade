import pytest
import torch

from scaletrain import checkpoint as ckpt
from scaletrain.data import load_tokenizer
from scaletrain.models.llama import build_model
from tests.launching import TINY, run_in_process, run_pretrain, write_ds_config
from tools.export_hf import main as export_main


@pytest.fixture(scope="module", params=["one_rank", pytest.param("fsdp2_two_ranks", marks=pytest.mark.slow)])
def trained_run(tmp_path_factory, request):
    """One rank, or FSDP2 at 2 ranks: each rank's file then holds its own rows of the weights."""
    tmp = tmp_path_factory.mktemp("export")
    run = tmp / "run"
    if request.param == "one_rank":
        run_pretrain(["--run_dir", str(run), "--train.steps", "4"] + TINY)
        return run
    ds = write_ds_config(tmp / "ds.json", micro=1, accum=1)
    run_pretrain(["--run_dir", str(run), "--train.steps", "4", "--backend", "fsdp", "--deepspeed_config",
                  str(ds)] + TINY, launcher="torchrun", nproc=2)
    from torch.distributed.checkpoint import FileSystemReader

    step = ckpt.find_checkpoint("auto", run)
    files = {i.relative_path for k, i in FileSystemReader(str(step / "dcp")).read_metadata().storage_data.items()
             if k.fqn == "model/model.embed_tokens.weight"}
    assert files == {"__0_0.distcp", "__1_0.distcp"}  # sharded weights, consolidated by the export
    return run


def test_export_round_trip_gives_identical_logits(trained_run, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path / "hf"
    proc = run_in_process(export_main, [str(trained_run / "checkpoints" / "latest"), str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    ours = build_model("llama_9m", 8192)
    ours.load_state_dict(ckpt.load_model_state(ckpt.find_checkpoint("auto", trained_run)))
    ours.eval()
    text = "Beginners BBQ Class Taking Place in Missoula! Do you want to get better at smoking?"
    ids = load_tokenizer("default").encode(text)
    assert AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(hf(input_ids=x).logits, ours(input_ids=x).logits)


def test_export_refuses_to_overwrite(trained_run, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_in_process(export_main, [str(trained_run), str(out)])
    assert proc.returncode != 0 and "not empty" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
