"""Micro-batching of concurrent requests onto one model thread.

Requests arriving within ``max_wait_s`` of the first one of a batch are run together, up to
``max_rows`` rows (a job's size is its number of rows: samples or continuations; a job larger
than ``max_rows`` runs alone). Batches run one after another on a single worker thread, which
is also where every other model operation (loading, adapters) runs, so the event loop never
blocks on the model and the model is never used from two threads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

JobT = TypeVar("JobT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class BatchedResult(Generic[ResultT]):
    value: ResultT
    queue_s: float
    compute_s: float
    batch_jobs: int


@dataclass
class _Pending(Generic[JobT, ResultT]):
    job: JobT
    size: int
    future: asyncio.Future[BatchedResult[ResultT]]
    enqueued: float


class QueueFullError(Exception):
    """More rows are waiting than the batcher holds; ``retry_after_s`` estimates when there is room."""

    def __init__(self, queued_rows: int, retry_after_s: float):
        super().__init__(f"{queued_rows} rows are already waiting for the model")
        self.queued_rows, self.retry_after_s = queued_rows, retry_after_s


class MicroBatcher(Generic[JobT, ResultT]):
    """Collects jobs submitted from the event loop and runs them in batches on ``executor``.

    ``run_batch(jobs)`` returns one result or one exception per job, in order; an exception is
    raised to that job's submitter only. At most ``max_queued_rows`` rows wait (besides the batch
    running): a job beyond that is refused at once with :class:`QueueFullError` rather than
    queued for minutes, so a client backs off instead of a server's memory growing.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[JobT]], Sequence[ResultT | Exception]],
        executor: ThreadPoolExecutor,
        size: Callable[[JobT], int],
        max_rows: int,
        max_wait_s: float,
        max_queued_rows: int | None = None,
    ):
        if max_rows < 1 or max_wait_s < 0 or (max_queued_rows is not None and max_queued_rows < 1):
            raise ValueError("max_rows and max_queued_rows must be >= 1 and max_wait_s >= 0")
        self._run_batch, self._executor, self._size = run_batch, executor, size
        self.max_rows, self.max_wait_s, self.max_queued_rows = max_rows, max_wait_s, max_queued_rows
        self.queued_rows = 0
        self._last_batch_s = 1.0
        self._queue: asyncio.Queue[_Pending[JobT, ResultT]] = asyncio.Queue()
        self._carry: _Pending[JobT, ResultT] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def submit(self, job: JobT) -> BatchedResult[ResultT]:
        if self._task is None:
            raise RuntimeError("the batcher is not running")
        size = self._size(job)
        if self.max_queued_rows is not None and self.queued_rows > 0 and self.queued_rows + size > self.max_queued_rows:
            # Batches ahead of this job, each about as long as the last one was.
            raise QueueFullError(self.queued_rows, (self.queued_rows / self.max_rows + 1) * self._last_batch_s)
        future: asyncio.Future[BatchedResult[ResultT]] = asyncio.get_running_loop().create_future()
        self.queued_rows += size
        await self._queue.put(_Pending(job, size, future, time.perf_counter()))
        return await future

    async def _next_batch(self) -> list[_Pending[JobT, ResultT]]:
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        batch, rows = [first], first.size
        deadline = time.perf_counter() + self.max_wait_s
        while rows < self.max_rows:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(
                    self._queue.get(), remaining)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if rows + item.size > self.max_rows:
                self._carry = item  # first of the next batch
                break
            batch.append(item)
            rows += item.size
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            self.queued_rows -= sum(p.size for p in batch)
            batch = [p for p in batch if not p.future.cancelled()]  # clients that went away
            if not batch:
                continue
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self._run_batch, [p.job for p in batch])
            except Exception as exc:  # the whole batch failed: every submitter gets the error
                outputs = [exc] * len(batch)
            compute_s = self._last_batch_s = time.perf_counter() - started
            log.debug("ran a batch of %d jobs (%d rows) in %.3fs", len(batch), sum(p.size for p in batch), compute_s)
            for pending, output in zip(batch, outputs, strict=True):
                if pending.future.done():
                    continue
                if isinstance(output, Exception):
                    pending.future.set_exception(output)
                else:
                    pending.future.set_result(
                        BatchedResult(output, started - pending.enqueued, compute_s, len(batch))
                    )
