"""Verdict-score cache: in-process LRU by default, Redis when UNIGUARD_REDIS_URL is set.

Keys are sha256(model id, policy content hash, sha256(text)); values are the score and the best window's span.
The prompt text never appears in a key or a value. Thresholds are applied after the cache.
A Redis failure never fails a request: the lookup counts as a miss, the error is counted, and Redis is left alone
for a growing back-off (a small circuit breaker) before the next attempt.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from service.metrics import Metrics

log = logging.getLogger("uniguard.cache")


@dataclass(frozen=True)
class CachedScore:
    score: float
    char_start: int
    char_end: int

    def encode(self) -> str:
        return f"{self.score!r},{self.char_start},{self.char_end}"

    @classmethod
    def decode(cls, raw: str | bytes) -> CachedScore:
        text = raw.decode() if isinstance(raw, bytes) else raw
        score, start, end = text.split(",")
        return cls(float(score), int(start), int(end))


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(model_id: str, policy_hash: str, text_digest: str) -> str:
    return hashlib.sha256(f"{model_id}\x00{policy_hash}\x00{text_digest}".encode()).hexdigest()


class ScoreCache(Protocol):
    backend: str

    async def get_many(self, keys: Sequence[str]) -> list[CachedScore | None]: ...

    async def set_many(self, items: Sequence[tuple[str, CachedScore]]) -> None: ...

    async def close(self) -> None: ...


class NullCache:
    backend = "none"

    async def get_many(self, keys: Sequence[str]) -> list[CachedScore | None]:
        return [None] * len(keys)

    async def set_many(self, items: Sequence[tuple[str, CachedScore]]) -> None:
        return None

    async def close(self) -> None:
        return None


class LRUCache:
    """A bounded in-process LRU with TTL."""

    backend = "memory"

    def __init__(self, max_entries: int, ttl_s: float, metrics: Metrics) -> None:
        self.max_entries, self.ttl_s, self.metrics = max_entries, ttl_s, metrics
        self._data: OrderedDict[str, tuple[float, CachedScore]] = OrderedDict()

    async def get_many(self, keys: Sequence[str]) -> list[CachedScore | None]:
        now = time.monotonic()
        out: list[CachedScore | None] = []
        for key in keys:
            item = self._data.get(key)
            if item is None or item[0] < now:
                if item is not None:
                    del self._data[key]
                out.append(None)
                continue
            self._data.move_to_end(key)
            out.append(item[1])
        return out

    async def set_many(self, items: Sequence[tuple[str, CachedScore]]) -> None:
        expires = time.monotonic() + self.ttl_s
        for key, value in items:
            self._data[key] = (expires, value)
            self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    async def close(self) -> None:
        self._data.clear()


class RedisCache:
    """Redis (redis.asyncio): one MGET per lookup batch, one pipeline per write batch, TTL on every key."""

    backend = "redis"

    def __init__(
        self, url: str, ttl_s: int, prefix: str, metrics: Metrics, timeout_s: float = 0.25, backoff_max_s: float = 30.0
    ) -> None:
        import redis.asyncio as aioredis

        self.url, self.ttl_s, self.prefix, self.metrics = url, ttl_s, prefix, metrics
        self.backoff_min_s, self.backoff_max_s = 0.5, backoff_max_s
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
        )

    @property
    def available(self) -> bool:
        """False while the breaker is open (Redis failed recently and its back-off has not run out)."""
        return time.monotonic() >= self._retry_at

    def _failed(self, exc: Exception, op: str) -> None:
        self.metrics.cache_errors.labels(self.backend).inc()
        self._backoff_s = min(self.backoff_max_s, max(self.backoff_min_s, self._backoff_s * 2))
        self._retry_at = time.monotonic() + self._backoff_s
        log.warning(
            "redis %s failed (%s); going on without the cache, retrying in %.1fs",
            op,
            type(exc).__name__,
            self._backoff_s,
        )

    def _ok(self) -> None:
        if self._backoff_s:
            log.info("redis is back")
        self._backoff_s = 0.0

    async def get_many(self, keys: Sequence[str]) -> list[CachedScore | None]:
        if not keys:
            return []
        if not self.available:
            self.metrics.cache_bypassed.labels(self.backend).inc(len(keys))
            return [None] * len(keys)
        try:
            raw = await self.client.mget([self.prefix + k for k in keys])
        except Exception as exc:  # any Redis/network failure: go on without the cache
            self._failed(exc, "get")
            return [None] * len(keys)
        self._ok()
        out: list[CachedScore | None] = []
        for value in raw:
            try:
                out.append(CachedScore.decode(value) if value is not None else None)
            except ValueError:
                out.append(None)
        return out

    async def set_many(self, items: Sequence[tuple[str, CachedScore]]) -> None:
        if not items or not self.available:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, value in items:
                    pipe.set(self.prefix + key, value.encode(), ex=self.ttl_s)
                await pipe.execute()
        except Exception as exc:
            self._failed(exc, "set")
            return
        self._ok()

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a dead connection is not an error worth reporting
            await self.client.aclose()


def make_cache(
    redis_url: str,
    ttl_s: int,
    max_entries: int,
    prefix: str,
    metrics: Metrics,
    timeout_s: float = 0.25,
    backoff_max_s: float = 30.0,
) -> ScoreCache:
    if redis_url:
        return RedisCache(redis_url, ttl_s, prefix, metrics, timeout_s, backoff_max_s)
    if max_entries <= 0:
        return NullCache()
    return LRUCache(max_entries, ttl_s, metrics)
