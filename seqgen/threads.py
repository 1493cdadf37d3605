"""Torch's intra-op threads in a process where more than one thread runs torch ops (`seqgen serve`).

With the OpenMP backend every thread that runs a parallel op becomes the master of its own OpenMP team, whose
worker threads stay alive. Once a process holds more such threads than there are cores, libgomp stops letting
idle workers spin between parallel regions (its "throttled" spin count), so every op wakes a sleeping thread.
Many small ops are what a beam search is, and the server had three masters (the main thread that loaded the
models, the decoding thread, the request thread pool that decodes uploads): the same beam search ran ~20%
slower in the decoding thread than in a process's only thread, and a 160 x 512 tanh 5x slower
(docs/performance.md, "One OpenMP team").

So a server gives the cores to one thread: every other thread runs its ops on one thread (no team, no workers),
and the decoding thread gets `n`. torch applies its process-wide default to a thread at that thread's first
parallel op and keeps it, so the order matters; `serial_except` below does it in that order.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def use_threads_here(n: int) -> None:
    """Run the calling thread's torch ops on `n` intra-op threads from now on; threads that have not run a
    parallel op yet take `n` as their default too (until the next call)."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    torch.get_num_threads()   # fixes this thread's setting now, before another thread changes the default


def serial_except(start: Callable[[Callable[[], None]], T], n: int) -> T:
    """Give `n` threads to the one thread `start` starts and one to every other thread, this one included.

    start(on_start) must start the thread, have it call on_start() first, and return only after it has (as
    `seqgen.serve.batcher.Batcher(on_start=...)` does); serial_except returns what start returned.
    """
    use_threads_here(1)
    started = start(lambda: use_threads_here(n))
    use_threads_here(1)   # the started thread made n the default; threads started from now on get one again
    return started


__all__ = ["serial_except", "use_threads_here"]
