"""Fine-tuning tasks: labelled text (classification) or prompt/completion pairs, from JSON lines, TSV
or a `datasets` name, tokenized into left-padded batches for a causal LM.

Classification is label-word scoring with the causal LM (LM-BFF / MeZO's prompt style, e.g. SST-2:
"<sentence> It was" followed by "terrible" or "great"): the score of class k is the summed
log-probability of label word k's tokens after the prompt; the loss is cross-entropy over the K
scores (MeZO's "train as classification"), the prediction their argmax. Completion tasks train the
mean next-token loss of the completion tokens (accuracy: greedy next-token hits on them).

Every sequence starts with EOS, as a document does in the pretraining stream (documents are
joined with EOS there), and is cut from the left (the prompt's end and the continuation stay) to
`max_len` tokens.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .c4 import ASSETS

SST2_TRAIN = ASSETS / "sst2-train-2000.tsv"
SST2_VALID = ASSETS / "sst2-validation.tsv"
SHIPPED = {"sst2": {"train": SST2_TRAIN, "validation": SST2_VALID}}


class TaskDataError(ValueError):
    """A dataset that cannot be used as configured; the message names the field and the fix."""


# --------------------------------------------------------------------------- reading

def read_table(path: str | Path, field: str) -> list[dict]:
    """Rows of a JSON-lines (.jsonl/.json) or TSV (.tsv, header line) file as dicts."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TaskDataError(f"config key '{field}': no such file {str(path)!r} (JSON lines or TSV with a "
                            f"header; 'sst2' is the shipped SST-2)")
    if p.suffix in (".jsonl", ".json"):
        rows = []
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskDataError(f"config key '{field}': {p} line {n} is not JSON ({e})") from None
                if not isinstance(obj, dict):
                    raise TaskDataError(f"config key '{field}': {p} line {n} is not a JSON object")
                rows.append(obj)
        return rows
    if p.suffix == ".tsv":
        with open(p, encoding="utf-8", newline="") as f:
            return [dict(r) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    raise TaskDataError(f"config key '{field}': {p} is neither .jsonl/.json (JSON lines) nor .tsv")


def load_rows(source: str, path: str, split: str, field: str, hub_name: str = "", hub_config: str = "") -> list[dict]:
    if source == "hub":
        import datasets  # network

        return [dict(r) for r in datasets.load_dataset(hub_name, hub_config or None, split=split)]
    if path in SHIPPED:
        return read_table(SHIPPED[path][split], field)
    return read_table(path, field)


def check_fields(rows: list[dict], fields: dict[str, str], where: str) -> None:
    """Every named field is present in the rows, or an error says which key to set."""
    if not rows:
        raise TaskDataError(f"{where}: the dataset is empty")
    have = sorted(rows[0])
    for key, name in fields.items():
        if name not in rows[0]:
            raise TaskDataError(f"{where}: the dataset has no field {name!r} (its fields: {have}); "
                                f"set {key} to the column that holds it")


# --------------------------------------------------------------------------- encoding

@dataclass(frozen=True)
class Example:
    prompt: tuple[int, ...]
    label: int = -1  # classification: class index
    completion: tuple[int, ...] = ()  # completion task: the target tokens


class Task:
    """How rows become examples and how examples are scored."""

    def __init__(self, tokenizer, kind: str, template: str, label_words: list[str], max_len: int):
        if kind not in ("classification", "completion"):
            raise TaskDataError(f"config key 'data.task' is {kind!r}; choose classification or completion")
        if "{text}" not in template:
            raise TaskDataError(f"config key 'data.template' {template!r} has no {{text}} placeholder")
        self.tok, self.kind, self.template, self.max_len = tokenizer, kind, template, max_len
        self.eos = tokenizer.eos_id
        self.label_words = list(label_words)
        self.candidates = [tuple(tokenizer.encode(w)) for w in self.label_words]
        if kind == "classification":
            if len(self.candidates) < 2 or any(not c for c in self.candidates):
                raise TaskDataError("config key 'data.label_words' needs at least two non-empty words")
            if len(set(self.candidates)) < len(self.candidates):
                raise TaskDataError(f"config key 'data.label_words' {label_words}: two words tokenize alike")
        self.single_token = kind == "classification" and all(len(c) == 1 for c in self.candidates)

    def _prompt(self, text: str, room: int) -> tuple[int, ...]:
        ids = self.tok.encode(self.template.format(text=str(text).strip()))
        keep = max(1, self.max_len - 1 - room)
        return (self.eos,) + tuple(ids[-keep:])

    def encode(self, rows: list[dict], text_field: str, label_field: str = "", completion_field: str = "",
               where: str = "data") -> list[Example]:
        out = []
        if self.kind == "classification":
            room = max(len(c) for c in self.candidates)
            for n, r in enumerate(rows):
                label = r[label_field]
                try:
                    k = int(label)
                except (TypeError, ValueError):
                    k = -1
                if not 0 <= k < len(self.candidates) or (isinstance(label, float) and label != k):
                    raise TaskDataError(f"{where}: row {n} has {label_field}={label!r}; labels must be class "
                                        f"indices 0..{len(self.candidates) - 1} (one per data.label_words entry)")
                out.append(Example(self._prompt(r[text_field], room), label=k))
        else:
            for r in rows:
                comp = tuple(self.tok.encode(str(r[completion_field])))[: self.max_len - 2]
                out.append(Example(self._prompt(r[text_field], len(comp)), completion=comp))
        return out


@dataclass
class Batch:
    input_ids: torch.Tensor  # (N, T) left-padded
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    cont_len: torch.Tensor  # (N,) continuation tokens at the end of each row (0: score the next token)
    keep: int  # logits kept at the last `keep` positions
    labels: torch.Tensor  # (B,) class indices (classification)
    n_examples: int

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.position_ids),
                     move(self.cont_len), self.keep, move(self.labels), self.n_examples)


