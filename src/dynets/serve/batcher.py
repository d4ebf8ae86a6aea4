"""Dynamic batching on asyncio: requests wait in a bounded queue; one task forms and runs batches.

  1. `submit` puts a request's samples in the queue, or raises `QueueFull` at once when the
     queue cannot take them (the server answers 503 with Retry-After: never a hang)
  2. the batch task takes the oldest sample and waits until `max_batch_size` samples are queued
     or `max_delay_s` has passed since that sample arrived
  3. `prepare(items)` (on the event loop) fixes each sample's operating point and may fail
     samples whose deadline has already passed
  4. `run(items)` runs in a worker thread, so the event loop keeps accepting requests
  5. each sample's future gets its result (or its own exception); requests await their futures

`close()` stops accepting, finishes the batch in flight, and fails what is still queued with
`ServerClosing` (uvicorn first lets in-flight requests finish, so normally nothing is left).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue has no room; `retry_after_s` is a hint for the client."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServerClosing(Exception):
    """The server is shutting down and takes no new work."""


@dataclass
class Item:
    """One sample of one request, waiting for a batch."""

    x: Any
    future: asyncio.Future
    enqueued: float
    budget_level: int = 0  # the cheapest-allowed level from the request's budget (0 = most accurate)
    deadline: float | None = None  # absolute time.perf_counter() value
    level: int = 0  # set by prepare()
    info: dict[str, Any] = field(default_factory=dict)


class Batcher:
    def __init__(
        self,
        run: Callable[[list[Item]], Sequence[Any]],
        *,
        max_batch_size: int = 32,
        max_delay_s: float = 0.005,
        max_queue: int = 256,
        prepare: Callable[[list[Item], float], list[Item]] | None = None,
        on_batch: Callable[[list[Item], float], None] | None = None,
        retry_hint: Callable[[int], float] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError(
                f"batcher: expected max_batch_size >= 1, max_queue >= 1, max_delay_s >= 0, got "
                f"{max_batch_size}, {max_queue}, {max_delay_s}"
            )
        self.run, self.prepare, self.on_batch = run, prepare, on_batch
        self.max_batch_size, self.max_delay_s, self.max_queue = max_batch_size, max_delay_s, max_queue
        self.retry_hint = retry_hint or (lambda depth: 1.0)
        self.pending: deque[Item] = deque()
        self.in_flight = 0
        self.batches = 0
        self.closing = False
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dynets-infer")

    @property
    def queue_depth(self) -> int:
        """Samples waiting plus samples in the batch being run."""
        return len(self.pending) + self.in_flight

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="dynets-batcher")

    def submit(self, xs: Sequence[Any], **kw: Any) -> list[asyncio.Future]:
        """Queue the samples of one request (all or none); returns one future per sample."""
        if self.closing or self._wake is None:
            raise ServerClosing("the server is shutting down")
        if len(self.pending) + len(xs) > self.max_queue:
            depth = self.queue_depth
            raise QueueFull(
                f"the queue is full ({len(self.pending)} of {self.max_queue} samples waiting, this request "
                f"adds {len(xs)}); retry later",
                self.retry_hint(depth),
            )
        loop, now = asyncio.get_running_loop(), time.perf_counter()
        items = [Item(x, loop.create_future(), now, **kw) for x in xs]
        self.pending.extend(items)
        self._wake.set()
        return [it.future for it in items]

    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while not (self.closing and not self.pending):
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            oldest = self.pending[0].enqueued
            while len(self.pending) < self.max_batch_size and not self.closing:
                left = oldest + self.max_delay_s - time.perf_counter()
                if left <= 0:
                    break
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)
            batch = []
            while self.pending and len(batch) < self.max_batch_size:
                it = self.pending.popleft()
                if not it.future.done():  # a cancelled request (client went away) costs nothing
                    batch.append(it)
            if not batch:
                continue
            now = time.perf_counter()
            if self.prepare is not None:
                batch = self.prepare(batch, now)  # may answer some items itself (deadline passed)
            if not batch:
                continue
            self.in_flight = len(batch)
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.run, batch)
            except Exception as e:  # run() answers per item; this is a bug, but no request may hang
                results = [e] * len(batch)
            elapsed = time.perf_counter() - start
            self.in_flight = 0
            self.batches += 1
            for it, r in zip(batch, results):
                if it.future.done():
                    continue
                if isinstance(r, BaseException):
                    it.future.set_exception(r)
                else:
                    it.future.set_result(r)
            if self.on_batch is not None:
                self.on_batch(batch, elapsed)

    async def close(self, timeout_s: float = 30.0) -> None:
        """Stop accepting, finish the batch in flight, fail anything still queued."""
        self.closing = True
        leftover = list(self.pending)
        self.pending.clear()
        for it in leftover:
            if not it.future.done():
                it.future.set_exception(ServerClosing("the server shut down before this request ran"))
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout_s)
            except asyncio.TimeoutError:
                self._task.cancel()
        self._executor.shutdown(wait=True)
