"""One place that starts the process group and says who we are (rank, world size, device).

Launchers and what they leave in the environment:
  deepspeed launcher / torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
  mpirun (OpenMPI/MPICH):       OMPI_COMM_WORLD_* / PMI_*; DeepSpeed's MPI discovery (mpi4py) fills the rest
  plain python:                 nothing; we run as a world of one
On CPU the communication backend is gloo, on GPU nccl (DeepSpeed's accelerator picks it).
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from scaletrain.distributed.wire import Wire


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_launcher() -> bool:
    return "RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ


def resolve_backend(requested: str) -> str:
    """'auto' means deepspeed under any launcher and single under plain python."""
    if requested != "auto":
        return requested
    return "deepspeed" if launched_by_launcher() else "single"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_deepspeed_shm_allreduce() -> None:
    """DeepSpeed's CPU backend builds a shared-memory all-reduce (used only by its inference
    all-reduce) whose /dev/shm buffers, ~66 MB per rank, are never unlinked: every CPU run leaks
    them until /dev/shm fills and processes are OOM-killed (deepspeedai/DeepSpeed#4115). We reduce
    through torch.distributed, so we mark the op unavailable before DeepSpeed's backend starts."""
    import deepspeed.ops

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(backend: str, timeout_s: float = 600.0) -> DistContext:
    """Start the process group the backend needs and pick this rank's device. timeout_s: how
    long a collective waits for the other ranks before it raises."""
    if backend == "single":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("backend 'single' runs one process; under a multi-rank launcher "
                             "use --backend deepspeed")
    else:
        if not launched_by_launcher():  # plain python: a world of one, so collectives still work
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        import deepspeed  # imported late: it is slow to import and prints on import

        skip_deepspeed_shm_allreduce()
        deepspeed.init_distributed(dist_backend=_comm_backend(), auto_mpi_discovery=True,
                                   verbose=False, timeout=timedelta(seconds=timeout_s))
    _share_cpu_threads()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def _share_cpu_threads() -> None:
    """Ranks on one host split its cores; N ranks x all-cores threads only thrash."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _comm_backend() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().communication_backend_name()


# the run's own scalar collectives (loss means, finiteness flags, evaluation sums), counted apart
# from the optimizer's: every tensor collective of ours goes through a Wire
SCALARS = Wire()


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    if ctx.world_size == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_coll_device(ctx))
    SCALARS.all_reduce(t)
    return t.item() / ctx.world_size


def all_reduce_max(value: float, ctx: DistContext) -> float:
    if ctx.world_size == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_coll_device(ctx))
    SCALARS.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    if ctx.world_size == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_coll_device(ctx))
    SCALARS.all_reduce(t)
    return t.tolist()


def _coll_device(ctx: DistContext) -> torch.device:
    return ctx.device  # nccl needs CUDA tensors, gloo CPU ones: the rank's device fits both


def shutdown(clean: bool = True) -> None:
    """clean: every rank got here together, so a barrier first (none tears down while another still
    sends); after an error no collective, since a peer may be gone."""
    if not dist.is_initialized():
        return
    try:
        if clean:
            dist.barrier()
        dist.destroy_process_group()
    except Exception as e:  # never mask the error that ended the run
        logging.getLogger("scaletrain").warning("process group shutdown: %s", e)


# What gloo's and NCCL's errors say when a peer process died or stopped answering (gloo raises a
# plain RuntimeError; NCCL a DistBackendError).
PEER_FAILURE_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                      "Timed out", "timed out", "Socket Timeout", "NCCL communicator was aborted")


def is_peer_failure(error: BaseException) -> bool:
    """Whether a collective failed because another rank is gone or did not answer in time."""
    return isinstance(error, dist.DistError) or any(s in str(error) for s in PEER_FAILURE_SIGNS)


def lost_rank_message(ctx: DistContext, step: int, error: BaseException) -> str:
    """'rank R lost at step S': at two ranks the peer is known; beyond, only who noticed is."""
    who = f"rank {1 - ctx.rank}" if ctx.world_size == 2 else "a peer rank"
    where = f"step {step}" if step else "start-up"
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return (f"{who} lost at {where} (rank {ctx.rank} of {ctx.world_size} noticed: {first_line}); "
            f"check that rank's log, then --resume auto")
