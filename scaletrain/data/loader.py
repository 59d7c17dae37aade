"""Pack documents into fixed-length windows and split them across data-parallel ranks.

Every document is tokenized and followed by EOS; the documents are concatenated into one token
stream, cut into consecutive non-overlapping windows of seq_len + 1 tokens (input w[:-1], target
w[1:]). A partial window at the end of an epoch is dropped and the next epoch restarts at the first
document. Windows are numbered globally, so any world size sees the same global batches.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .c4 import DocSource, Record
from .tokenizer import Tokenizer, tokenizer_fingerprint

STATE_VERSION = 1


class TokenStream:
    """Windows of `window` tokens from an endless (epoch-repeating) document stream.

    The position is (epoch, shard, line of the next unread record, carry), where carry holds the
    tokens already read but not yet in a window; from it, reading restarts without tokenizing any
    earlier line.
    """

    def __init__(self, source: DocSource, tokenizer: Tokenizer, window: int):
        self.source, self.tokenizer, self.window = source, tokenizer, window
        self.skipped_lines = 0  # unusable input lines, counted again in every epoch
        self.seek(epoch=0, shard=0, line=0, carry=[])

    def seek(self, epoch: int, shard: int, line: int, carry: list[int]) -> None:
        previous = getattr(self, "records", None)
        if previous is not None:
            previous.close()  # release the open shard file now, not at garbage collection
        self.epoch, self.shard, self.line = epoch, shard, line
        self.buffer, self.offset = list(carry), 0
        self.windows_this_epoch = 0 if (shard, line) == (0, 0) else None  # None: unknown, resumed
        self.records: Iterator[Record] = self.source.documents(shard, line)

    @property
    def carry(self) -> list[int]:
        return self.buffer[self.offset :]

    def _read_document(self) -> bool:
        """Append the next document (+ EOS) to the buffer; False at the end of the epoch."""
        for record in self.records:
            self.shard, self.line = record.shard, record.line + 1
            if record.text is None:
                self.skipped_lines += 1
                continue
            self.buffer += self.tokenizer.encode(record.text)
            self.buffer.append(self.tokenizer.eos_id)
            return True
        return False

    def _fill(self) -> None:
        """Make at least one full window available, starting a new epoch when the data runs out."""
        if len(self.buffer) - self.offset >= self.window:
            return
        del self.buffer[: self.offset]  # compact only when reading, not on every window
        self.offset = 0
        while len(self.buffer) < self.window:
            if self._read_document():
                continue
            if self.windows_this_epoch == 0:
                raise ValueError(
                    f"the data holds fewer than seq_len + 1 = {self.window} tokens, not one window"
                )
            self.seek(self.epoch + 1, 0, 0, carry=[])  # drop the partial window, start over

    def next_window(self) -> list[int]:
        self._fill()
        window = self.buffer[self.offset : self.offset + self.window]
        self.offset += self.window
        if self.windows_this_epoch is not None:
            self.windows_this_epoch += 1
        return window

    def skip_windows(self, n: int) -> None:
        for _ in range(n):
            self._fill()
            self.offset += self.window
            if self.windows_this_epoch is not None:
                self.windows_this_epoch += 1


class TrainWindowLoader:
    """This rank's share of each global batch of G = micro_batch * grad_accum * world_size windows.

    Counting from the global window `base` where the step starts, window `base + (k*W + r)*m + i`
    is row i of micro-batch k on rank r. Hence 2 ranks with grad_accum A see the same micro-batches,
    in the same global order, as 1 rank with grad_accum 2A.

    Every rank reads and tokenizes the whole stream and keeps only its own windows: sharding by
    document would change which windows exist for each world size. That costs W times the
    tokenization, fine for small corpora and a few ranks; at scale, prepare the data once
    (tools/prepare_data.py) and read it with `PreparedWindowLoader`, same windows, same order.
    """

    def __init__(
        self,
        doc_source: DocSource,
        tokenizer: Tokenizer,
        seq_len: int,
        micro_batch: int,
        grad_accum: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.rank, self.world_size = rank, world_size
        self.stream = TokenStream(doc_source, tokenizer, seq_len + 1)
        self.windows_consumed = 0  # global windows served to all ranks so far
        self._fingerprint: str | None = None

    @property
    def windows_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def epoch(self) -> int:
        """Epoch of the last window served: the end of the data is noticed when the next is read."""
        return self.stream.epoch

    @property
    def skipped_lines(self) -> int:
        return self.stream.skipped_lines

    def next_step(self) -> list[torch.Tensor]:
        """This rank's grad_accum micro-batches, each a LongTensor (micro_batch, seq_len + 1)."""
        micro_batches = []
        for block in range(self.grad_accum * self.world_size):  # block = k * W + r
            if block % self.world_size == self.rank:
                rows = [self.stream.next_window() for _ in range(self.micro_batch)]
                micro_batches.append(torch.tensor(rows, dtype=torch.long))
            else:
                # Other ranks' windows: read past them so every rank's cursor stays identical.
                self.stream.skip_windows(self.micro_batch)
        self.windows_consumed += self.windows_per_step
        return micro_batches

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        while True:
            yield self.next_step()

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = tokenizer_fingerprint(self.tokenizer)
        return self._fingerprint

    def state_dict(self) -> dict:
        """Global position (identical on every rank); loads at any world size."""
        s = self.stream
        return {
            "version": STATE_VERSION,
            "windows_consumed": self.windows_consumed,
            "epoch": s.epoch,
            "shard": s.shard,
            "line": s.line,
            "carry": torch.tensor(s.carry, dtype=torch.long),
            "skipped_lines": s.skipped_lines,
            "seq_len": self.seq_len,
            "tokenizer_fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", "stream") != "stream":
            raise ValueError(
                f"the checkpoint's data position is for {state['kind']!r} data (a prepared "
                f"directory), this run tokenizes JSON shards on the fly: resume with the "
                f"data.path it was started with")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r} != {STATE_VERSION}")
        if state["seq_len"] != self.seq_len:
            raise ValueError(
                f"data loader state was saved with seq_len {state['seq_len']}, "
                f"but this run uses seq_len {self.seq_len}: the saved cursor does not apply"
            )
        if state["tokenizer_fingerprint"] != self.fingerprint():
            raise ValueError(
                f"data loader state was saved with a different tokenizer (fingerprint "
                f"{state['tokenizer_fingerprint']}, this run's is {self.fingerprint()}): "
                f"the saved carry tokens and cursor do not apply"
            )
        carry = [int(t) for t in state["carry"]]
        self.stream.seek(int(state["epoch"]), int(state["shard"]), int(state["line"]), carry)
        self.stream.skipped_lines = int(state["skipped_lines"])
        self.windows_consumed = int(state["windows_consumed"])


def eval_windows(
    doc_source: DocSource,
    tokenizer: Tokenizer,
    seq_len: int,
    n_windows: int,
    rank: int = 0,
    world_size: int = 1,
    micro_batch: int = 1,
) -> list[torch.Tensor]:
    """This rank's micro-batches of the first n_windows windows of the validation stream.

    Window j goes to rank j % world_size, so the ranks' windows are disjoint and together exactly
    the first n_windows (a rank may get one fewer, or none: then the list is empty). The last
    micro-batch may be smaller than micro_batch. Weight per-rank losses by their token counts.
    """
    stream = TokenStream(doc_source, tokenizer, seq_len + 1)
    mine = []
    for j in range(n_windows):
        window = stream.next_window()
        if stream.epoch > 0:
            raise ValueError(
                f"validation data has only {j} windows of seq_len + 1 = {seq_len + 1} tokens, "
                f"fewer than the {n_windows} asked for"
            )
        if j % world_size == rank:
            mine.append(window)
    return [
        torch.tensor(mine[i : i + micro_batch], dtype=torch.long)
        for i in range(0, len(mine), micro_batch)
    ]
