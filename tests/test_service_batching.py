"""Dynamic batching across concurrent requests, the bounded queue (429) and the per-request deadline (504)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from policies.instruction import Window
from policies.registry import PolicyRegistry
from service.batcher import DynamicBatcher
from service.engine import OnnxEngine
from service.metrics import Metrics
from tests.service_support import SlowEngine, make_settings, running_app

REGISTRY = PolicyRegistry.load()
NAMES = REGISTRY.names


async def test_concurrent_requests_are_batched_and_identical_to_unbatched(
    tiny_model_dir: Path, tiny_engine: OnnxEngine
) -> None:
    long_text = " ".join(f"paragraph {i} about shipping schedules and delays." for i in range(40))
    requests = [
        {
            "input": [f"request {i}: please help me with task {i * 7}", long_text if i % 4 == 0 else f"short {i}"],
            "policies": NAMES[: 1 + i % len(NAMES)],
        }
        for i in range(12)
    ]
    settings = make_settings(tiny_model_dir, cache_max_entries=0, max_wait_ms=50, max_batch_size=64)
    async with running_app(settings, lambda s: tiny_engine) as (app, client):
        batcher = app.state.uniguard.guard.batcher
        before = batcher.batches_run
        responses = await asyncio.gather(*(client.post("/classify", json=r) for r in requests))
        batches = batcher.batches_run - before
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert batches < len(requests), f"{batches} model calls for {len(requests)} concurrent requests: not batched"
    for req, resp in zip(requests, responses, strict=True):
        for text, result in zip(req["input"], resp.json()["results"], strict=True):
            for name in req["policies"]:
                (alone,) = tiny_engine.score_pairs([(REGISTRY[name].instruction_text(), text)], batch_size=1)
                got = result["policies"][name]
                assert abs(got["score"] - alone.score) < 1e-5, (name, text[:30])
                assert got["cached"] is False


async def test_full_queue_answers_429_with_retry_after(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    slow = SlowEngine(tiny_engine, delay_s=0.3)
    settings = make_settings(
        tiny_model_dir, max_queue=4, max_batch_size=2, max_wait_ms=0, cache_max_entries=0, retry_after_s=2
    )
    async with running_app(settings, lambda s: slow) as (app, client):  # type: ignore[arg-type,return-value]
        body = {"input": "are you there?", "policies": ["toxicity", "tax_advice"]}
        responses = await asyncio.gather(*(client.post("/classify", json=body) for _ in range(10)))
        codes = [r.status_code for r in responses]
        assert 429 in codes and 200 in codes, codes
        assert set(codes) <= {200, 429}
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "2"
                assert r.json()["error"]["code"] == "overloaded" and "results" not in r.json()
        assert app.state.uniguard.guard.batcher.depth == 0
        metrics = (await client.get("/metrics")).text
        assert f"uniguard_queue_rejected_total {codes.count(429)}.0" in metrics
        assert (await client.post("/classify", json=body)).status_code == 200  # recovers


async def test_deadline_gives_504_never_a_verdict(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    slow = SlowEngine(tiny_engine, delay_s=0.5)
    settings = make_settings(tiny_model_dir, request_timeout_s=0.15, cache_max_entries=0, warmup_batches=0)
    async with running_app(settings, lambda s: slow) as (_app, client):  # type: ignore[arg-type,return-value]
        r = await client.post("/classify", json={"input": "hello", "policies": ["toxicity"]})
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "deadline_exceeded" and "results" not in r.json()
        assert "uniguard_deadline_exceeded_total 1.0" in (await client.get("/metrics")).text


def _window(n: int) -> Window:
    return Window(input_ids=[1] * n, token_type_ids=[0] * n, char_start=0, char_end=n)


async def test_batches_are_sorted_and_cut_by_size_and_token_budget() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.batches: list[list[int]] = []

        def infer(self, windows: list[Window]):  # type: ignore[no-untyped-def]
            import numpy as np

            self.batches.append([len(w) for w in windows])
            return np.full(len(windows), 0.25)

    backend = Recorder()
    batcher = DynamicBatcher(backend, Metrics(), max_batch_size=4, max_batch_tokens=100, max_wait_ms=20, max_queue=64)
    batcher.start()
    lengths = [30, 5, 10, 50, 7, 8, 9, 6, 40, 20]
    scores = await asyncio.gather(*(batcher.score([_window(n)], time.monotonic() + 5) for n in lengths))
    await batcher.close()
    assert scores == [[0.25]] * len(lengths)
    flat = [n for b in backend.batches for n in b]
    assert sorted(flat) == sorted(lengths)
    assert flat == sorted(flat), "windows run shortest first"
    for b in backend.batches:
        assert len(b) <= 4 and (len(b) == 1 or len(b) * max(b) <= 100), backend.batches
    assert len(backend.batches) < len(lengths)