def make_batch(task: Task, examples: list[Example]) -> Batch:
    if task.kind == "classification" and not task.single_token:
        seqs = [(e.prompt + c, len(c)) for e in examples for c in task.candidates]  # B x K rows
    elif task.kind == "classification":
        seqs = [(e.prompt, 0) for e in examples]
    else:
        seqs = [(e.prompt + e.completion, len(e.completion)) for e in examples]
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), task.eos, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, _) in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    cont = torch.tensor([c for _, c in seqs], dtype=torch.long)
    return Batch(ids, mask, (mask.cumsum(1) - 1).clamp(min=0), cont, int(cont.max()) + 1,
                 torch.tensor([e.label for e in examples], dtype=torch.long), len(examples))


# --------------------------------------------------------------------------- batches per rank

class ExampleLoader:
    """This rank's micro-batches of each global batch of G = micro x accum x world examples.

    Examples are visited in a fresh seeded permutation each epoch; global position p is example
    perm_{p // n}[p % n]. Micro-batch k of rank r at step t holds positions
    t*G + (k*W + r)*m + i, i < m, so W ranks see the same micro-batches as one rank with W times
    the accumulation (the pretraining loader's rule)."""

    def __init__(self, n: int, micro: int, accum: int, rank: int = 0, world: int = 1, seed: int = 0):
        if n <= 0:
            raise TaskDataError("the training set is empty")
        self.n, self.micro, self.accum, self.rank, self.world, self.seed = n, micro, accum, rank, world, seed
        self.step = 0
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def per_step(self) -> int:
        return self.micro * self.accum * self.world

    def _at(self, pos: int) -> int:
        epoch = pos // self.n
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))}
        return int(self._perms[epoch][pos % self.n])

    def next_step(self) -> list[list[int]]:
        base = self.step * self.per_step
        out = []
        for k in range(self.accum):
            start = base + (k * self.world + self.rank) * self.micro
            out.append([self._at(p) for p in range(start, start + self.micro)])
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "n": self.n, "seed": self.seed}
