"""The edge middlewares one by one (pure ASGI, around a stub app), and cost-aware admission on its own."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from service.admission import Admission, estimate_tokens
from service.config import Settings
from service.errors import ServiceError
from service.metrics import Metrics
from service.middleware import ApiKeyAuth, BodyGuard, RequestContext
from service.security import hash_key
from service.state import AppState
from tests.service_support import make_settings


def _scope(path: str = "/classify", method: str = "POST", headers: dict[str, str] | None = None) -> dict[str, Any]:
    hs = {"content-type": "application/json", **(headers or {})}
    return {
        "type": "http",
        "path": path,
        "method": method,
        "headers": [(k.encode(), v.encode()) for k, v in hs.items()],
    }


async def _call(app: Any, scope: dict[str, Any], chunks: list[bytes | None]) -> tuple[int, dict[str, str], bytes]:
    """Run ``app``; ``chunks`` are the body pieces (None = the client stalls forever)."""
    pending = list(chunks)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not pending:
            await asyncio.sleep(3600)
        chunk = pending.pop(0)
        if chunk is None:
            await asyncio.sleep(3600)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], headers, body


class ReadsBody:
    """A stub app: reads the whole body, records the in-flight count it saw, answers 200."""

    def __init__(self, state: AppState | None = None) -> None:
        self.state, self.inflight_seen = state, -1

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from service.errors import BodyError, error_response

        try:
            while True:
                message = await receive()
                if not message.get("more_body"):
                    break
        except BodyError as exc:  # what FastAPI's handler does with it
            await error_response(exc.status_code, exc.code, str(exc.detail), headers=dict(exc.headers or {}))(
                scope, receive, send
            )
            return
        if self.state is not None:
            self.inflight_seen = self.state.inflight
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _state(tmp_path: Path, **overrides: Any) -> AppState:
    return AppState.create(make_settings(tmp_path, **overrides))


async def test_body_guard_counts_in_flight_only_once_the_body_is_read(tmp_path: Path) -> None:
    state = _state(tmp_path, body_timeout_s=0.2, max_inflight_requests=1)
    app = ReadsBody(state)
    guard = BodyGuard(app, state)
    # a stalled body holds no in-flight slot, and gets 408 with the connection closed once the deadline passes
    stalled = asyncio.create_task(_call(guard, _scope(), [b'{"inp', None]))
    await asyncio.sleep(0.05)
    assert state.inflight == 0
    started = time.monotonic()
    status, headers, body = await stalled
    assert status == 408 and headers["connection"] == "close" and b"request_timeout" in body
    assert time.monotonic() - started < 0.3
    assert "uniguard_client_timeouts_total 1.0" in state.metrics.render().decode()

    # a body that trickles in (a byte every 50 ms, forever) meets the same deadline: it is for the whole body
    async def trickle() -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b" ", "more_body": True}

    sent: list[dict[str, Any]] = []

    async def record(message: dict[str, Any]) -> None:
        sent.append(message)

    started = time.monotonic()
    await guard(_scope(), trickle, record)
    assert sent[0]["status"] == 408 and time.monotonic() - started < 0.35
    # a complete body is counted while the app handles it, and released after
    status, _, _ = await _call(guard, _scope(), [b'{"input":', b' "hi"}'])
    assert status == 200 and app.inflight_seen == 1 and state.inflight == 0
    # the limit applies when the body is in: one slot, taken by a request in progress -> 429
    state.inflight = 1
    status, headers, body = await _call(guard, _scope(), [b"{}"])
    assert status == 429 and headers["retry-after"] == "1" and b"overloaded" in body
    state.inflight = 0


async def test_body_guard_checks_type_size_and_utf8(tmp_path: Path) -> None:
    state = _state(tmp_path, max_body_bytes=1024)
    guard = BodyGuard(ReadsBody(state), state)
    assert (await _call(guard, _scope(headers={"content-type": "text/plain"}), [b"{}"]))[0] == 415
    assert (await _call(guard, _scope(headers={"content-length": "5000"}), [b"{}"]))[0] == 413
    assert (await _call(guard, _scope(), [b"x" * 600, b"x" * 600]))[0] == 413  # cut while streaming
    status, _, body = await _call(guard, _scope(), [b'{"input": "\xff"}'])
    assert status == 400 and b"invalid_utf8" in body
    assert state.inflight == 0


async def test_api_key_auth_and_admin_gate(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, api_key_hashes=[hash_key("k1")], admin_key_hashes=[hash_key("adm")])
    auth = ApiKeyAuth(ReadsBody(), settings, Metrics())
    bearer = {"authorization": "Bearer k1"}
    assert (await _call(auth, _scope(), [b"{}"]))[0] == 401
    assert (await _call(auth, _scope(headers=bearer), [b"{}"]))[0] == 200
    assert (await _call(auth, _scope("/healthz", "GET"), [b""]))[0] == 200  # a public probe
    assert (await _call(auth, _scope("/admin/reload-policies", headers=bearer), [b""]))[0] == 401
    admin = {"authorization": "Bearer adm"}
    assert (await _call(auth, _scope("/admin/reload-policies", headers=admin), [b""]))[0] == 200
    closed = ApiKeyAuth(ReadsBody(), make_settings(tmp_path), Metrics())
    status, _, body = await _call(closed, _scope("/admin/reload-policies"), [b""])
    assert status == 404 and b"admin_disabled" in body


async def test_request_context_sets_an_id_and_logs_a_cut_path(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    app = RequestContext(ReadsBody(), metrics)
    long_path = "/classify/" + "a" * 10_000
    with caplog.at_level(logging.INFO, logger="uniguard.access"):
        status, headers, _ = await _call(app, _scope(long_path, headers={"x-request-id": "abc-1"}), [b"{}"])
    assert status == 200 and headers["x-request-id"] == "abc-1"
    record = next(r for r in caplog.records if r.name == "uniguard.access")
    logged = record.__dict__["path"]
    assert len(logged) < 250 and logged.startswith("/classify/aaa") and "10010 chars" in logged
    assert 'uniguard_requests_total{endpoint="unmatched",method="POST",status="200"} 1.0' in metrics.render().decode()


def _admission(**overrides: Any) -> Admission:
    settings = Settings(config_file=None, request_timeout_s=2.0, admission_budget_fraction=0.5, **overrides)
    admission = Admission(settings, Metrics())
    admission.set_speed(1000.0, learn=False)  # budget = 1000 tokens/s x 2 s x 0.5 = 1000 tokens
    return admission


def test_admission_refuses_by_cost_at_once() -> None:
    admission = _admission()
    assert admission.budget == 1000
    with pytest.raises(ServiceError) as too_big:
        admission.admit(1001)
    assert too_big.value.status == 413 and too_big.value.code == "request_too_costly"
    first = admission.admit(600)
    with pytest.raises(ServiceError) as busy:
        admission.admit(600)
    assert busy.value.status == 429 and int(busy.value.headers["Retry-After"]) >= 1
    small = admission.admit(300)  # a small one still fits beside the first
    admission.resize(small, 200)  # the exact cost is smaller: fine
    assert admission.outstanding == 800
    with pytest.raises(ServiceError):
        admission.resize(small, 500)  # the exact cost no longer fits
    admission.release(small)
    admission.release(first)
    admission.release(first)  # twice is harmless
    assert admission.outstanding == 0
    assert admission.admit(1000).cost == 1000  # alone, the whole budget is fine


def test_admission_saturation_and_learning() -> None:
    admission = _admission()
    assert admission.saturated_for() == 0.0
    ticket = admission.admit(950)  # over the high-water mark
    time.sleep(0.05)
    assert admission.saturated_for() >= 0.04
    admission.release(ticket)
    admission.last_refused = -1e9
    assert admission.saturated_for() == 0.0
    learner = _admission()
    learner.learn = True
    learner.observe_batch(8, 4000, 1.0)  # the engine turns out faster
    assert 1000 < learner.tokens_per_s < 4000
    faster = learner.tokens_per_s
    for _ in range(30):
        learner.observe_batch(1, 100, 1.0)  # then much slower, e.g. with the cores shared: the budget follows
    assert learner.tokens_per_s < 0.2 * faster and learner.budget < 200


def test_cost_estimate_grows_with_windows() -> None:
    short = estimate_tokens(200, 60, 256)
    assert short < 256
    long = estimate_tokens(200, 20_000, 256)
    assert long >= 20_000 / 3 and long % 256 == 0


def test_every_error_code_is_documented_with_an_example() -> None:
    """Each error code the service can answer has a row in docs/SERVICE.md's table, and each row an example."""
    import ast

    root = Path(__file__).resolve().parent.parent
    codes = set()
    for path in (root / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = getattr(node, "func", None)
            called = getattr(name, "id", getattr(name, "attr", ""))
            is_error = isinstance(node, ast.Call) and called in ("ServiceError", "error_response", "BodyError")
            if is_error and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                codes.add(node.args[1].value)
            if isinstance(node, ast.Call) and called == "raw_error" and isinstance(node.args[2], ast.Constant):
                codes.add(node.args[2].value)  # answered by the HTTP protocol, before the app runs
    assert {"request_too_costly", "request_timeout", "headers_too_large", "admin_disabled", "saturated"} <= codes
    doc = (root / "docs" / "SERVICE.md").read_text(encoding="utf-8")
    table = doc[doc.index("| Status | `error.code` |") : doc.index("## Admission")]
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2:5].isdigit()]
    for code in sorted(codes):
        row = next((r for r in rows if f"`{code}`" in r.split("|")[2]), None)
        assert row is not None, f"error code {code} is not in docs/SERVICE.md's table"
        assert "→" in row.split("|")[4], f"the row of {code} has no example"
