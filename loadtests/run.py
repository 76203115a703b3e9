"""Start the service on localhost, run Locust headless for a bounded time, write stats, a summary and a chart.

    python -m loadtests.run --model models/uniguard-minilm --users 16 --spawn-rate 8 --duration 120 --out runs/load

Outputs in --out: locust_stats.csv, locust_stats_history.csv, locust_failures.csv, locust.html, summary.json,
summary.md, latency.png, server.log.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from loadtests.common import (
    ROOT,
    SCENARIOS_HELP,
    LoadSummary,
    latency_chart,
    read_history,
    read_stats,
    run_locust,
    write_json,
)
from service.localserver import LocalServer

log = logging.getLogger("uniguard.loadtest")


def summarise(
    csv_prefix: Path, scenario: str, users: int, spawn_rate: float, duration_s: int, model: Path, out: Path
) -> LoadSummary:
    """summary.json, summary.md and latency.png from a finished run's CSV files."""
    aggregated, endpoints, failures = read_stats(csv_prefix)
    history = read_history(csv_prefix)
    chart = latency_chart(history, out / "latency.png", f"UniGuard /classify, {scenario}, {users} users")
    summary = LoadSummary(
        scenario=scenario,
        users=users,
        spawn_rate=spawn_rate,
        duration_s=duration_s,
        model=str(model),
        requests=aggregated.requests,
        failures=aggregated.failures,
        error_rate=aggregated.failures / aggregated.requests if aggregated.requests else 0.0,
        throughput_rps=aggregated.rps,
        p50_ms=aggregated.p50_ms,
        p95_ms=aggregated.p95_ms,
        p99_ms=aggregated.p99_ms,
        max_ms=aggregated.max_ms,
        endpoints=endpoints,
        failures_by_error=failures,
        chart=chart.name,
    )
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown(summary), encoding="utf-8")
    return summary


def markdown(s: LoadSummary) -> str:
    lines = [
        f"# Load test: {s.scenario}, {s.users} users, {s.duration_s} s",
        "",
        f"Model `{s.model}`. {s.requests} requests, {s.failures} unexpected failures "
        f"(error rate {s.error_rate:.2%}), throughput {s.throughput_rps:.1f} req/s, "
        f"latency p50 {s.p50_ms:.0f} ms, p95 {s.p95_ms:.0f} ms, p99 {s.p99_ms:.0f} ms, max {s.max_ms:.0f} ms.",
        "",
        "| request | count | failures | req/s | p50 ms | p95 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in s.endpoints:
        cells = [
            e.name,
            e.requests,
            e.failures,
            f"{e.rps:.1f}",
            f"{e.p50_ms:.0f}",
            f"{e.p95_ms:.0f}",
            f"{e.p99_ms:.0f}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if s.failures_by_error:
        lines += ["", "Failures:", ""] + [f"- {k}: {v}" for k, v in s.failures_by_error.items()]
    lines += ["", f"![latency over time]({s.chart})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/uniguard-minilm"), help="exported model folder")
    parser.add_argument("--users", type=int, default=8, help="concurrent Locust users")
    parser.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second")
    parser.add_argument("--duration", type=int, default=30, help="seconds of load (at most 3600)")
    parser.add_argument("--scenario", choices=["steady", "spike", "cache-heavy"], default="steady", help=SCENARIOS_HELP)
    parser.add_argument(
        "--user-rps", type=float, default=None, help="fixed request rate per user (constant_throughput)"
    )
    parser.add_argument("--redis-url", default="", help="UNIGUARD_REDIS_URL for the server (default: in-process cache)")
    parser.add_argument("--out", type=Path, default=Path("runs/loadtest"), help="output folder")
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 3600:
        parser.error("--duration must lie in [1, 3600] seconds")
    if not (args.model / "manifest.json").is_file():
        parser.error(
            f"--model {args.model}: no manifest.json; export a model (`uniguard export`) or build it (`make model`)"
        )

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    locust_env = {"UNIGUARD_LOAD_SCENARIO": args.scenario}
    if args.user_rps:
        locust_env["UNIGUARD_LOAD_USER_RPS"] = str(args.user_rps)
    if args.scenario == "spike":
        locust_env.update(
            UNIGUARD_LOAD_BASE_USERS=str(args.users),
            UNIGUARD_LOAD_SPIKE_USERS=str(args.users * 5),
            UNIGUARD_LOAD_SPIKE_SECONDS=str(args.duration),
        )
    server_env = {"UNIGUARD_REDIS_URL": args.redis_url}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("starting uniguard serve on %s ...", args.model)
    with LocalServer(args.model, settings=server_env, log_path=out / "server.log", cwd=ROOT) as server:
        log.info("%s ready; locust %s: %d users for %ds", server.url, args.scenario, args.users, args.duration)
        run = run_locust(server.url, args.users, args.spawn_rate, args.duration, out / "locust", env=locust_env)
    summary = summarise(run.csv_prefix, args.scenario, args.users, args.spawn_rate, args.duration, args.model, out)
    print((out / "summary.md").read_text(encoding="utf-8"))
    return 0 if summary.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
