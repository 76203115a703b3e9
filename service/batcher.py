"""Dynamic batching (the queue / batcher / backend split of text-embeddings-inference).

Requests put their windows (one per (text, policy) pair, more for long texts) on a bounded queue, one group per
request with its windows sorted by length. One background task builds one batch at a time (after at most
``max_wait_ms`` for a batch to fill), taking windows in turns from the waiting requests, one per request per turn,
within ``max_batch_size`` and ``max_batch_tokens`` (padded), requests with shorter windows first so padding stays
small; so a small request is in the next batch even while a huge one is being worked through (fair scheduling: big
requests are split into batches that interleave with the others). Each batch runs on the backend in a worker
thread, so inference never blocks the event loop. Futures are resolved per window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
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


@dataclass
class _Group:
    """One request's windows still waiting, shortest first."""

    items: deque[_Item]
    deadline: float


BatchObserver = Callable[[int, int, float], None]  # (windows, tokens, seconds) of each batch run


class DynamicBatcher:
    def __init__(
        self,
        backend: Backend,
        metrics: Metrics,
        max_batch_size: int = 32,
        max_batch_tokens: int = 8192,
        max_wait_ms: float = 2.0,
        max_queue: int = 2048,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.backend, self.metrics, self.on_batch = backend, metrics, on_batch
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.max_wait_s, self.max_queue = max_wait_ms / 1000.0, max_queue
        self._groups: deque[_Group] = deque()
        self._depth = 0  # windows waiting
        self._tokens = 0  # their tokens
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.batches_run = 0

    @property
    def depth(self) -> int:
        """Windows waiting."""
        return self._depth

    @property
    def full(self) -> bool:
        """No room for even one more window."""
        return self._depth >= self.max_queue

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
        for group in self._groups:
            for item in group.items:
                if not item.future.done():
                    item.future.set_exception(BatcherClosedError("the service is shutting down"))
        self._groups.clear()
        self._depth = self._tokens = 0

    async def score(self, windows: Sequence[Window], deadline: float) -> list[float]:
        """P(unsafe) of each window; raises QueueFullError, DeadlineExceededError or the backend's error."""
        if self._closing:
            raise BatcherClosedError("the service is shutting down")
        if not windows:
            return []
        # A request larger than the whole queue is admitted only into an empty queue (it is bounded by the
        # request limits and by admission), so no request is refused forever.
        if self._depth and self._depth + len(windows) > self.max_queue:
            raise QueueFullError(f"the batch queue is full ({self._depth} windows waiting)")
        loop = asyncio.get_running_loop()
        items = [_Item(w, loop.create_future(), deadline) for w in windows]
        self._groups.append(_Group(deque(sorted(items, key=lambda i: len(i.window))), deadline))
        self._depth += len(items)
        self._tokens += sum(len(w) for w in windows)
        self.metrics.queue_depth.set(self._depth)
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
        backlog_since: float | None = None  # end of the previous batch, if work was already waiting then
        while True:
            if not self._groups:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Give a partly filled batch a moment to fill, measured from the oldest waiting window's arrival.
            oldest = min(g.items[0].enqueued for g in self._groups)
            while not self._batch_full() and not self._closing:
                left = oldest + self.max_wait_s - time.monotonic()
                if left <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), left)
            batch = self._next_batch()
            self.metrics.queue_depth.set(self._depth)
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
                backlog_since = None
                continue
            end = time.monotonic()
            tokens = sum(len(i.window) for i in batch)
            self.metrics.inference_seconds.observe(end - start)
            self.metrics.batch_size.observe(len(batch))
            self.metrics.batch_tokens.observe(len(batch) * max(len(i.window) for i in batch))
            if self.on_batch is not None:
                # While a backlog lasts, the time between batches (the event loop busy elsewhere) counts too: the
                # observer learns what the service really gets through, not just the engine.
                self.on_batch(len(batch), tokens, end - (backlog_since if backlog_since is not None else start))
            backlog_since = end if self._depth else None
            self.batches_run += 1
            for item, score in zip(batch, scores, strict=True):
                if not item.future.done():
                    item.future.set_result(float(score))

    def _batch_full(self) -> bool:
        """Enough is waiting to fill a batch (by count or by tokens): no point waiting for more."""
        return self._depth >= self.max_batch_size or self._tokens >= self.max_batch_tokens

    def _remove(self, item: _Item) -> None:
        self._depth -= 1
        self._tokens -= len(item.window)

    def _next_batch(self) -> list[_Item]:
        """One batch, built in turns: each turn takes the next (shortest remaining) window of every waiting request,
        requests with shorter windows first (so padding stays small), until the size or padded-token budget is
        reached. No request gets a second window in a batch before every request has had one. Windows of requests
        past their deadline fail here; windows whose request gave up (cancelled) are dropped."""
        batch: list[_Item] = []
        width = 0
        while len(batch) < self.max_batch_size:
            self._purge()
            if not self._groups:
                break
            full = False
            for group in sorted(self._groups, key=lambda g: len(g.items[0].window)):
                if len(batch) >= self.max_batch_size:
                    break
                item = group.items[0]
                new_width = max(width, len(item.window))
                if batch and (len(batch) + 1) * new_width > self.max_batch_tokens:
                    full = True
                    break
                self._remove(group.items.popleft())
                batch.append(item)
                width = new_width
            self._groups = deque(g for g in self._groups if g.items)
            if full:
                break
        return batch

    def _purge(self) -> None:
        """Fail the windows of requests past their deadline; drop cancelled windows from the head of each group."""
        now = time.monotonic()
        kept: deque[_Group] = deque()
        for group in self._groups:
            if group.deadline <= now:
                for item in group.items:
                    self._remove(item)
                    if not item.future.done():
                        item.future.set_exception(DeadlineExceededError("the request ran past its deadline"))
                continue
            while group.items and group.items[0].future.done():
                self._remove(group.items.popleft())
            if group.items:
                kept.append(group)
        self._groups = kept
