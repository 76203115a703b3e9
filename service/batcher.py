"""Dynamic batching (the queue / batcher / backend split of text-embeddings-inference).

Requests put their windows (one per (text, policy) pair, more for long texts) on a bounded queue. One background
task takes everything waiting (after at most ``max_wait_ms`` for more to arrive), sorts it by length so padding stays
small, cuts it into batches by ``max_batch_size`` and ``max_batch_tokens`` (padded), and runs each batch on the
backend in a worker thread, so inference never blocks the event loop. Futures are resolved per window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from policies.instruction import Window
from service.metrics import Metrics

log = logging.getLogger("uniguard.batcher")


class Backend(Protocol):
    def infer(self, windows: Sequence[Window]) -> np.ndarray: ...


class QueueFullError(RuntimeError):
    """The queue has no room for this request's windows."""


class DeadlineExceededError(RuntimeError):
    """The request's deadline passed before its windows were scored."""


class BatcherClosedError(RuntimeError):
    """The batcher is shutting down."""


@dataclass
class _Item:
    window: Window
    future: asyncio.Future[float]
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    def __init__(
        self,
        backend: Backend,
        metrics: Metrics,
        max_batch_size: int = 32,
        max_batch_tokens: int = 8192,
        max_wait_ms: float = 2.0,
        max_queue: int = 2048,
    ) -> None:
        self.backend, self.metrics = backend, metrics
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.max_wait_s, self.max_queue = max_wait_ms / 1000.0, max_queue
        self._queue: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.batches_run = 0

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def full(self) -> bool:
        """No room for even one more window."""
        return len(self._queue) >= self.max_queue

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="uniguard-batcher")

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        """Stop accepting work, finish what is queued (up to the timeout), then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_timeout_s)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(BatcherClosedError("the service is shutting down"))
        self._queue.clear()

    async def score(self, windows: Sequence[Window], deadline: float) -> list[float]:
        """P(unsafe) of each window; raises QueueFullError, DeadlineExceededError or the backend's error."""
        if self._closing:
            raise BatcherClosedError("the service is shutting down")
        if not windows:
            return []
        # A request larger than the whole queue is admitted only into an empty queue (it is bounded by the
        # request limits), so no request is refused forever.
        if self._queue and len(self._queue) + len(windows) > self.max_queue:
            raise QueueFullError(f"the batch queue is full ({len(self._queue)} windows waiting)")
        loop = asyncio.get_running_loop()
        items = [_Item(w, loop.create_future(), deadline) for w in windows]
        self._queue.extend(items)
        self.metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()
        remaining = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(remaining, 0.0)):
                return list(await asyncio.gather(*(i.future for i in items)))
        except TimeoutError:
            raise DeadlineExceededError("the request ran past its deadline") from None
        finally:
            for item in items:  # the batcher skips cancelled items
                if not item.future.done():
                    item.future.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Give a partly filled batch a moment to fill, measured from the oldest item's arrival.
            oldest = self._queue[0].enqueued
            while len(self._queue) < self.max_batch_size and not self._closing:
                left = oldest + self.max_wait_s - time.monotonic()
                if left <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), left)
            pool = list(self._queue)
            self._queue.clear()
            self.metrics.queue_depth.set(0)
            now = time.monotonic()
            live: list[_Item] = []
            for item in pool:
                if item.future.done():
                    continue
                if item.deadline <= now:
                    item.future.set_exception(DeadlineExceededError("the request ran past its deadline"))
                    continue
                live.append(item)
            for batch in self._cut(live):
                batch = [i for i in batch if not i.future.done()]
                if not batch:
                    continue
                start = time.monotonic()
                for item in batch:
                    self.metrics.queue_wait.observe(start - item.enqueued)
                try:
                    scores = await loop.run_in_executor(None, self.backend.infer, [i.window for i in batch])
                except Exception as exc:  # the backend failed: every request in the batch gets the error
                    log.error("inference failed for a batch of %d: %s", len(batch), exc)
                    for item in batch:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                self.metrics.inference_seconds.observe(time.monotonic() - start)
                self.metrics.batch_size.observe(len(batch))
                self.metrics.batch_tokens.observe(len(batch) * max(len(i.window) for i in batch))
                self.batches_run += 1
                for item, score in zip(batch, scores, strict=True):
                    if not item.future.done():
                        item.future.set_result(float(score))
                self.metrics.queue_depth.set(len(self._queue))

    def _cut(self, items: list[_Item]) -> list[list[_Item]]:
        """Sort by length and cut into batches within the size and padded-token budgets."""
        items = sorted(items, key=lambda i: len(i.window))
        batches: list[list[_Item]] = []
        current: list[_Item] = []
        for item in items:
            width = len(item.window)  # sorted, so the newest item is the longest
            if current and (
                len(current) + 1 > self.max_batch_size or (len(current) + 1) * width > self.max_batch_tokens
            ):
                batches.append(current)
                current = []
            current.append(item)
        if current:
            batches.append(current)
        return batches
