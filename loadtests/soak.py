"""Soak test: Locust at a fixed rate for a bounded time while the Redis cache is stopped and restarted mid-run.

    python -m loadtests.soak --model models/uniguard-minilm --rate 40 --duration 180 --out runs/soak

It starts its own redis-server on a free localhost port (never touches another Redis), serves the model with
UNIGUARD_REDIS_URL pointing at it, and runs Locust at --rate requests/s. At one third of the run it stops Redis,
keeps it down for --redis-down seconds, then starts it again on the same port. It records requests, unexpected
errors and p99 latency before / during / after the outage, the cache-error metrics, and the server's resident
memory at start and end. Outputs: soak.json, soak.md, soak_latency.png, the Locust CSVs and logs.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from loadtests.common import (
    HOST,
    ROOT,
    latency_chart,
    locust_command,
    read_history,
    rss_bytes,
    write_json,
)
from service.localserver import LocalServer, free_port

log = logging.getLogger("uniguard.soak")


class RedisServer:
    """A throw-away redis-server on a free localhost port (no persistence), restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server not found: install it (scripts/ensure_redis.sh does) to run the soak test")
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        command = [self.binary, "--bind", HOST, "--port", str(self.port), "--save", "", "--appendonly", "no"]
        command += ["--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ping():
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on {HOST}:{self.port} (see {self.workdir / 'redis.log'})")

    def ping(self) -> bool:
        import socket

        try:
            with socket.create_connection((HOST, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None


class PhaseStats(BaseModel):
    phase: str
    seconds: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float


class SoakResult(BaseModel):
    model: str
    rate_rps: float
    users: int
    duration_s: int
    redis_down_s: float
    requests: int
    errors: int
    phases: list[PhaseStats]
    rss_start_mb: float
    rss_end_mb: float
    cache_errors: float
    cache_bypassed: float
    cache_hits: float
    redis_stopped_at_s: float
    redis_restarted_at_s: float
    chart: str


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def phase_stats(log_path: Path, boundaries: list[tuple[str, float, float]]) -> list[PhaseStats]:
    with open(log_path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    out = []
    for name, start, end in boundaries:
        inside = [r for r in rows if start <= float(r["time"]) < end]
        latencies = [float(r["latency_ms"]) for r in inside]
        seconds = max(end - start, 1e-9)
        out.append(
            PhaseStats(
                phase=name,
                seconds=round(seconds, 1),
                requests=len(inside),
                errors=sum(1 for r in inside if r["ok"] != "1"),
                rps=len(inside) / seconds,
                p50_ms=_percentile(latencies, 50),
                p99_ms=_percentile(latencies, 99),
            )
        )
    return out


def _metric_sum(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix))


def markdown(r: SoakResult) -> str:
    lines = [
        f"# Soak: {r.rate_rps:g} req/s for {r.duration_s} s, Redis down for {r.redis_down_s:g} s",
        "",
        f"Model `{r.model}`, {r.users} Locust users. {r.requests} requests, {r.errors} unexpected errors. "
        f"Server RSS {r.rss_start_mb:.0f} MB at start, {r.rss_end_mb:.0f} MB at end. "
        f"Cache errors {r.cache_errors:g}, lookups bypassed while Redis was down {r.cache_bypassed:g}, "
        f"cache hits {r.cache_hits:g}.",
        "",
        "| phase | seconds | requests | errors | req/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in r.phases:
        lines.append(
            f"| {p.phase} | {p.seconds:g} | {p.requests} | {p.errors} | {p.rps:.1f} | {p.p50_ms:.0f} | {p.p99_ms:.0f} |"
        )
    lines += ["", f"![latency over time]({r.chart})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/uniguard-minilm"), help="exported model folder")
    parser.add_argument("--rate", type=float, default=20.0, help="total request rate (req/s), e.g. 70%% of sustainable")
    parser.add_argument("--users", type=int, default=None, help="Locust users (default: rate / 4, at least 4)")
    parser.add_argument("--duration", type=int, default=90, help="seconds of load (at most 3600)")
    parser.add_argument("--redis-down", type=float, default=None, help="seconds Redis stays down (default: duration/6)")
    parser.add_argument("--out", type=Path, default=Path("runs/soak"), help="output folder")
    args = parser.parse_args(argv)
    if not 9 <= args.duration <= 3600:
        parser.error("--duration must lie in [9, 3600] seconds")
    if args.rate <= 0:
        parser.error("--rate must be positive")
    if not (args.model / "manifest.json").is_file():
        parser.error(f"--model {args.model}: no manifest.json; export a model or build it (`make model`)")
    users = args.users or max(4, math.ceil(args.rate / 4))
    down = args.redis_down if args.redis_down is not None else args.duration / 6
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    request_log = out / "requests.csv"

    with tempfile.TemporaryDirectory(prefix="uniguard-soak-redis-") as redis_dir:
        redis = RedisServer(Path(redis_dir))
        redis.start()
        server = LocalServer(
            args.model, settings={"UNIGUARD_REDIS_URL": redis.url}, log_path=out / "server.log", cwd=ROOT
        )
        try:
            server.start()
            rss_start = rss_bytes(server.pid)
            env = {
                **os.environ,
                "UNIGUARD_LOAD_SCENARIO": "steady",
                "UNIGUARD_LOAD_USER_RPS": str(args.rate / users),
                "UNIGUARD_LOAD_REQUEST_LOG": str(request_log),
            }
            command = locust_command(server.url, users, users, args.duration, out / "locust")
            log.info("soak: %g req/s (%d users) for %ds against %s", args.rate, users, args.duration, server.url)
            with open(out / "locust_locust.log", "wb") as locust_log:
                locust = subprocess.Popen(command, env=env, cwd=ROOT, stdout=locust_log, stderr=subprocess.STDOUT)
                t0 = time.time()
                try:
                    time.sleep(args.duration / 3)
                    stopped_at = time.time()
                    redis.stop()
                    log.info("soak: Redis stopped at %.0fs", stopped_at - t0)
                    time.sleep(down)
                    redis.start()
                    restarted_at = time.time()
                    log.info("soak: Redis restarted at %.0fs", restarted_at - t0)
                    code = locust.wait(timeout=args.duration + 120)
                except BaseException:
                    locust.kill()
                    raise
            if code != 0:
                raise RuntimeError(f"locust failed ({code}); see {out / 'locust_locust.log'}")
            rss_end = rss_bytes(server.pid)
            samples = server.metrics()
        finally:
            server.stop()
            redis.stop()

    end = time.time()
    phases = phase_stats(
        request_log,
        [("before", t0, stopped_at), ("during", stopped_at, restarted_at), ("after", restarted_at, end)],
    )
    chart = latency_chart(
        read_history(out / "locust"),
        out / "soak_latency.png",
        f"UniGuard soak: {args.rate:g} req/s, Redis restarted",
        shade=[(stopped_at, restarted_at, "Redis down")],
    )
    result = SoakResult(
        model=str(args.model),
        rate_rps=args.rate,
        users=users,
        duration_s=args.duration,
        redis_down_s=round(restarted_at - stopped_at, 1),
        requests=sum(p.requests for p in phases),
        errors=sum(p.errors for p in phases),
        phases=phases,
        rss_start_mb=rss_start / 2**20,
        rss_end_mb=rss_end / 2**20,
        cache_errors=_metric_sum(samples, "uniguard_cache_errors_total"),
        cache_bypassed=_metric_sum(samples, "uniguard_cache_bypassed_total"),
        cache_hits=_metric_sum(samples, "uniguard_cache_hits_total"),
        redis_stopped_at_s=round(stopped_at - t0, 1),
        redis_restarted_at_s=round(restarted_at - t0, 1),
        chart=chart.name,
    )
    write_json(out / "soak.json", result)
    (out / "soak.md").write_text(markdown(result), encoding="utf-8")
    print((out / "soak.md").read_text(encoding="utf-8"))
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
