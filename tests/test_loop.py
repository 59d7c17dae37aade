"""The one training loop (scaletrain.loop), on a stand-in engine and block optimizer: selection
pass when wanted, the loss handed to the optimizer only for steps that were applied, skipped
steps counted and stopped, hooks and progress numbered as in metrics.jsonl, the run closed
whatever ends it."""
import contextlib

import pytest
import torch

from scaletrain.distributed.runtime import DistContext
from scaletrain.loop import Progress, RankLostError, Step, StepOut, closing_run, due, run
from scaletrain.nonfinite import NonFiniteError
from scaletrain.optim.selecting import SelectsBlocks

CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Selecting:
    """Wants a selection every other step; records what the loop asks of it."""

    def __init__(self):
        self.selections, self.losses, self.in_pass = [], [], False

    def wants_selection(self, step):
        return step % 2 == 0

    @contextlib.contextmanager
    def selection_pass(self, grad_leaves=None, *, step):
        self.in_pass = True
        yield
        self.in_pass = False
        self.selections.append(step)

    def record_loss(self, loss):
        self.losses.append(loss)

    def stats(self):
        return {}


class Engine:
    """train_step returns the batch's value; steps (1-based) in `skip_at` are skipped."""

    def __init__(self, skip_at=()):
        self.module = torch.nn.Linear(2, 1)
        self.skip_at, self.steps, self.step_skipped, self.lr = set(skip_at), 0, False, 0.1
        self.backwards = 0

    def grad_leaves(self):
        return None

    def train_step(self, micro_batches, loss_fn, poison=False):
        self.steps += 1
        self.step_skipped = self.steps in self.skip_at
        return float(micro_batches[0].sum())


def loss_fn(module, mb):
    return module(mb).sum()


def batches(n=2):
    return lambda: [torch.ones(1, 2) for _ in range(n)]


def test_selection_record_loss_and_hooks_follow_the_steps():
    opt, engine, seen, progress = Selecting(), Engine(skip_at={3}), [], Progress()
    assert isinstance(opt, SelectsBlocks)
    step = Step(engine, opt, CTX, loss_fn, max_skipped_steps=5)
    last = run(step, batches(), 0, 4, [seen.append], progress)
    assert opt.selections == [0, 2]
    assert [o.step for o in seen] == [1, 2, 3, 4] and last is seen[-1] and progress.step == 4
    assert [o.selected for o in seen] == [True, False, True, False]
    assert [o.forwards for o in seen] == [4, 2, 4, 2]  # the selection pass's forwards counted
    assert [o.skipped for o in seen] == [False, False, True, False]
    assert opt.losses == [2.0, 2.0, 2.0]  # not for the skipped step
    assert step.skipped.total == 1
    assert all(o.seconds >= o.data_wait_s >= 0 and o.lr == 0.1 for o in seen)


def test_resumed_run_numbers_steps_from_start_and_dense_optimizer_gets_no_selection():
    engine, seen = Engine(), []
    run(Step(engine, torch.optim.SGD(engine.module.parameters(), lr=0.1), CTX, loss_fn), batches(1), 5, 7,
        [seen.append])
    assert [(o.step, o.selected, o.forwards) for o in seen] == [(6, False, 1), (7, False, 1)]


def test_too_many_skipped_steps_in_a_row_stop_the_loop_naming_the_step():
    step = Step(Engine(skip_at={2, 3}), Selecting(), CTX, loss_fn, max_skipped_steps=2)
    with pytest.raises(NonFiniteError, match="step 3: 2 steps in a row"):
        run(step, batches(), 0, 10)


def test_a_step_function_of_its_own_runs_in_the_same_loop():
    def zo_like(step, micro_batches):
        return StepOut(step + 1, 0.5, forwards=4 * len(micro_batches), extra={"projected_grad": 1.0})

    seen = []
    run(zo_like, batches(3), 0, 2, [seen.append])
    assert [(o.step, o.forwards, o.extra["projected_grad"]) for o in seen] == [(1, 12, 1.0), (2, 12, 1.0)]


def test_due_every_n_steps_and_at_the_end():
    assert [d for d in range(1, 11) if due(d, 4, 10)] == [4, 8, 10]
    assert [d for d in range(1, 11) if due(d, 0, 10)] == [10]


def test_closing_run_closes_on_error_and_names_the_lost_step():
    closed = []
    progress = Progress()
    with pytest.raises(ValueError):
        with closing_run(CTX, progress) as closing:
            closing.callback(closed.append, "metrics")
            raise ValueError("boom")
    assert closed == ["metrics"]
    two = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    progress.step = 7
    with pytest.raises(RankLostError, match="rank 1 lost at step 7"):
        with closing_run(two, progress) as closing:
            closing.callback(closed.append, "saver")
            raise RuntimeError("Connection closed by peer")
    assert closed == ["metrics", "saver"]
