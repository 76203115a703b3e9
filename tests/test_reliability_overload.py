"""Overload: a flood of 20x the queue size gets only 200s and 429s, the queue never grows past its bound, and memory
stays bounded (no growth from one flood to the next); too many requests in flight get 429 before their body is read."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from pathlib import Path

from service.engine import OnnxEngine
from tests.service_support import SlowEngine, make_settings, running_app

MAX_QUEUE = 8


async def test_flood_of_20x_the_queue_is_bounded(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    slow = SlowEngine(tiny_engine, delay_s=0.02)
    settings = make_settings(
        tiny_model_dir, max_queue=MAX_QUEUE, max_batch_size=4, max_wait_ms=0, cache_max_entries=0, retry_after_s=3
    )
    flood = 20 * MAX_QUEUE
    async with running_app(settings, lambda s: slow) as (app, client):  # type: ignore[arg-type,return-value]
        state = app.state.uniguard
        batcher = state.guard.batcher
        deepest = {"depth": 0}
        gauge = state.metrics.queue_depth
        set_depth = gauge.set

        def watched(value: float) -> None:  # the batcher reports its depth after every admission
            deepest["depth"] = max(deepest["depth"], batcher.depth)
            set_depth(value)

        gauge.set = watched

        async def burst(tag: str) -> list[int]:
            bodies = [{"input": f"{tag} flood request {i}", "policies": ["toxicity"]} for i in range(flood)]
            responses = await asyncio.gather(*(client.post("/classify", json=b) for b in bodies))
            for r in responses:
                if r.status_code == 429:
                    assert r.headers["retry-after"] == "3" and r.json()["error"]["code"] == "overloaded"
            return [r.status_code for r in responses]

        await burst("warm")  # first-use allocations (tokenizer caches, httpx pools) before measuring
        gc.collect()
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            codes = await burst("one")
            gc.collect()
            after_one, peak = tracemalloc.get_traced_memory()
            codes += await burst("two")
            gc.collect()
            after_two, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert set(codes) <= {200, 429}, sorted(set(codes))
        assert codes.count(429) > flood, f"the flood should mostly be refused: {codes.count(429)} x 429"
        assert codes.count(200) >= 2 * MAX_QUEUE // 2, "the queue should keep serving during the flood"
        assert deepest["depth"] <= MAX_QUEUE, f"queue grew to {deepest['depth']} windows (bound {MAX_QUEUE})"
        assert batcher.depth == 0 and state.inflight == 0
        assert state.guard.admission.saturated_for() > 0, "refusals for a full queue count as saturation"
        mib = 1024 * 1024
        # the peak holds the flood's 240 in-flight requests (client and server side); it must not scale with
        # the queue, and nothing may be retained once the flood is over
        assert peak - base < 40 * mib, f"peak grew by {(peak - base) / mib:.1f} MiB"
        assert after_one - base < 2 * mib, f"{(after_one - base) / mib:.1f} MiB retained after a flood"
        assert after_two - after_one < 1 * mib, f"{(after_two - after_one) / mib:.1f} MiB more after a second flood"
        metrics = (await client.get("/metrics")).text
        assert "uniguard_queue_rejected_total" in metrics and "uniguard_queue_depth 0.0" in metrics


async def test_too_many_requests_in_flight_get_429(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    slow = SlowEngine(tiny_engine, delay_s=0.2)
    settings = make_settings(tiny_model_dir, max_inflight_requests=3, max_batch_size=1, max_wait_ms=0)
    async with running_app(settings, lambda s: slow) as (app, client):  # type: ignore[arg-type,return-value]
        bodies = [{"input": f"in flight {i}", "policies": ["toxicity"]} for i in range(10)]
        pending = [asyncio.create_task(client.post("/classify", json=b)) for b in bodies]
        await asyncio.sleep(0.05)
        assert (await client.get("/healthz")).status_code == 200  # probes are never refused
        assert (await client.get("/metrics")).status_code == 200
        responses = await asyncio.gather(*pending)
        codes = [r.status_code for r in responses]
        assert codes.count(200) >= 3 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert "UNIGUARD_MAX_INFLIGHT_REQUESTS" in refused.json()["error"]["message"]
        assert app.state.uniguard.inflight == 0
        assert (await client.post("/classify", json=bodies[0])).status_code == 200
