"""Real `uniguard serve` processes: start-up refusals, SIGTERM drain, SIGHUP/admin policy reload, JSON logs without
prompts, and a Redis that times out, drops connections and restarts under concurrent load."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from service.localserver import LocalServer, free_port, serve_command, server_env

SECRET = "zebra-quokka-7731 please rate my pineapple ransom letter"
GOOD_POLICY = """name: {name}
description: Flags prompts that ask about competitor products or their prices.
disallowed:
  - asking which competitor product is better
allowed:
  - questions about our own products
"""


def _env(**settings: str) -> dict[str, str]:
    return server_env({"UNIGUARD_REDIS_URL": "", "UNIGUARD_WARMUP_BATCHES": "1", **settings}, inherit_settings=False)


def _serve_cmd(model: Path | str, port: int) -> list[str]:
    return serve_command(model, port)


@contextmanager
def _server(model: Path, log: Path, **settings: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`uniguard serve` on a free port with stderr (the JSON log) in ``log``; SIGTERM (then SIGKILL) at the end."""
    server = LocalServer(
        model,
        settings={"UNIGUARD_REDIS_URL": "", "UNIGUARD_WARMUP_BATCHES": "1", **settings},
        log_path=log,
        inherit_settings=False,
    )
    with server:
        assert server.proc is not None
        yield server.proc, server.url


def _log_lines(log: Path) -> list[dict[str, Any]]:
    lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"log line is not JSON: {line[:300]}") from None
    return entries


