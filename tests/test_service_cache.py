"""The verdict cache: in-process LRU, the real Redis on this machine, and a Redis that dies mid-test."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.cache import CachedScore, LRUCache
from service.engine import OnnxEngine
from service.localserver import free_port
from service.metrics import Metrics
from tests.service_support import make_settings, running_app

SECRET = "my secret prompt about zanzibar pineapples"


def _start_redis(port: int, folder: Path) -> None:
    subprocess.run(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "yes",
            "--dir",
            str(folder),
            "--pidfile",
            str(folder / "redis.pid"),
            "--logfile",
            str(folder / "redis.log"),
        ],
        check=True,
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            if client.ping():
                return
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError(f"private redis-server on port {port} did not start")


def _stop_redis(port: int) -> None:
    subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True, timeout=10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server of our own on a random port (so we may stop it), shut down afterwards."""
    assert shutil.which("redis-server"), "redis-server is required (make redis installs it)"
    port = free_port()
    _start_redis(port, tmp_path)
    yield port
    _stop_redis(port)


async def test_lru_cache_hit_after_miss(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    async with running_app(make_settings(tiny_model_dir), lambda s: tiny_engine) as (_app, client):
        body = {"input": [SECRET, "another one"], "policies": ["toxicity", "tax_advice"]}
        first = (await client.post("/classify", json=body)).json()
        second = (await client.post("/classify", json=body)).json()
        assert second["usage"]["tokens"] == 0 and first["usage"]["tokens"] > 0
        for a, b in zip(first["results"], second["results"], strict=True):
            for name in body["policies"]:
                assert a["policies"][name]["cached"] is False and b["policies"][name]["cached"] is True
                assert a["policies"][name]["score"] == b["policies"][name]["score"]
        mixed = (await client.post("/classify", json={**body, "input": [SECRET, "brand new"]})).json()
        assert [r["policies"]["toxicity"]["cached"] for r in mixed["results"]] == [True, False]


async def test_lru_is_bounded() -> None:
    cache = LRUCache(max_entries=3, ttl_s=60, metrics=Metrics())
    await cache.set_many([(str(i), CachedScore(0.5, 0, 1)) for i in range(5)])
    assert len(cache) == 3
    assert await cache.get_many(["0", "4"]) == [None, CachedScore(0.5, 0, 1)]


async def test_redis_cache_hit_after_miss_without_prompt_text(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    prefix = f"uniguard-test:{uuid.uuid4().hex}:"
    settings = make_settings(
        tiny_model_dir, redis_url="redis://127.0.0.1:6379/0", cache_key_prefix=prefix, cache_ttl_seconds=120
    )
    body = {"input": SECRET, "policies": ["toxicity", "prompt_injection"]}
    client_redis = redis.Redis(host="127.0.0.1", port=6379, db=0)
    try:
        async with running_app(settings, lambda s: tiny_engine) as (_app, client):
            first = (await client.post("/classify", json=body)).json()
        # a second app (another replica) shares the verdicts through Redis
        async with running_app(settings, lambda s: tiny_engine) as (_app, client):
            second = (await client.post("/classify", json=body)).json()
            metrics = (await client.get("/metrics")).text
        assert all(not v["cached"] for v in first["results"][0]["policies"].values())
        assert all(v["cached"] for v in second["results"][0]["policies"].values())
        for name in body["policies"]:
            assert first["results"][0]["policies"][name]["score"] == second["results"][0]["policies"][name]["score"]
        assert 'uniguard_cache_hits_total{backend="redis"} 2.0' in metrics
        keys = list(client_redis.scan_iter(match=prefix + "*"))
        assert len(keys) == 2
        for key in keys:
            value = client_redis.get(key) or b""
            assert b"zanzibar" not in key.lower() and b"zanzibar" not in value.lower()
            assert SECRET.encode() not in key and SECRET.encode() not in value
            assert 0 < client_redis.ttl(key) <= 120
    finally:
        for key in client_redis.scan_iter(match=prefix + "*"):
            client_redis.delete(key)
        client_redis.close()


async def test_redis_outage_never_fails_requests_and_recovers(
    tiny_model_dir: Path, tiny_engine: OnnxEngine, private_redis: int, tmp_path: Path
) -> None:
    port = private_redis
    settings = make_settings(
        tiny_model_dir, redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.2, redis_backoff_max_s=0.3
    )
    body = {"input": SECRET, "policies": ["toxicity"]}

    def cached(resp: dict) -> bool:
        return bool(resp["results"][0]["policies"]["toxicity"]["cached"])

    async with running_app(settings, lambda s: tiny_engine) as (_app, client):
        r1 = (await client.post("/classify", json=body)).json()
        r2 = (await client.post("/classify", json=body)).json()
        assert not cached(r1) and cached(r2)

        _stop_redis(port)  # Redis dies mid-test
        for _ in range(3):
            r = await client.post("/classify", json=body)
            assert r.status_code == 200 and not cached(r.json())
            assert (
                abs(
                    r.json()["results"][0]["policies"]["toxicity"]["score"]
                    - r1["results"][0]["policies"]["toxicity"]["score"]
                )
                < 1e-9
            )
        metrics = (await client.get("/metrics")).text
        assert 'uniguard_cache_errors_total{backend="redis"}' in metrics
        errors = float(metrics.split('uniguard_cache_errors_total{backend="redis"} ')[1].split()[0])
        assert 1.0 <= errors < 6, "the breaker should stop hammering a dead Redis"

        _start_redis(port, tmp_path)  # Redis is back (empty): the service reconnects after its back-off
        await asyncio.sleep(0.4)
        r3 = (await client.post("/classify", json=body)).json()
        r4 = (await client.post("/classify", json=body)).json()
        assert not cached(r3) and cached(r4)
