"""Fine-tuning tasks: the shipped SST-2, JSON lines / TSV reading, prompt encoding, left-padded
batches scored exactly as unpadded sequences, and the rank split of the example loader."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scaletrain.data import load_tokenizer
from scaletrain.data.tasks import (ExampleLoader, Task, TaskDataError, check_fields, load_rows, make_batch,
                                   read_table)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("default")


def test_shipped_sst2_is_the_glue_validation_set_and_a_balanced_train_subset():
    val = load_rows("files", "sst2", "validation", "data.val_path")
    train = load_rows("files", "sst2", "train", "data.train_path")
    assert len(val) == 872 and sum(r["label"] == "1" for r in val) == 444
    assert len(train) == 2000 and sum(r["label"] == "1" for r in train) == 1000
    assert set(val[0]) == {"sentence", "label"}


def test_jsonl_and_tsv_read_alike_and_bad_lines_are_named(tmp_path):
    rows = [{"text": "a fine film", "label": 1}, {"text": "dull", "label": 0}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.tsv").write_text("text\tlabel\na fine film\t1\ndull\t0\n")
    assert read_table(tmp_path / "d.jsonl", "data.train_path") == rows
    assert read_table(tmp_path / "d.tsv", "data.train_path") == [{k: str(v) for k, v in r.items()} for r in rows]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok", "label": 1}\n{"text": oops}\n')
    with pytest.raises(TaskDataError, match="line 2 is not JSON"):
        read_table(tmp_path / "bad.jsonl", "data.train_path")
    with pytest.raises(TaskDataError, match="data.val_path.*no such file"):
        read_table(tmp_path / "missing.tsv", "data.val_path")
    with pytest.raises(TaskDataError, match="set data.label_field"):
        check_fields(rows, {"data.text_field": "text", "data.label_field": "stars"}, "data.train_path")


def test_prompts_start_with_eos_and_keep_their_end_within_max_len(tok):
    task = Task(tok, "classification", "{text} It was", ["terrible", "great"], max_len=12)
    long = {"sentence": " ".join(["word"] * 50), "label": "1"}
    ex = task.encode([long, {"sentence": "good", "label": "0"}], "sentence", "label")
    room = max(len(c) for c in task.candidates)
    assert all(e.prompt[0] == tok.eos_id for e in ex)
    assert len(ex[0].prompt) + room <= 12  # cut from the left: the template's end stays
    assert tok.decode(list(ex[0].prompt[1:])).endswith("It was")
    assert [e.label for e in ex] == [1, 0]
    with pytest.raises(TaskDataError, match="row 0 has label='2'"):
        task.encode([{"sentence": "x", "label": "2"}], "sentence", "label")


def _tiny_model(vocab):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                                        max_position_embeddings=128)).eval()


@pytest.mark.parametrize("words", [["bad", "good"], ["terrible", "great"], ["not good at all", "really great"]])
def test_left_padded_batch_scores_equal_unpadded_sequences(tok, words):
    """The label scores from a left-padded batch (single- or multi-token label words) equal the
    summed log-probabilities of each sequence run alone."""
    from scaletrain.finetune import task_loss

    task = Task(tok, "classification", "{text} It was", words, max_len=40)
    assert task.single_token == (words == ["bad", "good"])  # one-token words: one row per example
    rows = [{"sentence": s, "label": str(i % 2)} for i, s in
            enumerate(["a charming and often affecting journey .", "dull", "it is what it is , nothing more"])]
    examples = task.encode(rows, "sentence", "label")
    model = _tiny_model(tok.vocab_size)
    batch = make_batch(task, examples)
    with torch.no_grad():
        loss, loss_sum, correct, weight = task_loss(model, batch, task)
        scores = torch.zeros(len(examples), len(words), dtype=torch.float64)
        for i, e in enumerate(examples):
            for k, cand in enumerate(task.candidates):
                ids = torch.tensor([e.prompt + cand])
                logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
                scores[i, k] = sum(logp[len(e.prompt) - 1 + j, t] for j, t in enumerate(cand))
    want = torch.nn.functional.cross_entropy(scores, torch.tensor([e.label for e in examples]))
    assert weight == len(examples)
    assert abs(loss.item() - want.item()) <= 1e-4
    assert correct == float((scores.argmax(1) == torch.tensor([e.label for e in examples])).sum())


def test_ranks_split_each_global_batch_like_one_rank_accumulating():
    one = ExampleLoader(50, micro=3, accum=4, seed=1)
    ranks = [ExampleLoader(50, micro=3, accum=2, rank=r, world=2, seed=1) for r in range(2)]
    for _ in range(6):  # crosses an epoch boundary (50 examples, 12 a step)
        want = one.next_step()
        got = [rk.next_step() for rk in ranks]
        # micro-batch k of rank r is the 1-rank run's micro-batch k * W + r
        assert [got[k % 2][k // 2] for k in range(4)] == want
