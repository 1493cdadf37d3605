"""Request batching: concurrent requests for one model and one set of decoding options become one search.

Requests arrive from the server's event loop (`submit`, awaitable) and wait in one queue. A single worker
thread owns the models (PyTorch already uses every core inside one search, so a second decoding thread would
only fight the first): it takes the oldest waiting request, waits for more requests with the same key (model,
task, decoding options) while they keep arriving (a pause of `quiet` ends the wait, and so does `max_wait`), and
hands up to `max_batch` of them to `run(key, items)` — one batched search. Both waits count from the later of the
last arrival (the oldest, for `max_wait`) and the moment the previous batch was answered: the clients just
answered are the likeliest next arrivals, and a batch started without them splits a steady load into smaller
batches that keep alternating (docs/performance.md, "One OpenMP team"). Requests are served oldest first across
keys, so one never waits behind more than the requests that arrived before it, and each search is bounded (at
most `max_batch` items, each within the server's size limits). A full queue refuses new requests at once
(`QueueFull`: the server answers 503).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence


class QueueFull(Exception):
    """More requests are waiting than the server accepts; retry later."""


@dataclass
class _Pending:
    key: Hashable
    item: Any
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """run(key, items) -> one result per item (same order); an exception fails every item of that batch."""

    def __init__(self, run: Callable[[Hashable, Sequence[Any]], Sequence[Any]], *, max_batch: int = 32,
                 max_wait: float = 0.05, quiet: float = 0.003, max_queue: int = 256,
                 on_start: Callable[[], None] | None = None):
        """on_start: called first in the worker thread (seqgen.threads gives it the cores); the constructor
        returns after it has run, and raises what it raised."""
        self.run, self.max_batch, self.max_wait, self.max_queue = run, max_batch, max_wait, max_queue
        self.quiet = min(quiet, max_wait)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.searches = 0            # batches run so far (tests and /health read it)
        self.items = 0               # requests answered so far
        self._answered = 0.0         # when the last batch was answered (monotonic)
        self.busy = 0.0              # seconds spent inside run() so far: the worker's share of a load test's time
        self._on_start, self._started, self._start_error = on_start, threading.Event(), None
        self._thread = threading.Thread(target=self._work, name="seqgen-batcher", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def submit_future(self, key: Hashable, item: Any) -> concurrent.futures.Future:
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (the limit is {self.max_queue})")
            pending = _Pending(key, item)
            self._queue.append(pending)
            self._cond.notify()
        return pending.future

    async def submit(self, key: Hashable, item: Any) -> Any:
        """Queue one item and wait for its result; a cancelled caller (client gone) drops it if not started."""
        future = self.submit_future(key, item)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # -- the worker thread ------------------------------------------------------------------------------
    def _take(self) -> list[_Pending] | None:
        """The next batch: the oldest request and up to max_batch - 1 later ones with its key."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            key = self._queue[0].key
            deadline = max(self._queue[0].arrived, self._answered) + self.max_wait
            while True:
                same = [p for p in self._queue if p.key == key]
                now = time.monotonic()
                # go when the batch is full, the oldest has waited max_wait, or arrivals have paused for
                # `quiet`: a lone request starts at once, a burst of concurrent ones is gathered whole, and
                # requests that waited through the last search wait for its answered clients too (bounded)
                quiet_until = max(same[-1].arrived, self._answered) + self.quiet
                if len(same) >= self.max_batch or now >= deadline or now >= quiet_until or self._closed:
                    break
                self._cond.wait(timeout=min(deadline, quiet_until) - now)
            batch, rest = [], collections.deque()
            for p in self._queue:
                (batch if p.key == key and len(batch) < self.max_batch else rest).append(p)
            self._queue = rest
        # A request whose client went away is not decoded.
        return [p for p in batch if p.future.set_running_or_notify_cancel()]

    def _work(self) -> None:
        try:
            if self._on_start is not None:
                self._on_start()
        except BaseException as e:  # noqa: BLE001 — handed to the constructor, which raises it
            self._start_error = e
            return
        finally:
            self._started.set()
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            started, error = time.perf_counter(), None
            try:
                results = self.run(batch[0].key, [p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
            except BaseException as e:  # noqa: BLE001 — every waiting request must hear about it
                error = e
            # counted before anyone is answered, so a client that reads /health after its answer sees its search
            self.busy += time.perf_counter() - started
            self.searches += 1
            self.items += len(batch)
            for i, p in enumerate(batch):
                if error is not None:
                    p.future.set_exception(error)
                else:
                    p.future.set_result(results[i])
            self._answered = time.monotonic()
