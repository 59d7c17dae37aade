"""Load the next steps' batches on a background thread while the current step computes."""

from __future__ import annotations

import queue
import threading

import torch


class Prefetcher:
    """Wraps a window loader (`next_step`, `state_dict`, `load_state_dict`) and runs it `depth`
    steps ahead on a thread, optionally into pinned memory (so the copy to a GPU can be
    non-blocking).

    The thread starts at the first `next_step`, after any resume. `state_dict()` is the position
    after the last step *handed out*, not the loader's own (it is ahead), so a checkpoint resumes
    exactly where training stopped.
    """

    def __init__(self, loader, depth: int = 2, pin_memory: bool = False):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.loader, self.depth, self.pin_memory = loader, depth, pin_memory
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._state: dict | None = None  # position after the last step handed out

    def _produce(self) -> None:
        while not self._stop.is_set():
            try:
                batches = self.loader.next_step()
                if self.pin_memory:
                    batches = [b.pin_memory() for b in batches]
                item = (batches, self.loader.state_dict())
            except BaseException as e:  # handed to the training thread, raised there
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next_step(self) -> list[torch.Tensor]:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._produce, name="data-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batches, self._state = item
        return batches

    def __iter__(self):
        while True:
            yield self.next_step()

    def close(self) -> None:
        """Stop the thread and drop what it loaded ahead (the loader is then ahead of state_dict)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._queue = queue.Queue(maxsize=self.depth)

    def state_dict(self) -> dict:
        return self._state if self._state is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.loader.load_state_dict(state)
        self._state = None

    @property
    def skipped_lines(self) -> int:
        return int(self.state_dict()["skipped_lines"])

    @property
    def epoch(self) -> int:
        return int(self.state_dict()["epoch"])

    @property
    def windows_consumed(self) -> int:
        return int(self.state_dict()["windows_consumed"])
