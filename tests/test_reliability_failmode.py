"""Fail mode: by default an engine error, a deadline or a not-ready service is an error, never 'safe'; a fail-open
server answers 'safe' verdicts marked failed-open and reports it in the response."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from policies.instruction import Window
from service.engine import OnnxEngine
from service.schemas import ClassifyResponse, ErrorResponse
from tests.service_support import GatedFactory, SlowEngine, make_settings, running_app

BODY = {"input": ["first text", "second text"], "policies": ["toxicity", "tax_advice"]}


class BrokenEngine:
    """A real engine whose inference fails (after warm-up): the model cannot score."""

    def __init__(self, inner: OnnxEngine) -> None:
        self._inner = inner
        self.broken = False

    def infer(self, windows: Sequence[Window]) -> np.ndarray:
        if self.broken:
            raise RuntimeError("onnxruntime exploded")
        return self._inner.infer(windows)

    def warmup(self, batches: int = 3) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _assert_failed_open(body: dict, reason: str, model: str | None) -> None:
    response = ClassifyResponse.model_validate(body)
    assert response.degraded is True and response.fail_mode == "open" and response.degraded_reason == reason
    assert response.model == model
    assert len(response.results) == len(BODY["input"])
    for result in response.results:
        assert result.flagged is False
        assert list(result.policies) == BODY["policies"]
        for verdict in result.policies.values():
            assert verdict.verdict == "safe" and verdict.score is None and verdict.fail_open is True
            assert verdict.cached is False


def _assert_error(r: Any, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert ErrorResponse.model_validate(r.json()).error.code == code
    assert "results" not in r.json() and "safe" not in r.text


async def test_engine_error_fails_closed_by_default(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> None:
    broken = BrokenEngine(tiny_engine)
    settings = make_settings(tiny_model_dir, cache_max_entries=0)
    async with running_app(settings, lambda s: broken) as (_app, client):  # type: ignore[arg-type,return-value]
        ok = await client.post("/classify", json=BODY)
        assert ok.status_code == 200 and ok.json()["fail_mode"] == "closed" and ok.json()["degraded"] is False
        assert all(v["fail_open"] is False for r in ok.json()["results"] for v in r["policies"].values())
        broken.broken = True
        _assert_error(await client.post("/classify", json=BODY), 503, "inference_failed")


async def test_engine_error_deadline_and_not_ready_fail_open_when_configured(
    tiny_model_dir: Path, tiny_engine: OnnxEngine
) -> None:
    broken = BrokenEngine(tiny_engine)
    settings = make_settings(tiny_model_dir, cache_max_entries=0, fail_mode="open")
    async with running_app(settings, lambda s: broken) as (_app, client):  # type: ignore[arg-type,return-value]
        ok = (await client.post("/classify", json=BODY)).json()
        assert ok["fail_mode"] == "open" and ok["degraded"] is False
        assert all(isinstance(v["score"], float) for r in ok["results"] for v in r["policies"].values())
        broken.broken = True
        r = await client.post("/classify", json=BODY)
        assert r.status_code == 200, r.text
        _assert_failed_open(r.json(), "inference_failed", tiny_engine.model_id)
        # a caller may ask for the stricter mode on a fail-open server
        _assert_error(await client.post("/classify", json={**BODY, "fail_mode": "closed"}), 503, "inference_failed")
        # bad input is still an error in fail-open mode
        r = await client.post("/classify", json={**BODY, "policies": ["nope_policy"]})
        assert r.status_code == 422
        metrics = (await client.get("/metrics")).text
        assert 'uniguard_fail_open_total{reason="inference_failed"} 1.0' in metrics

    slow = SlowEngine(tiny_engine, delay_s=0.6)
    settings = make_settings(tiny_model_dir, cache_max_entries=0, request_timeout_s=0.2, warmup_batches=0)
    async with running_app(settings, lambda s: slow) as (_app, client):  # type: ignore[arg-type,return-value]
        _assert_error(await client.post("/classify", json=BODY), 504, "deadline_exceeded")
    async with running_app(
        settings.model_copy(update={"fail_mode": "open"}),
        lambda s: slow,  # type: ignore[arg-type,return-value]
    ) as (_app, client):
        r = await client.post("/classify", json=BODY)
        assert r.status_code == 200 and r.json()["latency_ms"] < 500, r.text
        _assert_failed_open(r.json(), "deadline_exceeded", tiny_engine.model_id)

    gated = GatedFactory(tiny_engine)
    async with running_app(make_settings(tiny_model_dir, fail_mode="open"), gated, wait_ready=False) as (app, client):
        r = await client.post("/classify", json=BODY)
        assert r.status_code == 200
        _assert_failed_open(r.json(), "not_ready", None)
        _assert_error(await client.post("/classify", json={**BODY, "fail_mode": "closed"}), 503, "not_ready")
        gated.release()
        await asyncio.wait_for(asyncio.shield(app.state.loader), 30)
        r = await client.post("/classify", json=BODY)
        assert r.status_code == 200 and r.json()["degraded"] is False


async def test_not_ready_fails_closed_and_a_full_queue_is_429_in_both_modes(
    tiny_model_dir: Path, tiny_engine: OnnxEngine
) -> None:
    gated = GatedFactory(tiny_engine)
    async with running_app(make_settings(tiny_model_dir), gated, wait_ready=False) as (_app, client):
        _assert_error(await client.post("/classify", json=BODY), 503, "not_ready")
        gated.release()
    slow = SlowEngine(tiny_engine, delay_s=0.3)
    for mode in ("closed", "open"):
        settings = make_settings(
            tiny_model_dir, fail_mode=mode, max_queue=2, max_batch_size=1, max_wait_ms=0, cache_max_entries=0
        )
        async with running_app(settings, lambda s: slow) as (_app, client):  # type: ignore[arg-type,return-value]
            body = {"input": "one text", "policies": ["toxicity"]}
            responses = await asyncio.gather(*(client.post("/classify", json=body) for _ in range(8)))
            codes = sorted(r.status_code for r in responses)
            assert 429 in codes and set(codes) <= {200, 429}, (mode, codes)
            assert all(r.json()["degraded"] is False for r in responses if r.status_code == 200)
