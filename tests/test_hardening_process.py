"""Issue 17 against real `uniguard serve` processes: slow clients (stalled bodies and headers), cost-aware admission
(413/429 at once), fair scheduling (a small request next to a huge one), readiness under saturation, strict
request types, and /docs without a network. The figures are printed (pytest -s) for docs/RESULTS.md."""

from __future__ import annotations

import contextlib
import re
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtests.flood import closed_after, open_stalled
from service.localserver import HOST, LocalServer

STALLED = 600
BODY_TIMEOUT_S = 2.0
HEADER_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def guarded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """One server for the slow-client, admission, readiness, strictness and docs checks. The engine speed is fixed
    so the admission budget is known: 40,000 tokens/s x 2 s deadline x 0.5 = 40,000 model tokens."""
    settings = {
        "UNIGUARD_REDIS_URL": "",
        "UNIGUARD_WARMUP_BATCHES": "1",
        "UNIGUARD_LOG_LEVEL": "warning",
        "UNIGUARD_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "UNIGUARD_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "UNIGUARD_ENGINE_TOKENS_PER_S": "40000",
        "UNIGUARD_REQUEST_TIMEOUT_S": "2",
        "UNIGUARD_READINESS_GRACE_S": "0.5",
        "UNIGUARD_CACHE_MAX_ENTRIES": "0",
        "UNIGUARD_KEEP_ALIVE_TIMEOUT_S": "1",
    }
    log = tmp_path_factory.mktemp("guarded") / "serve.log"
    with LocalServer(tiny_model_dir, settings=settings, log_path=log, inherit_settings=False) as server:
        yield server


def test_stalled_bodies_and_headers_neither_lock_out_nor_linger(guarded: LocalServer) -> None:
    stalled_body = (
        b"POST /classify HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"input":'  # 9 bytes of a declared 1000, then nothing
    )
    started = time.monotonic()
    bodies = open_stalled(guarded.port, STALLED, stalled_body)
    headers = open_stalled(guarded.port, 50, b"POST /classify HTTP/1.1\r\nHost: loc")  # slowloris: headers never end
    opened = time.monotonic() - started

    t0 = time.monotonic()
    r = httpx.post(guarded.url + "/classify", json={"input": "hello there", "policies": ["toxicity"]}, timeout=2)
    normal_s = time.monotonic() - t0
    assert r.status_code == 200 and normal_s < 2.0, (r.status_code, normal_s)
    assert httpx.get(guarded.url + "/policies", timeout=2).status_code == 200

    closed, replies = closed_after(bodies + headers, started, timeout_s=BODY_TIMEOUT_S + opened + 5)
    assert len(closed) == STALLED + 50, f"only {len(closed)} of {STALLED + 50} stalled sockets were closed"
    slack = 1.5
    assert max(closed) <= opened + max(BODY_TIMEOUT_S, HEADER_TIMEOUT_S) + slack, max(closed)
    assert all(reply.startswith(b"HTTP/1.1 408") for reply in replies), {reply[:40] for reply in replies}
    assert all(b"request_timeout" in reply for reply in replies)
    metrics = guarded.metrics()
    assert metrics["uniguard_client_timeouts_total"] >= STALLED
    assert metrics["uniguard_inflight_requests"] == 0
    print(
        f"\n{STALLED} stalled-body + 50 stalled-header sockets (opened in {opened:.2f} s): /classify answered 200 in "
        f"{normal_s * 1000:.0f} ms; all closed with 408 after {min(closed):.2f}-{max(closed):.2f} s "
        f"(deadlines {BODY_TIMEOUT_S:g} s / {HEADER_TIMEOUT_S:g} s)"
    )


def test_oversized_headers_are_refused_without_buffering_them(guarded: LocalServer) -> None:
    from loadtests.common import rss_bytes

    before = rss_bytes(guarded.pid)
    sock = socket.create_connection((HOST, guarded.port), timeout=5)
    sent = 0
    with contextlib.suppress(OSError):  # the server closes the connection while we send
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        for _ in range(200):  # up to 16 MB of headers
            sock.sendall((b"X-Pad: " + b"a" * 8000 + b"\r\n") * 10)
            sent += 80_000
    reply = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            reply += chunk
    sock.close()
    assert reply.startswith(b"HTTP/1.1 431") and b"headers_too_large" in reply, reply[:200]
    assert sent < 4_000_000, f"the server read {sent} bytes of headers before refusing"
    assert rss_bytes(guarded.pid) - before < 20_000_000
    assert httpx.get(guarded.url + "/healthz").status_code == 200


def test_idle_keep_alive_connections_are_closed(guarded: LocalServer) -> None:
    sock = socket.create_connection((HOST, guarded.port), timeout=5)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    reply = b""
    while not reply.endswith(b"}"):  # the whole response (its JSON body ends the stream)
        reply += sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200") and b"connection: close" not in reply.lower()  # kept alive ...
    started = time.monotonic()
    sock.settimeout(5)
    assert sock.recv(65536) == b""  # ... until it has been idle for UNIGUARD_KEEP_ALIVE_TIMEOUT_S
    assert time.monotonic() - started < 3
    sock.close()


