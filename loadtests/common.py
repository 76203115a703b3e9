"""Shared pieces of the load scripts: a headless Locust run, CSV parsing, charts. The local server is
service/localserver.py's (the one helper shared with the benchmark and the tests).

Only localhost: the server binds 127.0.0.1 and Locust targets it; every wait and run is bounded.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel

from service.localserver import HOST

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (Linux /proc), in bytes."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pending.extend(int(c) for c in children)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


class LocustRun(BaseModel):
    csv_prefix: Path
    returncode: int
    seconds: float


def locust_command(
    url: str, users: int, spawn_rate: float, duration_s: int, csv_prefix: Path, tags: list[str] | None = None
) -> list[str]:
    """The headless Locust command line (localhost targets only)."""
    if not url.startswith(f"http://{HOST}:"):
        raise ValueError(f"{url}: load tests only target {HOST}")
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(users), "-r", str(spawn_rate), "-t", f"{duration_s}s",
        "--host", url, "--csv", str(csv_prefix), "--csv-full-history",
        "--html", str(csv_prefix) + ".html", "--only-summary", "--loglevel", "WARNING",
        "--stop-timeout", "5", "--exit-code-on-error", "0",
    ]  # fmt: skip
    return command + (["--tags", *tags] if tags else [])


def run_locust(
    url: str,
    users: int,
    spawn_rate: float,
    duration_s: int,
    csv_prefix: Path,
    env: dict[str, str] | None = None,
    tags: list[str] | None = None,
) -> LocustRun:
    """Headless Locust against a localhost URL for a bounded time; CSV stats at ``csv_prefix``."""
    csv_prefix.parent.mkdir(parents=True, exist_ok=True)
    command = locust_command(url, users, spawn_rate, duration_s, csv_prefix, tags)
    started = time.monotonic()
    proc = subprocess.run(
        command,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=duration_s + 120,
        check=False,
    )
    (csv_prefix.parent / (csv_prefix.name + "_locust.log")).write_bytes(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"locust failed ({proc.returncode}): {proc.stdout.decode()[-2000:]}")
    return LocustRun(csv_prefix=csv_prefix, returncode=proc.returncode, seconds=time.monotonic() - started)


class EndpointStats(BaseModel):
    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


class LoadSummary(BaseModel):
    scenario: str
    users: int
    spawn_rate: float
    duration_s: int
    model: str
    requests: int
    failures: int
    error_rate: float
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    endpoints: list[EndpointStats]
    failures_by_error: dict[str, int]
    chart: str | None = None


def _num(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def read_stats(csv_prefix: Path) -> tuple[EndpointStats, list[EndpointStats], dict[str, int]]:
    """The aggregated row, the per-endpoint rows and failure counts from Locust's CSV files."""
    rows = _read_csv(Path(f"{csv_prefix}_stats.csv"))
    stats = []
    for row in rows:
        stats.append(
            EndpointStats(
                name=row["Name"] if row["Type"] else "Aggregated",
                requests=int(_num(row["Request Count"])),
                failures=int(_num(row["Failure Count"])),
                rps=_num(row["Requests/s"]),
                p50_ms=_num(row["50%"]),
                p95_ms=_num(row["95%"]),
                p99_ms=_num(row["99%"]),
                max_ms=_num(row["Max Response Time"]),
            )
        )
    aggregated = next(s for s in stats if s.name == "Aggregated")
    failures: dict[str, int] = {}
    failures_path = Path(f"{csv_prefix}_failures.csv")
    if failures_path.is_file():
        for row in _read_csv(failures_path):
            key = f"{row['Name']}: {row['Error']}"
            failures[key] = failures.get(key, 0) + int(_num(row["Occurrences"]))
    return aggregated, [s for s in stats if s.name != "Aggregated"], failures


def read_history(csv_prefix: Path) -> list[dict[str, float]]:
    """Aggregated rows of ``_stats_history.csv``: time, users, rps, failures/s, p50/p95/p99 (current window)."""
    out = []
    for row in _read_csv(Path(f"{csv_prefix}_stats_history.csv")):
        if row["Name"] != "Aggregated":
            continue
        out.append(
            {
                "t": _num(row["Timestamp"]),
                "users": _num(row["User Count"]),
                "rps": _num(row["Requests/s"]),
                "fails": _num(row["Failures/s"]),
                "p50": _num(row["50%"]),
                "p95": _num(row["95%"]),
                "p99": _num(row["99%"]),
                "total": _num(row["Total Request Count"]),
            }
        )
    return out


def latency_chart(
    history: list[dict[str, float]], path: Path, title: str, shade: list[tuple[float, float, str]] | None = None
) -> Path:
    """PNG: p50/p95/p99 latency over time with throughput on a second axis (optional shaded intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    if history:
        t0 = history[0]["t"]
        xs = [h["t"] - t0 for h in history]
        for key, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            ax.plot(xs, [h[key] for h in history], style, label=f"{key} latency")
        ax2 = ax.twinx()
        ax2.plot(xs, [h["rps"] for h in history], color="grey", alpha=0.5, label="requests/s")
        ax2.set_ylabel("requests/s")
        ax2.legend(loc="upper right")
        for start, end, label in shade or []:
            ax.axvspan(start - t0, end - t0, color="red", alpha=0.12, label=label)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("latency (ms, 10 s window)")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(path: Path, model: BaseModel) -> Path:
    path.write_text(json.dumps(model.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return path


SCENARIOS_HELP = "steady: the mix at --users; spike: --users, 5x in the middle third; cache-heavy: mostly repeats"
