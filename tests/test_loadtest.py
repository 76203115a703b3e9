"""Load scripts against a real `uniguard serve` process on a tiny exported model (localhost only, a few seconds)."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from loadtests import run, soak
from loadtests.common import read_stats, run_locust
from service.localserver import LocalServer

ROOT = Path(__file__).resolve().parent.parent


def _invalid_kinds() -> int:
    """How many invalid-request kinds the locustfile sends (read, not imported: importing locust patches gevent)."""
    tree = ast.parse((ROOT / "loadtests" / "locustfile.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "INVALID" and node.value:
            return len(ast.literal_eval(node.value))
    raise AssertionError("INVALID not found in loadtests/locustfile.py")


def test_locust_smoke_run_has_no_unexpected_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`python -m loadtests.run` for 5 s: every request kind is sent, expected 4xx count as success, none fail."""
    out = tmp_path / "load"
    code = run.main(
        ["--model", str(tiny_model_dir), "--users", "4", "--spawn-rate", "4", "--duration", "5", "--out", str(out)]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"] == 0, summary["failures_by_error"]
    assert code == 0
    assert summary["requests"] >= 40, summary
    assert summary["throughput_rps"] > 0 and 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"]
    _, endpoints, _ = read_stats(out / "locust")
    counts = {e.name: e.requests for e in endpoints}
    for kind in ["classify short", "classify long", "classify batch", "classify repeated", "classify custom"]:
        assert counts.get(kind, 0) > 0, f"{kind} never ran: {counts}"
    invalid = sum(n for name, n in counts.items() if name.startswith("invalid: "))
    assert invalid > 0, counts
    assert len([n for n in counts if n.startswith("invalid: ")]) == min(invalid, _invalid_kinds())
    chart = out / "latency.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000
    assert "p99" in (out / "summary.md").read_text()


def test_locust_counts_unexpected_answers_as_failures(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The checks bite: when the server refuses batches and long texts (tight limits), Locust records those requests
    as failures while the short prompts still succeed."""
    limits = {"UNIGUARD_MAX_TEXTS_PER_REQUEST": "1", "UNIGUARD_MAX_TEXT_CHARS": "1000"}
    server = LocalServer(tiny_model_dir, settings=limits, log_path=tmp_path / "server.log")
    server.start()
    try:
        result = run_locust(server.url, 3, 3, 3, tmp_path / "locust", tags=["short", "batch", "long"])
    finally:
        # uvicorn drains, then re-raises the SIGTERM it caught: -15 is a graceful exit; -9 would mean it hung.
        assert server.stop() in (0, -signal.SIGTERM), "the server should exit on SIGTERM without being killed"
    _, endpoints, failures = read_stats(result.csv_prefix)
    by_name = {e.name: e for e in endpoints}
    for refused in ["classify batch", "classify long"]:
        stats = by_name[refused]
        assert stats.requests > 0 and stats.failures == stats.requests, endpoints
    assert by_name["classify short"].requests > 0 and by_name["classify short"].failures == 0, failures
    assert any("422" in error and "too_many_texts" in error for error in failures), failures


def test_docker_healthcheck_command_passes_against_a_real_server(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The Dockerfile's HEALTHCHECK command, run as written, succeeds against the service (and fails without it)."""
    text = (ROOT / "Dockerfile").read_text()
    snippets = re.findall(r'HEALTHCHECK .*?CMD \["python", "-c", "(.*?)"\]', text, flags=re.S)
    assert snippets, "no exec-form python HEALTHCHECK in the Dockerfile"
    server = LocalServer(tiny_model_dir, log_path=tmp_path / "server.log")
    server.start()
    try:
        for code in set(snippets):
            env = {**os.environ, "UNIGUARD_PORT": str(server.port)}
            assert subprocess.run([sys.executable, "-c", code], env=env, timeout=30).returncode == 0
    finally:
        server.stop()
    env = {**os.environ, "UNIGUARD_PORT": str(server.port)}
    dead = subprocess.run([sys.executable, "-c", snippets[0]], env=env, capture_output=True, timeout=30)
    assert dead.returncode != 0, "the HEALTHCHECK must fail when the service is down"


def test_soak_survives_a_redis_restart(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`python -m loadtests.soak` for 9 s with its own Redis stopped for 3 s: zero errors, the outage is observed."""
    out = tmp_path / "soak"
    code = soak.main(
        ["--model", str(tiny_model_dir), "--rate", "20", "--duration", "9", "--redis-down", "3", "--out", str(out)]
    )
    result = json.loads((out / "soak.json").read_text())
    assert result["errors"] == 0, result
    assert code == 0
    assert [p["phase"] for p in result["phases"]] == ["before", "during", "after"]
    assert all(p["requests"] > 0 for p in result["phases"]), result["phases"]
    assert result["cache_errors"] + result["cache_bypassed"] > 0, "the service never noticed Redis going away"
    assert result["rss_start_mb"] > 10 and result["rss_end_mb"] > 10
    assert (out / "soak_latency.png").stat().st_size > 10_000