def test_costly_requests_are_refused_at_once_and_types_are_strict(guarded: LocalServer) -> None:
    huge = {"input": [f"{i} " + "lorem ipsum dolor " * 830 for i in range(64)]}  # 64 x 15k characters, 5 policies
    with httpx.Client(base_url=guarded.url, timeout=10) as client:
        client.post("/classify", json={"input": "warm"})  # the connection and the code paths are warm
        timings = []
        for _ in range(3):
            t0 = time.monotonic()
            r = client.post("/classify", json=huge)
            timings.append(time.monotonic() - t0)
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_costly", r.text[:300]
        assert min(timings) < 0.1, timings
        # strict types: no coercion of booleans or strings into thresholds
        for value in (True, "0.5"):
            r = client.post(
                "/classify", json={"input": "hi", "policies": ["toxicity"], "thresholds": {"toxicity": value}}
            )
            assert r.status_code == 422 and r.json()["error"]["field"] == "thresholds.toxicity", r.text
    print(f"\n917 KB request (64 x 15k chars x 5 policies): 413 in {min(timings) * 1000:.1f} ms (best of 3)")


def test_readyz_turns_503_while_saturated_and_200_after(guarded: LocalServer) -> None:
    # each request: 4 texts x ~1000 characters x 5 policies, about 28k estimated tokens of a 40k budget: two at once
    # do not fit, so concurrent senders get 429s and the service is saturated
    body = {"input": [f"{i} " + "the quick brown fox jumps " * 40 for i in range(4)]}
    stop = threading.Event()
    statuses: list[int] = []

    def send() -> None:
        with httpx.Client(base_url=guarded.url, timeout=10) as c:
            while not stop.is_set():
                statuses.append(c.post("/classify", json=body).status_code)

    assert httpx.get(guarded.url + "/readyz").status_code == 200
    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    ready_codes = []
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            r = httpx.get(guarded.url + "/readyz", timeout=2)
            ready_codes.append(r.status_code)
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "saturated", r.text
                break
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert 503 in ready_codes, (ready_codes[-5:], sorted(set(statuses)))
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}, sorted(set(statuses))
    t0 = time.monotonic()
    while httpx.get(guarded.url + "/readyz").status_code != 200:
        assert time.monotonic() - t0 < 10, "/readyz stayed 503 after the load stopped"
        time.sleep(0.1)
    assert httpx.get(guarded.url + "/healthz").status_code == 200
    print(f"\n/readyz 503 under saturation, 200 again {time.monotonic() - t0:.2f} s after the load stopped")


def test_docs_are_served_without_a_network(guarded: LocalServer) -> None:
    for page in ("/docs", "/redoc"):
        html = httpx.get(guarded.url + page).text
        urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*["']([^"']+)["']""", html)
        assert urls, html[:500]
        assert not re.search(r"https?://|//[a-z]", html.replace("http://www.w3.org", "")), "external reference"
        for url in urls:
            r = httpx.get(guarded.url + url)
            assert r.status_code == 200 and len(r.content) > 100, (page, url, r.status_code)
    assert httpx.get(guarded.url + "/openapi.json").json()["info"]["title"] == "UniGuard"


def test_small_request_is_not_stuck_behind_a_huge_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A one-text request sent while a 64-text x 5-policy request runs is answered within 2x its idle latency, both
    measured here (medians). The machine's 2 cores are shared with other jobs, whose bursts can slow one round; the
    check passes if one of three rounds (each with its own idle measurement) holds."""
    settings = {
        "UNIGUARD_REDIS_URL": "",
        "UNIGUARD_WARMUP_BATCHES": "1",
        "UNIGUARD_LOG_LEVEL": "warning",
        "UNIGUARD_REQUEST_TIMEOUT_S": "60",
        "UNIGUARD_CACHE_MAX_ENTRIES": "0",
        "UNIGUARD_INTRA_OP_THREADS": "1",
        # the tiny test model runs a window in under a millisecond; batches of ~2 ms keep the same proportion to
        # a request's latency as the default 50 ms does on the real model
        "UNIGUARD_BATCH_TARGET_MS": "2",
    }
    small = {"input": "Is this a small request?", "policies": ["toxicity"]}
    huge = {"input": [f"{i} " + "lorem ipsum dolor sit amet " * 120 for i in range(64)]}  # 64 x 3k chars x 5 policies
    server = LocalServer(tiny_model_dir, settings=settings, log_path=tmp_path / "serve.log", inherit_settings=False)
    rounds: list[tuple[float, list[float]]] = []
    with server as srv, httpx.Client(base_url=srv.url, timeout=60) as client:

        def latency() -> float:
            t0 = time.monotonic()
            r = client.post("/classify", json={**small, "input": f"{small['input']} {time.monotonic()}"})
            assert r.status_code == 200, r.text
            return time.monotonic() - t0

        for _ in range(5):
            latency()
        for _ in range(3):
            idle = statistics.median(latency() for _ in range(15))
            done: dict[str, float] = {}

            def send_huge(done: dict[str, float] = done) -> None:
                with httpx.Client(base_url=srv.url, timeout=60) as c:
                    r = c.post("/classify", json=huge)
                    done["status"], done["at"] = r.status_code, time.monotonic()

            thread = threading.Thread(target=send_huge)
            thread.start()
            while srv.metrics().get("uniguard_queue_depth", 0) < 100:  # the huge request's windows are queued
                assert thread.is_alive(), done
                time.sleep(0.02)
            busy = [latency() for _ in range(9)]
            measured_at = time.monotonic()
            thread.join(60)
            assert done.get("status") == 200, done
            assert done["at"] > measured_at, "the huge request finished before the small ones were measured"
            rounds.append((idle, busy))
            if statistics.median(busy) <= 2 * idle:
                break
    idle, busy = rounds[-1]
    assert statistics.median(busy) <= 2 * idle, [
        (round(i * 1000, 1), round(statistics.median(b) * 1000, 1)) for i, b in rounds
    ]
    print(
        f"\nsmall request idle p50 {idle * 1000:.1f} ms; while a huge one runs: "
        f"p50 {statistics.median(busy) * 1000:.1f} ms, max {max(busy) * 1000:.1f} ms (round {len(rounds)} of 3)"
    )