# -- start-up refusals -------------------------------------------------------------------------------------------
def test_startup_refuses_bad_model_policy_or_setting(tiny_model_dir: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, corrupt)
    with open(corrupt / "model.onnx", "r+b") as f:
        f.seek(200)
        f.write(b"\x00garbage\x00")
    incompatible = tmp_path / "incompatible"
    shutil.copytree(tiny_model_dir, incompatible)
    manifest = json.loads((incompatible / "manifest.json").read_text())
    manifest["schema_version"] = 2
    (incompatible / "manifest.json").write_text(json.dumps(manifest))
    bad_inputs = tmp_path / "bad_inputs"
    shutil.copytree(tiny_model_dir, bad_inputs)
    manifest = json.loads((bad_inputs / "manifest.json").read_text())
    manifest["input_names"] = ["input_ids", "pixel_values"]
    (bad_inputs / "manifest.json").write_text(json.dumps(manifest))
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "broken_policy.yaml").write_text("name: Not A Valid Name\ndescription: short\n")
    config = tmp_path / "settings.yaml"
    config.write_text("max_batch_size: many\n")

    port = free_port()  # never bound: every case must exit before listening
    cases: list[tuple[str, list[str], dict[str, str], list[str]]] = [
        ("missing model", _serve_cmd(tmp_path / "no-such-model", port), {}, ["no-such-model", "UNIGUARD_MODEL_DIR"]),
        ("corrupt model", _serve_cmd(corrupt, port), {}, [str(corrupt / "model.onnx"), "checksum mismatch"]),
        ("incompatible manifest", _serve_cmd(incompatible, port), {}, ["manifest.json", "incompatible"]),
        ("unsupported inputs", _serve_cmd(bad_inputs, port), {}, ["manifest.json", "pixel_values"]),
        (
            "invalid policy file",
            _serve_cmd(tiny_model_dir, port),
            {"UNIGUARD_POLICY_DIRS": str(policies)},
            ["broken_policy.yaml", "name"],
        ),
        (
            "missing policy folder",
            _serve_cmd(tiny_model_dir, port),
            {"UNIGUARD_POLICY_DIRS": str(tmp_path / "nowhere")},
            ["nowhere", "UNIGUARD_POLICY_DIRS"],
        ),
        ("invalid setting", _serve_cmd(tiny_model_dir, port), {"UNIGUARD_MAX_QUEUE": "0"}, ["UNIGUARD_MAX_QUEUE"]),
        ("invalid enum", _serve_cmd(tiny_model_dir, port), {"UNIGUARD_FAIL_MODE": "maybe"}, ["UNIGUARD_FAIL_MODE"]),
        (
            "invalid config file value",
            _serve_cmd(tiny_model_dir, port),
            {"UNIGUARD_CONFIG_FILE": str(config)},
            ["UNIGUARD_MAX_BATCH_SIZE"],
        ),
    ]
    procs = [
        (label, expected, subprocess.Popen(cmd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for label, cmd, env, expected in cases
    ]
    for label, expected, proc in procs:
        _out, err = proc.communicate(timeout=60)
        text = err.decode()
        assert proc.returncode == 2, (label, proc.returncode, text[-1500:])
        assert text.startswith("uniguard serve: "), (label, text[-1500:])
        for needle in expected:
            assert needle in text, (label, needle, text[-1500:])
        assert "Traceback" not in text, (label, text[-1500:])


# -- graceful shutdown, reload, logs -------------------------------------------------------------------------------
def test_sigterm_drains_in_flight_requests_and_logs_are_json_without_prompts(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "competitors.yaml").write_text(GOOD_POLICY.format(name="competitor_mentions"))
    log = tmp_path / "serve.log"
    settings = {
        "UNIGUARD_POLICY_DIRS": str(policies),
        "UNIGUARD_MAX_BATCH_SIZE": "1",
        "UNIGUARD_MAX_WAIT_MS": "0",
        "UNIGUARD_CACHE_MAX_ENTRIES": "0",
        "UNIGUARD_MAX_QUEUE": "100000",
        "UNIGUARD_ADMIN_ENABLED": "true",
        # this test is about draining, not admission: a fixed, generous engine speed keeps cost-aware admission
        # from refusing the six heavy requests when CI's cores are slow (admission has its own tests)
        "UNIGUARD_ENGINE_TOKENS_PER_S": "10000000",
    }
    with _server(tiny_model_dir, log, **settings) as (proc, url):
        client = httpx.Client(base_url=url, timeout=30)
        # request ids: echoed when given, generated otherwise
        r = client.post(
            "/classify",
            json={"input": SECRET, "policies": ["toxicity", "competitor_mentions"]},
            headers={"X-Request-ID": "req-privacy-123"},
        )
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-privacy-123"
        generated = client.post("/classify", json={"input": [SECRET, "again"]}).headers["x-request-id"]
        assert len(generated) == 32 and generated != "req-privacy-123"
        weird = client.get("/healthz", headers={"X-Request-ID": 'x", "level": "forged'}).headers["x-request-id"]
        assert len(weird) == 32  # an unsafe id is replaced, never echoed into the logs
        r = client.post("/classify", json={"input": SECRET, "policies": ["nope_policy"]})
        assert r.status_code == 422 and SECRET not in r.text

        # hot reload on SIGHUP: a new valid file is picked up ...
        (policies / "pricing.yaml").write_text(GOOD_POLICY.format(name="pricing_questions"))
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "pricing_questions" in _names(client), "SIGHUP reload")
        # ... a bad one is rejected, the error names the file, and the old registry keeps serving
        (policies / "zz_bad.yaml").write_text("name: bad policy name\n")
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "zz_bad.yaml" in log.read_text(), "the rejected reload's log line")
        assert proc.poll() is None
        assert _names(client)[-2:] == ["competitor_mentions", "pricing_questions"]
        r = client.post("/admin/reload-policies")
        assert r.status_code == 409 and "zz_bad.yaml" in r.json()["error"]["message"]
        r = client.post("/classify", json={"input": "hello", "policies": ["pricing_questions"]})
        assert r.status_code == 200
        (policies / "zz_bad.yaml").unlink()
        (policies / "pricing.yaml").unlink()
        r = client.post("/admin/reload-policies")
        assert r.status_code == 200 and r.json()["removed"] == ["pricing_questions"]

        # SIGTERM while requests are in flight: they all finish with 200, then the process exits 0
        text = " ".join(f"Sentence {i} of a long document about shipping and handling." for i in range(30))
        heavy = {"input": [f"{text} #{i}" for i in range(12)], "policies": ["toxicity", "tax_advice"]}
        results: list[tuple[int, float]] = []

        def send(i: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                try:
                    resp = c.post("/classify", json={**heavy, "input": [f"{t} r{i}" for t in heavy["input"]]})
                    results.append((resp.status_code, time.monotonic()))
                except httpx.TransportError as exc:  # recorded, so a refused request fails the assertion below
                    results.append((-1, time.monotonic()))
                    raise exc

        def all_admitted_some_in_flight() -> bool:
            # SIGTERM only once every request has been admitted (in flight or answered): a request still
            # connecting at SIGTERM is rightly refused, which is not what this test is about
            in_flight = _metric(client, "uniguard_inflight_requests")
            return in_flight >= 2 and in_flight + len(results) >= 6

        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        _wait_for(all_admitted_some_in_flight, "all six requests admitted, some in flight")
        client.close()
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.post(url + "/classify", json={"input": "late"}, timeout=5)
        for t in threads:
            t.join(60)
        code = proc.wait(30)
    assert code == 0, log.read_text()[-2000:]
    assert [status for status, _ in results] == [200] * 6, results
    assert any(done > signalled + 0.05 for _, done in results), "no request was still in flight at SIGTERM"

    entries = _log_lines(log)
    raw = log.read_text(encoding="utf-8")
    assert SECRET not in raw and "zebra-quokka" not in raw and "pineapple" not in raw
    assert "shipping and handling" not in raw
    assert all({"ts", "level", "msg", "logger"} <= set(e) for e in entries)
    access = [e for e in entries if e["logger"] == "uniguard.access"]
    first = next(e for e in access if e.get("request_id") == "req-privacy-123")
    assert first["method"] == "POST" and first["path"] == "/classify" and first["status"] == 200
    assert first["level"] == "info" and first["msg"] == "request" and first["latency_ms"] > 0
    assert any(e.get("request_id") == generated for e in access)
    assert not any(e.get("level") == "forged" for e in entries)
    assert any("policy reload rejected" in e["msg"] and "zz_bad.yaml" in e["msg"] for e in entries)
    assert any(e["msg"] == "shut down" for e in entries)


def _names(client: httpx.Client) -> list[str]:
    return [p["name"] for p in client.get("/policies").json()["policies"]]


def _metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_for(condition: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- Redis faults under load ---------------------------------------------------------------------------------------
class _Redis:
    """A redis-server of our own on a random port (so we may pause, cut and restart it)."""

    def __init__(self, folder: Path) -> None:
        assert shutil.which("redis-server"), "redis-server is required (make redis installs it)"
        self.port, self.folder = free_port(), folder
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [*cmd, "--dir", str(self.folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_for(self._ping, "redis-server")

    def _ping(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.2).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def test_redis_faults_under_load_fail_no_request(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = _Redis(tmp_path)
    server.start()
    prefix = "uniguard-reliability:"
    settings = {
        "UNIGUARD_REDIS_URL": f"redis://127.0.0.1:{server.port}/0",
        "UNIGUARD_REDIS_TIMEOUT_S": "0.1",
        "UNIGUARD_REDIS_BACKOFF_MAX_S": "0.3",
        "UNIGUARD_CACHE_KEY_PREFIX": prefix,
        "UNIGUARD_LOG_LEVEL": "warning",
    }
    repeated = [f"{SECRET} variant {i}" for i in range(5)]
    try:
        with _server(tiny_model_dir, tmp_path / "serve.log", **settings) as (_proc, url):
            stop = threading.Event()
            outcomes: list[tuple[float, int, bool]] = []  # (time, status, any verdict cached)
            failures: list[str] = []

            def load(worker: int) -> None:
                with httpx.Client(base_url=url, timeout=10) as c:
                    i = 0
                    while not stop.is_set():
                        i += 1
                        text = repeated[i % 5] if i % 2 else f"unique {worker}-{i} text"
                        try:
                            r = c.post("/classify", json={"input": text, "policies": ["toxicity", "tax_advice"]})
                        except httpx.HTTPError as exc:
                            failures.append(repr(exc))
                            continue
                        cached = r.status_code == 200 and any(
                            v["cached"] for v in r.json()["results"][0]["policies"].values()
                        )
                        outcomes.append((time.monotonic(), r.status_code, cached))

            admin = redis.Redis(port=server.port, socket_timeout=1)
            with ThreadPoolExecutor(4) as pool:
                for w in range(4):
                    pool.submit(load, w)
                time.sleep(1.0)
                admin.execute_command("CLIENT", "PAUSE", "700", "ALL")  # Redis stops answering: timeouts
                time.sleep(1.0)
                admin.execute_command("CLIENT", "KILL", "TYPE", "normal")  # connections dropped
                time.sleep(0.5)
                server.stop()  # Redis goes away ...
                down_at = time.monotonic()
                time.sleep(1.0)
                server.start()  # ... and comes back empty on the same port
                up_at = time.monotonic()
                time.sleep(1.5)
                stop.set()
            metrics = httpx.get(url + "/metrics").text
            fresh = redis.Redis(port=server.port)
            stored = {key: fresh.get(key) or b"" for key in fresh.scan_iter(match=prefix + "*")}
            fresh.close()
    finally:
        server.stop()

    statuses = [s for _, s, _ in outcomes]
    assert not failures and statuses and set(statuses) == {200}, (failures[:3], sorted(set(statuses)))
    assert len(statuses) > 100, f"only {len(statuses)} requests in the run"
    errors = float(metrics.split('uniguard_cache_errors_total{backend="redis"} ')[1].split()[0])
    assert errors >= 2, metrics
    assert any(t < down_at and hit for t, _, hit in outcomes), "the cache never hit before the outage"
    assert not any(down_at + 0.05 < t < up_at - 0.05 and hit for t, _, hit in outcomes), "hits while Redis was down"
    assert any(t > up_at and hit for t, _, hit in outcomes), "the cache did not recover after the restart"
    # the prompts never reach the cache: keys are hashes, values are scores and spans
    assert stored, "nothing was cached after the restart"
    for key, value in stored.items():
        assert b"zebra" not in key + value and b"unique" not in key + value, (key, value)
        assert len(value.split(b",")) == 3
