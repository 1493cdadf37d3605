"""Data-parallel training under torchrun: which process this is, its device, and the few collectives the
Trainer needs.

    torchrun --nproc_per_node 2 -m seqgen.cli train lm --text input.txt --out runs/lm

torchrun starts one process per device and tells each who it is in the environment (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT). `setup` reads that, picks the process's device (GPU
LOCAL_RANK, or the CPU) and opens the process group with the backend that device needs (nccl for CUDA,
gloo for the CPU). Without torchrun (or with one process) it returns a world of one and nothing else
changes. The only state is torch.distributed's own process group; `entry_point` closes a group its
function opened.

What the Trainer does with it (seqgen/train.py): the model is wrapped in DistributedDataParallel, every
process trains on its share of each global step's batches (`seqgen.data.batching.shard_positions`), and
process 0 alone writes checkpoints, metrics.jsonl, logs and progress bars and runs validation.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as tdist

from seqgen.errors import SeqgenError

T = TypeVar("T")

# Process 0 validates and writes checkpoints while the others wait for it in a collective: a long
# validation (beam search over a large set on a CPU) must not time them out.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run; world 1 is a plain single-process run.

    rank: 0 .. world-1 (0 writes the files); local_rank: its index on this machine (its GPU);
    device: where its model and batches live.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of `values` over all processes (float64: exact for counts below 2**53)."""
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: T) -> T:
        """Process 0's `obj` on every process (pickled: only between this run's own processes)."""
        if self.world == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def all_gather(self, obj: T) -> list[T]:
        """Every process's `obj`, in rank order."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait until every process gets here (an all-reduce on this process's device: the right backend)."""
        self.all_sum([0.0])

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on process 0 first and on the others once it has finished: for work whose result
        the others then reuse from disk (a feature cache), instead of every process racing to write it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


@dataclass(frozen=True)
class LaunchInfo:
    """What torchrun put in the environment (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1


def launch_info(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (set by torchrun) from `env` (os.environ)."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        info = LaunchInfo(rank=int(env.get("RANK", "0")), world=world, local_rank=int(env.get("LOCAL_RANK", "0")),
                          local_world=int(env.get("LOCAL_WORLD_SIZE", str(world))))
    except ValueError:
        raise SeqgenError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers (they are set by "
                          "torchrun)") from None
    if info.world < 1 or not 0 <= info.rank < info.world or not 0 <= info.local_rank < max(info.local_world, 1):
        raise SeqgenError(f"inconsistent torchrun environment: RANK={info.rank} WORLD_SIZE={info.world} "
                          f"LOCAL_RANK={info.local_rank} LOCAL_WORLD_SIZE={info.local_world}")
    return info


def choose_device(name: str, *, local_rank: int = 0, local_world: int = 1, cuda_count: int = 0) -> torch.device:
    """The device of a process for `--device name`, given the GPUs it can see (a pure function: unit-tested).

    auto: GPU `local_rank` when there are GPUs, else the CPU.  cuda: GPU `local_rank` (one process per GPU).
    cuda:N: that GPU, in a single process per machine only (several processes on one GPU would collide).
    """
    if name == "auto":
        name = "cuda" if cuda_count > 0 else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SeqgenError(f"--device: unknown device {name!r} (use auto, cpu, cuda, cuda:N)") from None
    if device.type != "cuda":
        return device
    if cuda_count == 0:
        raise SeqgenError(f"--device {name}: no CUDA GPU is available on this machine")
    if device.index is not None and local_world > 1:
        raise SeqgenError(f"--device {name}: with {local_world} processes per machine each uses the GPU of its "
                          f"LOCAL_RANK; use --device cuda (or auto)")
    index = local_rank if device.index is None else device.index
    if index >= cuda_count:
        why = (f"process {local_rank} of {local_world} on this machine" if device.index is None
               else f"--device {name}")
        raise SeqgenError(f"{why} needs GPU {index}, but this machine has {cuda_count}; start at most "
                          f"{cuda_count} processes per machine (--nproc_per_node)")
    return torch.device("cuda", index)


def backend_for(device: torch.device) -> str:
    """The process-group backend for tensors on `device`: nccl between GPUs, gloo between CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def resolve_device(name: str) -> torch.device:
    """`--device` of a single process (inference commands): auto = the first GPU if any, else the CPU."""
    return choose_device(name, cuda_count=torch.cuda.device_count())


def setup(device_name: str) -> Distributed:
    """This process's `Distributed`: under torchrun with more than one process, the device of its LOCAL_RANK
    and an open process group (opened here unless the caller already has one); otherwise a world of one
    on `device_name`. Calling it again returns the same answer."""
    info = launch_info()
    if info.world == 1 and not tdist.is_initialized():
        return Distributed(device=resolve_device(device_name))
    device = choose_device(device_name, local_rank=info.local_rank, local_world=info.local_world,
                           cuda_count=torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend_for(device), timeout=COLLECTIVE_TIMEOUT,
                                 device_id=device if device.type == "cuda" else None)
    return Distributed(rank=tdist.get_rank(), world=tdist.get_world_size(), local_rank=info.local_rank,
                       device=device)


def share_cpu_cores(dist: Distributed) -> None:
    """The processes of a torchrun on one machine share its cores: each runs at most cores // processes torch
    threads (torchrun sets OMP_NUM_THREADS=1 unless told otherwise; a launch without it would start one thread
    per core in each process, and they would spin against each other). No effect on a GPU or alone."""
    if dist.world == 1 or dist.device.type != "cpu":
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(min(torch.get_num_threads(), max(1, cores // launch_info().local_world)))


def entry_point(train_fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator for a task's train_* function: a process group that `setup` opens while it runs is closed
    when it returns or raises, so that the function runs unchanged under torchrun, once per process."""

    @functools.wraps(train_fn)
    def run(*args, **kwargs) -> T:
        opened_here = not tdist.is_initialized()
        try:
            return train_fn(*args, **kwargs)
        finally:
            if opened_here and tdist.is_initialized():
                tdist.destroy_process_group()

    return run


def is_main_process() -> bool:
    """True in a single process and in process 0 of a torchrun run (the one that prints results)."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank() == 0
    return launch_info().rank == 0
