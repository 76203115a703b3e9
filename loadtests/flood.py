"""The attacks of issue 17 against a real `uniguard serve` on localhost, with the figures for docs/RESULTS.md and
docs/SECURITY.md: stalled bodies and headers, a request too costly for the deadline, a burst of concurrent
requests, readiness under saturation, lax types, a long path, deeply nested JSON, the admin endpoint.

    python -m loadtests.flood --model models/uniguard-minilm --out runs/flood

Only localhost; every step is bounded in count and time. Prints a Markdown table, writes flood.json and flood.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import selectors
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from service.localserver import HOST, LocalServer

log = logging.getLogger("uniguard.flood")


def open_stalled(port: int, count: int, payload: bytes) -> list[socket.socket]:
    """``count`` connections that send ``payload`` (an unfinished request) and then nothing."""
    socks = []
    for _ in range(count):
        s = socket.create_connection((HOST, port), timeout=5)
        s.sendall(payload)
        s.setblocking(False)
        socks.append(s)
    return socks


def closed_after(socks: list[socket.socket], started: float, timeout_s: float) -> tuple[list[float], list[bytes]]:
    """Seconds from ``started`` until the server closed each socket, and what each received before (then closes
    them all)."""
    selector = selectors.DefaultSelector()
    received = {s.fileno(): b"" for s in socks}
    for s in socks:
        selector.register(s, selectors.EVENT_READ)
    closed: list[float] = []
    deadline = time.monotonic() + timeout_s
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            if data:
                received[sock.fileno()] += data
                continue
            closed.append(time.monotonic() - started)
            selector.unregister(sock)
    for s in socks:
        s.close()
    return closed, list(received.values())


def _timed(client: httpx.Client, method: str, path: str, **kwargs: Any) -> tuple[int, float, httpx.Response]:
    t0 = time.monotonic()
    r = client.request(method, path, **kwargs)
    return r.status_code, (time.monotonic() - t0) * 1000, r


def slow_clients(server: LocalServer, count: int, body_timeout_s: float) -> dict[str, Any]:
    body = b'POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"in'
    started = time.monotonic()
    socks = open_stalled(server.port, count, body) + open_stalled(
        server.port, 50, b"POST /classify HTTP/1.1\r\nHost: x"
    )
    opened = time.monotonic() - started
    with httpx.Client(base_url=server.url, timeout=30) as client:
        status, ms, _ = _timed(client, "POST", "/classify", json={"input": "Is this fine?", "policies": ["toxicity"]})
        policies, _, _ = _timed(client, "GET", "/policies")
    closed, replies = closed_after(socks, started, timeout_s=body_timeout_s + opened + 10)
    lines = {reply.split(b"\r\n", 1)[0] for reply in replies}
    return {
        "stalled_body_sockets": count,
        "stalled_header_sockets": 50,
        "opened_s": round(opened, 2),
        "classify_status": status,
        "classify_ms": round(ms, 1),
        "policies_status": policies,
        "closed": len(closed),
        "closed_after_s": [round(min(closed), 2), round(max(closed), 2)] if closed else None,
        "first_lines": sorted(line.decode("latin-1") for line in lines),
    }


def costly(server: LocalServer) -> dict[str, Any]:
    huge = {"input": [f"{i} " + "lorem ipsum dolor " * 830 for i in range(64)]}  # 917 KB: 64 x 15k characters
    with httpx.Client(base_url=server.url, timeout=60) as client:
        status, ms, r = _timed(client, "POST", "/classify", json=huge)
        small, small_ms, _ = _timed(client, "POST", "/classify", json={"input": "hello", "policies": ["toxicity"]})
    return {
        "body_kb": round(len(json.dumps(huge)) / 1000),
        "status": status,
        "ms": round(ms, 1),
        "code": r.json().get("error", {}).get("code"),
        "small_after_status": small,
        "small_after_ms": round(small_ms, 1),
    }


def burst(server: LocalServer, count: int) -> dict[str, Any]:
    """``count`` concurrent 2-text requests (unique texts: no cache), with /readyz polled meanwhile."""
    ready: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server.url, timeout=5) as c:
            while not stop.is_set():
                ready.append(c.get("/readyz").status_code)
                time.sleep(0.1)

    def one(i: int) -> tuple[int, float]:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            body = {"input": [f"Burst request {i}: is this prompt fine?", f"Second text of request {i}."]}
            status, ms, _ = _timed(c, "POST", "/classify", json=body)
            return status, ms

    poller = threading.Thread(target=poll)
    poller.start()
    started = time.monotonic()
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(one, range(count)))
    wall = time.monotonic() - started
    time.sleep(0.5)
    back = time.monotonic()
    while httpx.get(server.url + "/readyz", timeout=5).status_code != 200 and time.monotonic() - back < 30:
        time.sleep(0.1)
    ready_again_s = time.monotonic() - back
    stop.set()
    poller.join(10)
    by_status: dict[str, Any] = {}
    for status in sorted({s for s, _ in results}):
        ms = [m for s, m in results if s == status]
        by_status[str(status)] = {
            "count": len(ms),
            "p50_ms": round(statistics.median(ms), 1),
            "max_ms": round(max(ms), 1),
        }
    return {
        "requests": count,
        "wall_s": round(wall, 2),
        "by_status": by_status,
        "readyz_503_seen": 503 in ready,
        "readyz_200_again_after_s": round(ready_again_s, 2),
    }


def probes(server: LocalServer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for name, value in (("threshold_true", True), ("threshold_string", "0.5")):
            r = client.post(
                "/classify", json={"input": "hi", "policies": ["toxicity"], "thresholds": {"toxicity": value}}
            )
            out[name] = [r.status_code, r.json()["error"]["message"]]
        r = client.post("/classify", json={"input": 5})
        out["input_number"] = [r.status_code, r.json()["error"]["message"]]
        nested = '{"input": ' + "[" * 5000 + "]" * 5000 + "}"
        r = client.post("/classify", content=nested, headers={"content-type": "application/json"})
        out["nested_json"] = [r.status_code, r.json()["error"]["code"]]
        r = client.get("/" + "a" * 10_000)
        out["long_path"] = [r.status_code, r.json()["error"]["code"]]
        r = client.post("/admin/reload-policies")
        out["admin_without_key"] = [r.status_code, r.json()["error"]["code"]]
        html = client.get("/docs").text
        out["docs_external_urls"] = "http" in html.replace("http://www.w3.org", "")
    log_text = server.log_path.read_text(encoding="utf-8", errors="replace")
    paths = [json.loads(line).get("path", "") for line in log_text.splitlines() if line.startswith("{")]
    out["longest_logged_path_chars"] = max((len(p) for p in paths), default=0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/uniguard-minilm"))
    parser.add_argument("--out", type=Path, default=Path("runs/flood"))
    parser.add_argument("--stalled", type=int, default=600, help="stalled-body sockets")
    parser.add_argument("--burst", type=int, default=200, help="concurrent 2-text requests")
    parser.add_argument("--body-timeout", type=float, default=5.0, help="UNIGUARD_BODY_TIMEOUT_S of the server")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {
        "UNIGUARD_REDIS_URL": "",
        "UNIGUARD_LOG_LEVEL": "info",
        "UNIGUARD_BODY_TIMEOUT_S": str(args.body_timeout),
        "UNIGUARD_HEADER_TIMEOUT_S": str(args.body_timeout),
    }
    result: dict[str, Any] = {}
    with LocalServer(args.model, settings=settings, log_path=args.out / "server.log", inherit_settings=False) as srv:
        log.info("server ready at %s; slow clients ...", srv.url)
        result["slow_clients"] = slow_clients(srv, args.stalled, args.body_timeout)
        log.info("costly request ...")
        result["costly"] = costly(srv)
        log.info("burst of %d ...", args.burst)
        result["burst"] = burst(srv, args.burst)
        log.info("lax types, nesting, long path, admin, docs ...")
        result["probes"] = probes(srv)
        result["metrics"] = {k: v for k, v in srv.metrics().items() if "admission" in k or "timeouts" in k}
    (args.out / "flood.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
